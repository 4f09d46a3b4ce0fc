"""The connection to RabbitMQ: kept up with back-off, reported as connected or unreachable.

Two robust connections per daemon (aio-pika reconnects them and re-opens their channels), as the
seed platform's sailor keeps a read and a write connection and as RabbitMQ advises: one publishes,
with one channel with publisher confirms for everything deployd publishes; the other consumes, with
one channel per consuming step (its prefetch is that step's own). On one connection, the broker's
flow control of a busy publisher also held back the acks and deliveries of every consumer on it: on
a loaded machine a message's p99 through the flow was several times longer (docs/benchmarks.md, "One
connection or two"). A broker that is down never stops the daemon: `state` says `unreachable` with
the error (credentials redacted), warm-ups of flows on this runtime wait for it (up to their
timeout), everything else keeps working.

Names (all durable, declared idempotently whenever they are needed):

    deployd.flows            direct exchange; routing key "<flow>.<step>" → that step's input
    deployd.<flow>.<step>    quorum queue; the daemon is its only consumer (`runner.Consumer`:
                             order kept across switches by giving back with a channel close)
    deployd.retry            direct exchange for rebounds: deployd.<flow>.<step>.retry holds a
                             message for its per-message TTL, then dead-letters it back to
                             deployd.flows with the step's routing key

Dead letters (a message whose handling failed) are not a broker queue: they are written to
the state database in the same group commit as the step's other results, so `deployd flow
errors/retry/discard` work alike on every runtime. The broker's own delivery limit is not
set: a message that kills its step is handed to the restarted process again (with back-off),
as on the embedded runtime, and a broker-side limit would also count the returns of a switch.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Callable
from typing import Any

import aio_pika
import aiormq
from aio_pika.abc import (
    AbstractChannel,
    AbstractExchange,
    AbstractQueue,
    AbstractRobustConnection,
)
from aiormq.abc import DeliveredMessage
from pamqp import commands as spec

from ...errors import FlowError

log = logging.getLogger("deployd.rabbitmq")
EXCHANGE = "deployd.flows"
RETRY_EXCHANGE = "deployd.retry"
BACKOFF_START = 0.5
BACKOFF_MAX = 15.0
RECONNECT_EVERY = 1.0  # seconds between reconnects of a connection that was up
# Everything between the scheme and the last "@" of the url: a password may hold "@" or "/".
_CREDENTIALS = re.compile(r"(amqps?://)\S*@", re.IGNORECASE)


def redact(text: str) -> str:
    """`text` with the user and password of any AMQP url in it replaced."""
    return _CREDENTIALS.sub(r"\1***@", text)


def queue_name(flow: str, step: str) -> str:
    return f"deployd.{flow}.{step}"


def routing_key(flow: str, step: str) -> str:
    return f"{flow}.{step}"


class BrokerUnreachable(FlowError):
    """The broker cannot be reached (the error says why; credentials are redacted)."""


class NotRouted(Exception):
    """The broker confirmed a publish it could route to no queue (the queue was deleted)."""


def properties(
    msg_id: str, headers: dict[str, Any], expiration: float | None = None
) -> spec.Basic.Properties:
    """A persistent JSON message's AMQP properties (`expiration` in seconds)."""
    return spec.Basic.Properties(
        content_type="application/json",
        delivery_mode=2,
        message_id=msg_id,
        headers=headers,
        expiration=None if expiration is None else str(max(1, int(expiration * 1000))),
    )


