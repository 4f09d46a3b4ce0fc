"""What step pods report back to deployd: their snapshots and their dead letters.

A pod has no database. What the daemon-side router records for steps on this machine — a
step's snapshot, a message whose handling failed — a pod publishes, confirmed, to its flow's
records queue before it acks the input (or before its trigger's next call):

    deployd.<flow>.records    quorum queue; header `x-deployd-record`: "snapshot" | "dead";
                              `stepId`, `flowVersion`; the body JSON (below)

    snapshot  {"data": {...}}                          the step's whole snapshot after a call
    dead      {"message": {id, body, headers, passthrough, attachments}, "error": "…"}

`Records` (the daemon's side) consumes each such queue of a flow placed on Kubernetes, one
record at a time: a snapshot replaces the step's row of `snapshots`, a dead letter becomes a
row of `dead_letters` (so `deployd flow errors`, retry and discard work as everywhere), each in
one transaction, then acked. A record delivered again (the daemon died between its commit and
its ack) is recognised by its message id and written once.

A pod reads its step's snapshot once, before its first call or message, from
`GET /api/v1/snapshots/{flow}/{step}` (its flow version's artifact token). At a switch the
daemon opens the new trigger's start gate only after the old trigger's pod is gone and its
flow's records queue is drained (`drained`), so the new trigger starts from the old one's last
snapshot.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import TYPE_CHECKING, Any

from ...store import Store
from ...store.queues import QueueBatch, QueueStore
from ..rabbitmq.broker import Broker

if TYPE_CHECKING:
    from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue

log = logging.getLogger("deployd.kubernetes")
KIND_HEADER = "x-deployd-record"
DRAIN_RPC_TIMEOUT = 5.0  # seconds one look at a queue's depth may take
DRAIN_POLL = 0.05  # seconds between looks at a records queue's depth while draining


def records_queue(flow: str) -> str:
    """The name of `flow`'s records queue."""
    return f"deployd.{flow}.records"


class Records:
    """The daemon's consumers of the records queues (see the module docstring)."""

    def __init__(self, store: Store, broker: Broker) -> None:
        self.store = store
        self.broker = broker
        self.queues = QueueStore(store)
        self.flows: dict[str, tuple[AbstractChannel, AbstractQueue]] = {}
        self.versions: dict[tuple[str, int, str], tuple[str, int]] = {}  # → component, version
        self.busy: dict[str, int] = {}  # records being written, per flow
        self.broker.on_reconnect.append(self._reconnected)
        self._restarts: set[asyncio.Task[None]] = set()

    def know(self, flow: str, version: int, step: str, component: str, number: int) -> None:
        """Which component version a flow version's step runs (for its dead letters)."""
        self.versions[(flow, version, step)] = (component, number)

    async def follow(self, flow: str) -> None:
        """Consume `flow`'s records queue (once; again after a reconnect)."""
        if flow in self.flows:
            return
        channel = await self.broker.consumer_channel()
        await channel.set_qos(prefetch_count=1)  # one at a time: a step's snapshots in order
        queue = await channel.declare_queue(
            records_queue(flow), durable=True, arguments={"x-queue-type": "quorum"}
        )
        self.flows[flow] = (channel, queue)
        await queue.consume(lambda message: self._on_record(flow, message))

    def _reconnected(self) -> None:
        flows, self.flows = list(self.flows), {}
        task = asyncio.get_running_loop().create_task(self._refollow(flows))
        self._restarts.add(task)
        task.add_done_callback(self._restarts.discard)

    async def _refollow(self, flows: list[str]) -> None:
        delay = 0.2
        pending = list(flows)
        while pending:
            flow = pending[0]
            try:
                await self.broker.wait(10)
                await self.follow(flow)
                pending.pop(0)
            except Exception as exc:
                log.info("flow %s: consuming its records again failed (%s); retrying", flow, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def _on_record(self, flow: str, message: AbstractIncomingMessage) -> None:
        self.busy[flow] = self.busy.get(flow, 0) + 1
        try:
            try:
                self._write(flow, message)
            except Exception:
                log.exception("flow %s: a record from a pod could not be written", flow)
                await message.nack(requeue=True)
                return
            await message.ack()
        finally:
            self.busy[flow] -= 1

    def _write(self, flow: str, message: AbstractIncomingMessage) -> None:
        headers = dict(message.headers or {})
        kind = str(headers.get(KIND_HEADER) or "")
        step = str(headers.get("stepId") or "")
        try:
            data: Any = json.loads(message.body)
        except ValueError:
            data = None
        if not step or not isinstance(data, dict) or kind not in ("snapshot", "dead"):
            log.warning("flow %s: a record that is not deployd's was dropped (%s)", flow, kind)
            return
        if kind == "snapshot":
            with self.store.tx():
                self.queues.save_snapshot(flow, step, dict(data.get("data") or {}))
            return
        found = data.get("message")
        msg: dict[str, Any] = found if isinstance(found, dict) else {}
        msg_id = str(msg.get("id") or message.message_id or "")
        version = _int(headers.get("flowVersion"))
        component, number = self.versions.get((flow, version, step), (None, None))
        error = str(data.get("error") or "failed")
        with self.store.tx():
            if self.store.one(
                "SELECT 1 FROM dead_letters WHERE flow = ? AND step = ? AND msg_id = ?"
                " AND error = ?",
                (flow, step, msg_id, error),
            ):
                return  # delivered again after it was written: once is enough
            # The one write path of dead letters (the INSERT and its dead_letters.added
            # event), as for the steps on this machine.
            self.queues.commit_batch(
                QueueBatch(
                    letters=[
                        (
                            flow,
                            step,
                            msg_id,
                            json.dumps(msg.get("body")),
                            json.dumps(msg.get("headers") or {}),
                            version or None,
                            component,
                            number,
                            error,
                            1 + _int(headers.get("x-deployd-failures")),
                            "[]",  # a pod reports no emitted outputs
                            json.dumps(msg.get("passthrough") or {}),
                            json.dumps(msg.get("attachments") or {}),
                        )
                    ]
                )
            )

    async def drained(self, flow: str, timeout: float) -> bool:
        """Whether `flow`'s records queue was emptied (all written) within `timeout`."""
        follow = self.flows.get(flow)
        if follow is None:
            return True
        channel, queue = follow
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        empty = 0  # looks in a row that saw nothing queued and nothing being written
        while True:
            with contextlib.suppress(Exception):
                declared = await asyncio.wait_for(
                    channel.declare_queue(queue.name, passive=True), DRAIN_RPC_TIMEOUT
                )
                count = declared.declaration_result.message_count or 0
                empty = empty + 1 if count == 0 and not self.busy.get(flow) else 0
                if empty >= 2:  # twice: not a delivery on its way to its callback
                    return True
            if loop.time() >= deadline:
                return False
            await asyncio.sleep(DRAIN_POLL)

    async def close(self) -> None:
        for task in list(self._restarts):
            task.cancel()
        for channel, _queue in self.flows.values():
            with contextlib.suppress(Exception):
                await channel.close()
        self.flows.clear()


def _int(value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0
