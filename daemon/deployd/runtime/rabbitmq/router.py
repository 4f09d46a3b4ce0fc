"""The RabbitMQ router: what a step produced goes to the broker, what it consumed is acked.

It is the embedded `Router` (same commit rules, mapping, dead letters, rebound limit, group
commit per event-loop tick) with the queue part moved to the broker. A group is made durable
in this order, each step only after the one before it succeeded:

    1. publish every output (persistent, publisher confirms) — and rebounds to the step's
       retry queue — and wait for the broker's confirms;
    2. one SQLite transaction: snapshots, dead letters, step counters, and the ids of the
       messages handled (so a redelivery is recognised: `handled`);
    3. ack every input of the group.

A daemon or connection that dies between 1 and 3 leaves inputs unacked: the broker delivers
them again and the ones recorded in 2 are acked without being handled again. Outputs carry a
message id derived from their input's, so outputs made again for an input handled again are
recognised by the next step the same way (`x-deployd-replay`). A group holds one producing
step's results, and its transaction and acks wait for that step's group before it (what a
group builds on — a snapshot, a call number, handled ids — is its own step's); once one
fails, every group made before the failure was seen fails too (their inputs come again), and
every loop starts from the broker anew (`generation`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import re
import time
from collections import defaultdict
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from aiormq.abc import AbstractChannel as AmqpChannel
from aiormq.abc import DeliveredMessage
from pamqp import commands as spec

from ...metrics import Metrics
from ...store import Store
from ...store.queues import QueueBatch, Queued
from ...types import FlowVersionToRun
from ..embedded.process import Result
from ..embedded.router import Router
from .broker import EXCHANGE, RETRY_EXCHANGE, Broker, properties, redact, routing_key

log = logging.getLogger("deployd.rabbitmq")
dumps = json.JSONEncoder(separators=(",", ":")).encode
CONFIRM_TIMEOUT = 30.0  # seconds a group's publishes may wait for the broker's confirms
KEEP_HANDLED = 24 * 3600.0  # seconds a handled message id is remembered


class Inbound:
    """A message as the broker delivered it: aiormq's delivery, read once, without aio-pika's
    message object (a task and a copy of every property per message, on every message's
    path)."""

    __slots__ = ("body", "channel", "delivery_tag", "headers", "message_id", "redelivered")

    def __init__(self, message: DeliveredMessage) -> None:
        props = message.header.properties
        self.body: bytes = message.body
        self.headers: dict[str, Any] = props.headers or {}
        self.message_id: str | None = props.message_id
        self.redelivered = bool(getattr(message.delivery, "redelivered", False))
        self.delivery_tag: int | None = message.delivery_tag
        self.channel: AmqpChannel = message.channel


@dataclass
class Delivery:
    """An input as the broker delivered it, with what its outputs inherit."""

    message: Inbound
    flow: str
    step: str
    thread: str
    replay: bool  # it may have been handled before (its outputs may repeat earlier ones)
    epoch: int = 0  # the broker connection it came on (`Broker.reconnects`)
    done: bool = False


@dataclass
class _Group:
    batch: QueueBatch
    publishes: list[asyncio.Future[Any]] = field(default_factory=list)
    added: dict[tuple[str, str], int] = field(default_factory=dict)
    removed: dict[tuple[str, str], int] = field(default_factory=dict)
    acks: list[Delivery] = field(default_factory=list)
    processed: dict[tuple[str, str], int] = field(default_factory=dict)
    failed: dict[tuple[str, str], int] = field(default_factory=dict)
    errors: list[tuple[str, str, str]] = field(default_factory=list)
    generation: int = 0  # the router's generation when the group was made
    producer: tuple[str, str] | None = None  # the step whose results it holds


_decoder = json.JSONDecoder()
_space = re.compile(r"[ \t\n\r]*")


def members(text: str) -> dict[str, tuple[Any, str]]:
    """The members of the JSON object `text`, each as (value, its JSON text as it came).

    A message's body, headers, attachments and passthrough are kept and handed on as the text
    the broker delivered (decoded once, to check them), not encoded again. Raises ValueError (as
    `json.loads`) when `text` is not one JSON object."""
    end = len(text)
    i = _space.match(text, 0).end()  # type: ignore[union-attr]
    if i >= end or text[i] != "{":
        raise ValueError("not a JSON object")
    out: dict[str, tuple[Any, str]] = {}
    i = _space.match(text, i + 1).end()  # type: ignore[union-attr]
    if i < end and text[i] == "}":
        return _only(out, text, i + 1)
    while True:
        if i >= end or text[i] != '"':
            raise ValueError(f"expected a member name at character {i}")
        key, i = json.decoder.scanstring(text, i + 1)  # type: ignore[attr-defined]
        i = _space.match(text, i).end()  # type: ignore[union-attr]
        if i >= end or text[i] != ":":
            raise ValueError(f"expected ':' at character {i}")
        i = _space.match(text, i + 1).end()  # type: ignore[union-attr]
        value, j = _decoder.raw_decode(text, i)
        out[key] = (value, text[i:j])
        i = _space.match(text, j).end()  # type: ignore[union-attr]
        if i < end and text[i] == ",":
            i = _space.match(text, i + 1).end()  # type: ignore[union-attr]
            continue
        if i < end and text[i] == "}":
            return _only(out, text, i + 1)
        raise ValueError(f"expected ',' or '}}' at character {i}")


def _only(out: dict[str, tuple[Any, str]], text: str, i: int) -> dict[str, tuple[Any, str]]:
    if text[_space.match(text, i).end() :]:  # type: ignore[union-attr]
        raise ValueError(f"extra data after the object at character {i}")
    return out


def envelope(
    msg_id: str, body: str, headers: str, passthrough: str = "{}", attachments: str = "{}"
) -> bytes:
    """A message as it travels: the seed platform's shape, `{"id", "body", "headers",
    "attachments", "passthrough"}` (the JSON texts as stored, not encoded again)."""
    return b'{"id":%s,"body":%s,"headers":%s,"attachments":%s,"passthrough":%s}' % (
        dumps(msg_id).encode(),
        body.encode(),
        headers.encode(),
        attachments.encode(),
        passthrough.encode(),
    )


class AmqpRouter(Router):
    """The router of the RabbitMQ runtime (see the module docstring)."""

    def __init__(self, store: Store, metrics: Metrics, broker: Broker) -> None:
        super().__init__(store, metrics)
        self.broker = broker
        self.deliveries: dict[int, Delivery] = {}
        self._row_ids = 0
        self._parent: Delivery | None = None
        self._child = 0
        # The last group of each producing step: a group waits for those of its own steps
        # only (a snapshot or a call number builds on the step's previous group), so one
        # step far ahead of the broker's confirms does not hold the acks of the others.
        self._tails: dict[tuple[str, str], asyncio.Task[bool]] = {}
        self._producer: tuple[str, str] | None = None  # the step of the pending group
        self._groups: set[asyncio.Task[bool]] = set()  # every group not settled yet
        self._unsettled: dict[tuple[str, str], dict[str, Any]] = {}  # snapshots in the chain
        self._pruned_at = 0.0
        self._parents: dict[str, Delivery] = {}  # output id → its input, until published
        self._seed: str | None = None  # what a trigger call's output ids derive from
        self._calls: dict[tuple[str, str], int] = {}  # the last call number, per trigger
        self._replayed: dict[tuple[str, str], int] = {}  # calls up to this one are made again
        self._replays: set[str] = set()  # output ids of calls made again, until published
        # Called when a group failed: step processes must be given their snapshot anew (they
        # keep their own copy, which may be ahead of what was recorded).
        self.on_fail: list[Callable[[], None]] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._recording: set[tuple[str, str, str]] = set()  # handled ids not yet written
        self._publishing: dict[tuple[str, str], int] = defaultdict(int)  # flushed, unsettled
        # Inputs of flushed groups not settled yet: they leave their queue's depth when they
        # are handed on, not again (+1) between the flush and the acks.
        self._removing: dict[tuple[str, str], int] = defaultdict(int)

    # -- inputs ----------------------------------------------------------------------------

    def row(self, flow: str, step: str, message: Inbound) -> Queued | None:
        """The broker's delivery as a queued message for the action loop; None when it was
        handled before (then it is acked here) or is not a deployd message (a dead letter)."""
        headers = message.headers or {}
        msg_id = str(message.message_id or headers.get("messageId") or "")
        replay = bool(message.redelivered or headers.get("x-deployd-replay"))
        # Checked for every message, not only those the broker marks redelivered: a message
        # taken with basic.get and returned when its channel closed does not always say so.
        attempts = _int(headers.get("x-deployd-attempts"))
        failures = _int(headers.get("x-deployd-failures"))
        seen = (flow, step, _seen(msg_id, failures, attempts))
        if msg_id and (seen in self._recording or self.flows.was_handled(*seen)):
            log.info("flow %s step %s: message %s was handled already", flow, step, msg_id)
            self._later(_ack(message))
            key = (flow, step)
            self._depth[key] = max(0, self._depth.get(key, 0) - 1)
            return None
        try:
            data = members(message.body.decode())
            if "body" not in data:
                raise ValueError('not an object with "body"')
            body = data["body"][1]
            value, text = data.get("headers", (None, "{}"))
            msg_headers = text if isinstance(value, dict) else "{}"
            value, text = data.get("passthrough", (None, "{}"))
            passthrough = text if isinstance(value, dict) else "{}"
            # an envelope without "attachments" (written before they travelled) has none
            value, text = data.get("attachments", (None, "{}"))
            attachments = text if isinstance(value, dict) and value else "{}"
            msg_id = msg_id or str(data.get("id", (None,))[0] or self._new_id())
        except ValueError as exc:
            self._foreign(flow, step, message, msg_id, str(exc))
            return None
        self._row_ids += 1
        self.deliveries[self._row_ids] = Delivery(
            message,
            flow,
            step,
            str(headers.get("threadId") or msg_id),
            replay,
            self.broker.reconnects,
        )
        return Queued(
            self._row_ids,
            msg_id,
            body,
            msg_headers,
            attempts,
            failures,
            passthrough,
            attachments,
        )

    def _foreign(self, flow: str, step: str, message: Inbound, msg_id: str, why: str) -> None:
        """A message on a step's queue that deployd did not write: a dead letter of the step
        (acked once the letter is written, like any other)."""
        text = message.body.decode("utf-8", "replace")
        error = f'not a deployd message ({why}); expected JSON {{"id", "body", "headers"}}'
        self._row_ids += 1
        self.deliveries[self._row_ids] = Delivery(message, flow, step, msg_id, False)
        self._batch.letters.append(
            (
                flow,
                step,
                msg_id or self._new_id(),
                dumps({"raw": text}),
                "{}",
                None,
                None,
                None,
                error,
                1,
                "[]",
                "{}",
                "{}",
            )
        )
        self._producing((flow, step))
        self._batch.delete.append(self._row_ids)
        self._removed[(flow, step)] += 1
        self._failed[(flow, step)] += 1
        self._errors.append((flow, step, error))
        self._schedule()

    def _producing(self, key: tuple[str, str]) -> None:
        """Results of step `key` come next: a group holds one step's results (it waits only
        for that step's previous group), so the pending one is flushed first if another
        step's results are in it."""
        if self._producer is not None and self._producer != key:
            self.flush()
        self._producer = key

    def _later(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- commits ---------------------------------------------------------------------------

    def commit(
        self, spec: FlowVersionToRun, index: int, res: Result, row: Queued | None = None
    ) -> float | None:
        self._producing((spec.flow, spec.steps[index].id))
        parent = self._parent = self.deliveries.get(row.id) if row is not None else None
        self._child = 0
        # Outputs' ids derive from the input as it came this time: a retried dead letter or
        # a rebound (which come back on purpose) makes new ones, a redelivery the same.
        self._seed = _seen(row.msg_id, row.failures, row.attempts) if row is not None else None
        replay = False
        if row is None and (res.outputs or res.snapshot is not None):
            # A trigger call: its outputs' ids derive from its number, so the call made again
            # after a failed publish (same snapshot, same number) gives them the same ids.
            key = (spec.flow, spec.steps[index].id)
            if key not in self._calls:
                self._calls[key] = self.flows.trigger_call(*key)
            seq = self._calls[key] = self._calls[key] + 1
            self._batch.calls[key] = seq
            self._seed = f"{spec.flow}/{key[1]}/call/{seq}"
            replay = seq <= self._replayed.get(key, 0)
        queued = len(self._batch.enqueue)
        try:
            due = super().commit(spec, index, res, row)
        finally:
            self._parent = None
        self._seed = None
        if parent is not None:
            for entry in self._batch.enqueue[queued:]:
                self._parents[entry[2]] = parent
        elif replay:
            self._replays.update(entry[2] for entry in self._batch.enqueue[queued:])
        if res.snapshot is not None:
            self._unsettled[(spec.flow, spec.steps[index].id)] = res.snapshot
        if row is not None:
            seen = _seen(row.msg_id, row.failures, row.attempts)
            self._batch.handled.append((spec.flow, spec.steps[index].id, seen, time.time()))
            # Until it is written, a copy of it (redelivered meanwhile) is known from here.
            self._recording.add((spec.flow, spec.steps[index].id, seen))
        return due

    def _new_id(self) -> str:
        if self._seed is None:
            return super()._new_id()
        # Derived from the input's id (or the trigger call's number): made again for the
        # same input, it is the same id.
        self._child += 1
        base = self._seed
        return hashlib.blake2b(f"{base}/{self._child}".encode(), digest_size=12).hexdigest()

    def snapshot(self, flow: str, step: str) -> dict[str, Any]:
        key = (flow, step)
        if key in self._batch.snapshots:
            return self._batch.snapshots[key]
        if key in self._unsettled:
            return self._unsettled[key]
        return super().snapshot(flow, step)

    def depth(self, flow: str, step: str) -> int:
        """Messages in the queue of `step` as far as this router knows: counted from the
        broker when the step first ran, then kept here (this daemon is the only producer and
        consumer), publishes not yet confirmed included."""
        key = (flow, step)
        return max(
            0,
            self._depth.get(key, 0)
            + self._publishing.get(key, 0)
            + self._added.get(key, 0)
            - self._removing.get(key, 0)
            - self._removed.get(key, 0),
        )

    def set_depth(self, flow: str, step: str, depth: int) -> None:
        self._depth[(flow, step)] = depth

    def add_depth(self, flow: str, step: str, n: int) -> None:
        """`n` messages were put into the queue of `step` outside a group (confirmed)."""
        self._depth[(flow, step)] = self._depth.get((flow, step), 0) + n

    def forget_depths(self, flow: str) -> None:
        """Queues of `flow` were changed outside the router: the runtime counts them again
        from the broker (`set_depth`); here only who waits is woken."""
        for events in (self._room, self._wake):
            for key, event in events.items():
                if key[0] == flow:
                    event.set()

    def flush(self) -> None:
        """Start making the pending group durable (see the module docstring)."""
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        batch, self._batch = self._batch, QueueBatch()
        group = _Group(batch, generation=self.generation, producer=self._producer)
        self._producer = None
        group.added, self._added = dict(self._added), defaultdict(int)
        group.removed, self._removed = dict(self._removed), defaultdict(int)
        group.processed, self._processed = dict(self._processed), defaultdict(int)
        group.failed, self._failed = dict(self._failed), defaultdict(int)
        group.errors, self._errors = self._errors, []
        for key in group.processed.keys() | group.failed.keys():  # the step counters
            batch.stats[key] = [group.processed.get(key, 0), group.failed.get(key, 0), None]
        for flow, step, error in group.errors:
            batch.stats[(flow, step)][2] = error
        if not batch:
            return
        for row_id in batch.delete:
            delivery = self.deliveries.pop(row_id, None)
            if delivery is not None:
                group.acks.append(delivery)
        rebounds = []
        for due, row_id in batch.defer:
            delivery = self.deliveries.pop(row_id, None)
            if delivery is not None:
                group.acks.append(delivery)
                rebounds.append((due, delivery))
        if (batch.enqueue or batch.defer) and (
            self.broker.exchange is None or not self.broker.connected.is_set()
        ):
            self._fail(group, "RabbitMQ is not connected")
            return
        # Publish now (in order: each publish writes its frames when its task first runs, and
        # tasks run in the order they were made); the chain waits for the confirms.
        loop = asyncio.get_running_loop()
        publish = self.broker.publish
        last = len(batch.enqueue) - 1
        for i, (flow, step, msg_id, body, headers, failures, passthrough, files) in enumerate(
            batch.enqueue
        ):
            group.publishes.append(
                loop.create_task(
                    publish(
                        EXCHANGE,
                        routing_key(flow, step),
                        envelope(msg_id, body, headers, passthrough, files),
                        self._properties(flow, step, msg_id, failures),
                        drain=i == last and not rebounds,
                    )
                )
            )
        for due, delivery in rebounds:
            group.publishes.append(loop.create_task(self._rebound(delivery, due)))
        batch.enqueue, batch.delete, batch.defer = [], [], []
        self._parents.clear()
        self._replays.clear()
        for key, n in group.added.items():
            self._publishing[key] += n
        for key, n in group.removed.items():
            self._removing[key] += n
        producer = group.producer
        prev = self._tails.get(producer) if producer is not None else None
        task = loop.create_task(self._settle_group(prev, group))
        if producer is not None:
            self._tails[producer] = task
        self._groups.add(task)
        task.add_done_callback(self._groups.discard)

    def _properties(
        self, flow: str, step: str, msg_id: str, failures: int
    ) -> spec.Basic.Properties:
        parent = self._parents.get(msg_id)
        amqp: dict[str, Any] = {"messageId": msg_id, "flowId": flow, "stepId": step}
        if parent is not None:
            amqp["parentMessageId"] = parent.message.message_id
            amqp["threadId"] = parent.thread
            if parent.replay:
                amqp["x-deployd-replay"] = 1
        else:
            amqp["threadId"] = msg_id
            if msg_id in self._replays:
                amqp["x-deployd-replay"] = 1
        if failures:
            amqp["x-deployd-failures"] = failures
        return properties(msg_id, amqp)

    async def _rebound(self, delivery: Delivery, due: float) -> None:
        """A message that asked to come again later: to its step's retry queue, with a TTL."""
        message = delivery.message
        headers = dict(message.headers or {})
        headers["x-deployd-attempts"] = _int(headers.get("x-deployd-attempts")) + 1
        await self.broker.publish(
            RETRY_EXCHANGE,
            routing_key(delivery.flow, delivery.step),
            message.body,
            properties(str(message.message_id or ""), headers, due - time.time()),
        )

    async def _settle_group(self, prev: asyncio.Task[bool] | None, group: _Group) -> bool:
        try:
            return await self._settle(prev, group)
        finally:
            for key, n in group.added.items():
                self._publishing[key] -= n
            for key, n in group.removed.items():
                self._removing[key] -= n
            task = asyncio.current_task()
            if group.producer is not None and self._tails.get(group.producer) is task:
                del self._tails[group.producer]

    async def _settle(self, prev: asyncio.Task[bool] | None, group: _Group) -> bool:
        ok = True
        error = ""
        try:
            if group.publishes:
                await asyncio.wait_for(asyncio.gather(*group.publishes), CONFIRM_TIMEOUT)
        except TimeoutError:
            ok, error = False, f"no publisher confirm within {CONFIRM_TIMEOUT:g}s"
        except Exception as exc:  # a nack, a closed channel or connection
            ok, error = False, redact(str(exc) or type(exc).__name__)
        if prev is not None:
            with contextlib.suppress(BaseException):  # its own failure is handled in it
                await asyncio.shield(prev)
        if ok and group.generation != self.generation:
            # A group made before this one failed after this one was made: this one's
            # results may build on it (a snapshot, a call number), so it fails too.
            ok, error = False, "an earlier group failed"
        if not ok:
            self._fail(group, error)
            return False
        try:
            self._write(group.batch)
        except Exception:
            log.exception("recording a group of results failed; they will be delivered again")
            self._fail(group, "the state database write failed")
            return False
        self._recorded(group)
        for delivery in group.acks:
            if not delivery.done:
                delivery.done = True
                await _ack(delivery.message)
        self._settled(group)
        return True

    def _write(self, batch: QueueBatch) -> None:
        stats = batch.stats
        if not (batch.snapshots or batch.letters or batch.handled or stats or batch.refs):
            return
        with self.store.tx():
            self.flows.commit_batch(batch)
            now = time.time()
            if now - self._pruned_at > 600:
                self._pruned_at = now
                self.flows.prune_handled(now - KEEP_HANDLED)

    def _fail(self, group: _Group, error: str) -> None:
        """Nothing of `group` was made durable: its inputs go back to the broker (in order),
        its snapshots are read anew, every action loop starts from the broker again."""
        for task in group.publishes:
            task.cancel()
        self._recorded(group)
        nacks = [d for d in group.acks if not d.done]
        for delivery in nacks:
            delivery.done = True
        if nacks:
            self._later(_nack_all([d.message for d in nacks]))
        if group.generation != self.generation:
            return  # it fails because an earlier one did, which did what follows already
        log.warning(
            "publishing to RabbitMQ failed (%s); %d message(s) will be delivered again",
            error,
            len(group.acks),
        )
        for key in group.batch.calls:
            # Calls from the last recorded one on are made again: their outputs may be on
            # the broker already, so they say so (the next step then checks their ids).
            self._replayed[key] = max(self._replayed.get(key, 0), self._calls.get(key, 0))
            self._calls.pop(key, None)
        self._unsettled.clear()
        self._snapshots.clear()
        self.generation += 1
        for callback in list(self.on_fail):
            callback()
        if self._batch:
            # Results not flushed yet may build on what failed (a snapshot, a call number):
            # they fail with it.
            pending = self._batch
            self._batch = QueueBatch()
            self._added.clear()
            self._removed.clear()
            rest = _Group(pending, generation=self.generation - 1)
            rest.acks = [d for i in pending.delete if (d := self.deliveries.pop(i, None))]
            rest.acks += [d for _due, i in pending.defer if (d := self.deliveries.pop(i, None))]
            self._fail(rest, "an earlier group failed")
        for key in group.batch.snapshots:
            self._snapshots.pop(key, None)

    def _recorded(self, group: _Group) -> None:
        """The handled ids of `group` are written (or will never be): off the pending set."""
        for flow, step, seen, _at in group.batch.handled:
            self._recording.discard((flow, step, seen))

    def _settled(self, group: _Group) -> None:
        for key, data in group.batch.snapshots.items():
            self._snapshots[key] = data
            if self._unsettled.get(key) is data:
                del self._unsettled[key]
        for key, n in group.added.items():
            self._depth[key] = self._depth.get(key, 0) + n
            self._wake[key].set()
        for key, n in group.removed.items():
            # Not clamped at 0: a consumer's group may settle before its producer's (they
            # are not chained), whose messages count in `_publishing` until then.
            self._depth[key] = self._depth.get(key, 0) - n
            self._room[key].set()
        for (flow, step), n in group.processed.items():
            self.metrics.message_processed(flow, step, n)
        for (flow, step), n in group.failed.items():
            self.metrics.message_failed(flow, step, n)
        for flow, step, error in group.errors[:5]:
            log.warning("flow %s step %s: %s", flow, step, error.splitlines()[0][:500])
        if len(group.errors) > 5:
            log.warning(
                "… and %d more failed message(s) (see `deployd flow errors`)",
                len(group.errors) - 5,
            )

    async def settle(self) -> bool:
        """Flush, then wait until every group so far is durable (False: one failed)."""
        self.flush()
        groups = list(self._groups)
        if not groups:
            return True
        # Shielded: a caller that is cancelled while it waits must not cancel a group (later
        # groups wait for it).
        results = await asyncio.shield(asyncio.gather(*groups, return_exceptions=True))
        return all(result is True for result in results)


async def _ack(message: Inbound) -> None:
    """Ack, ignoring a channel that is gone (the broker then delivers the message again, and
    `handled` recognises it). Not waiting for the socket to drain: acks of a group are written
    back to back."""
    with contextlib.suppress(Exception):
        await message.channel.basic_ack(message.delivery_tag, wait=False)  # type: ignore[arg-type]


async def _nack(message: Inbound) -> None:
    """Back to its queue (a channel that is gone gives it back by itself)."""
    with contextlib.suppress(Exception):
        await message.channel.basic_nack(message.delivery_tag, requeue=True)  # type: ignore[arg-type]


async def _nack_all(messages: list[Inbound]) -> None:
    for message in messages:
        await _nack(message)


def _seen(msg_id: str, failures: int, attempts: int) -> str:
    """What `handled` records of a message: its id, and how often it came back on purpose (a
    retried dead letter, a rebound) — those are handled again; a redelivery is not."""
    return msg_id if not (failures or attempts) else f"{msg_id}:{failures}:{attempts}"


def _int(value: Any) -> int:
    """A counter header as an int (0 when missing or not a number)."""
    try:
        return int(value or 0)
    except (TypeError, ValueError):
        return 0