class Broker:
    """The daemon's connection to RabbitMQ."""

    def __init__(self, url: str, name: str = "deployd") -> None:
        # The client libraries log every failed reconnect with the url (user name included)
        # at error level; this class reports the connection's state itself, redacted, once
        # per change.
        for library in ("aiormq", "aio_pika"):
            logging.getLogger(library).setLevel(logging.CRITICAL)
        self._url = url
        self.name = name  # its connections' names (`connection_name`), as the broker lists them
        self.state = "connecting"  # connecting | connected | unreachable
        self.error: str | None = None
        self.since: float | None = None  # loop time of the last state change
        self.reconnects = 0
        self.connected = asyncio.Event()
        self.conn: AbstractRobustConnection | None = None  # publishes (and declares)
        self.consume_conn: AbstractRobustConnection | None = None  # consumer channels
        self.channel: AbstractChannel | None = None  # publisher confirms on
        self.exchange: AbstractExchange | None = None
        self.retry_exchange: AbstractExchange | None = None
        self._declared: set[tuple[str, str]] = set()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self.on_reconnect: list[Callable[[], None]] = []

    @property
    def where(self) -> str:
        return redact(self._url)

    def describe(self) -> dict[str, Any]:
        return {"state": self.state, "url": self.where, "error": self.error}

    def start(self) -> None:
        """Connect in the background (with back-off until it works)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._connect(), name="amqp")

    async def _connect(self) -> None:
        delay = BACKOFF_START
        while not self._closing:
            try:
                self.conn = await self._connection(self.name)
                self.consume_conn = await self._connection(f"{self.name} consume")
                await self._open()
            except Exception as exc:  # refused, unknown host, bad credentials, a bad url
                self._set("unreachable", _reason(exc))
                for conn in (self.conn, self.consume_conn):
                    if conn is not None:
                        with contextlib.suppress(Exception):
                            await conn.close()
                self.conn = self.consume_conn = None
                await asyncio.sleep(delay)
                delay = min(delay * 2, BACKOFF_MAX)
                continue
            self._set("connected", None)
            return

    async def _connection(self, name: str) -> AbstractRobustConnection:
        conn = await aio_pika.connect_robust(
            self._url,
            timeout=10,
            client_properties={"connection_name": name},
            reconnect_interval=RECONNECT_EVERY,
        )
        conn.reconnect_callbacks.add(self._reconnected)
        conn.close_callbacks.add(self._lost)
        return conn

    async def consumer_channel(self) -> AbstractChannel:
        """A new channel on the consuming connection (for one consumer: its own prefetch)."""
        if self.consume_conn is None:
            raise aiormq.exceptions.ChannelInvalidStateError("not connected")
        return await self.consume_conn.channel(publisher_confirms=False)

    async def _open(self) -> None:
        assert self.conn is not None
        self.channel = await self.conn.channel(publisher_confirms=True)
        reopen = getattr(self.channel, "reopen_callbacks", None)
        if reopen is not None:
            reopen.add(self._channel_reopened)
        self.exchange = await self.channel.declare_exchange(
            EXCHANGE, aio_pika.ExchangeType.DIRECT, durable=True
        )
        self.retry_exchange = await self.channel.declare_exchange(
            RETRY_EXCHANGE, aio_pika.ExchangeType.DIRECT, durable=True
        )
        self._declared.clear()

    def _set(self, state: str, error: str | None) -> None:
        if state != self.state or error != self.error:
            if state == "connected":
                log.info("RabbitMQ at %s: connected", self.where)
            else:
                log.warning("RabbitMQ at %s: %s (%s)", self.where, state, error)
        self.state = state
        self.error = error
        self.since = asyncio.get_running_loop().time()
        if state == "connected":
            self.connected.set()
        else:
            self.connected.clear()

    def _lost(self, _conn: Any, exc: BaseException | None = None) -> None:
        if self._closing:
            return
        self._set("unreachable", _reason(exc) if exc else "connection closed")

    def _channel_reopened(self, _channel: Any) -> None:
        """The publishing channel was closed by the broker and opened again (an RPC timed
        out, a declare did not match): what was taken on it must be taken again."""
        self._reconnected(None)

    def _reconnected(self, _conn: Any) -> None:
        """One of the two connections is back: what came on it before is stale (`reconnects`
        counts it); connected again once both are."""
        self.reconnects += 1
        self._declared.clear()
        if all(_up(conn) for conn in (self.conn, self.consume_conn)):
            self._set("connected", None)
        for callback in list(self.on_reconnect):
            callback()

    async def wait(self, timeout: float) -> None:
        """Until connected; `BrokerUnreachable` after `timeout` seconds."""
        self.start()
        try:
            await asyncio.wait_for(self.connected.wait(), timeout)
        except TimeoutError:
            raise BrokerUnreachable(
                f"RabbitMQ at {self.where} is unreachable: {self.error or 'no answer'}"
                " (check [runtime.rabbitmq] url and that the broker runs)"
            ) from None

    async def publish(
        self,
        exchange: str,
        key: str,
        body: bytes,
        props: spec.Basic.Properties,
        drain: bool = True,
    ) -> None:
        """Publish persistently and wait for the broker's confirm; raises when the broker
        nacks it, could not route it, or the channel or connection went away.

        Lower-level than aio-pika's `Exchange.publish` (no message object). With `drain`
        False the next publish may be written before this one left the socket's buffer: a
        group's publishes are written back to back and only its last one drains, which holds
        the channel (and so the next group) until the socket took them — without that, a
        producer far ahead of the broker would fill the buffer without bound, and every ack
        on the connection would wait behind it. Tasks made in order write in order (nothing
        here yields before the frame is queued)."""
        if self.channel is None:
            raise aiormq.exceptions.ChannelInvalidStateError("not connected")
        channel = await self.channel.get_underlay_channel()
        result = await channel.basic_publish(  # type: ignore[call-arg]
            body, exchange=exchange, routing_key=key, properties=props, mandatory=True, wait=drain
        )
        if isinstance(result, DeliveredMessage):  # returned: no queue is bound to the key
            raise NotRouted(f"no queue for routing key {key!r} on exchange {exchange!r}")

    async def declare_step(
        self, flow: str, step: str, channel: AbstractChannel | None = None
    ) -> AbstractQueue:
        """The input queue of `step` (and its retry queue), declared if not yet; on `channel`
        (to consume from it) or the publishing channel."""
        assert self.channel is not None and self.exchange is not None
        name = queue_name(flow, step)
        queue = await (channel or self.channel).declare_queue(
            name,
            durable=True,
            arguments={"x-queue-type": "quorum"},
        )
        if (flow, step) not in self._declared:
            key = routing_key(flow, step)
            await queue.bind(self.exchange, key)
            assert self.retry_exchange is not None
            retry = await self.channel.declare_queue(
                f"{name}.retry",
                durable=True,
                arguments={
                    "x-queue-type": "quorum",
                    "x-dead-letter-exchange": EXCHANGE,
                    "x-dead-letter-routing-key": key,
                },
            )
            await retry.bind(self.retry_exchange, key)
            self._declared.add((flow, step))
        return queue

    async def depth(self, flow: str, step: str) -> int:
        """Ready messages in the input queue of `step` (0 when it does not exist)."""
        if self.channel is None or not self.connected.is_set():
            return 0
        queue = await self.declare_step(flow, step)
        result = queue.declaration_result
        return int(result.message_count or 0)

    async def consumers(self, flow: str, step: str) -> int:
        """Consumers of the input queue of `step` (0 when it does not exist)."""
        if self.channel is None or not self.connected.is_set():
            return 0
        queue = await self.declare_step(flow, step)
        return int(queue.declaration_result.consumer_count or 0)

    async def close(self) -> None:
        self._closing = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        for conn in (self.consume_conn, self.conn):
            if conn is not None:
                with contextlib.suppress(Exception):
                    await conn.close()
        self.connected.clear()


def _up(conn: AbstractRobustConnection | None) -> bool:
    """`conn` is open (a robust connection that is reconnecting is not)."""
    if conn is None or conn.is_closed:
        return False
    connected = getattr(conn, "connected", None)
    return connected is None or connected.is_set()


def _reason(exc: BaseException | None) -> str:
    if exc is None:
        return "connection closed"
    text = str(exc) or type(exc).__name__
    return redact(text.splitlines()[0][:300])
