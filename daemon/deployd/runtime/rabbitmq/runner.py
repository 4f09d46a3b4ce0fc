"""One running flow version on the RabbitMQ runtime: the embedded `FlowRunner` (processes,
supervision, trigger loop, backpressure, switch hooks) whose action loops consume from the
broker instead of the SQLite file.

Each action loop consumes its step's quorum queue on a channel of its own, at most `prefetch`
unacked. A switch: the old version's loop finishes what it handed on, its results are acked,
and closing its channel gives back what it was sent beyond that — first in line again, so
the new version's loop takes the queue in order. A step process that dies gets its
unfinished messages again, in order, from the loop's buffer (the broker does not need to
know).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from pathlib import Path

from aio_pika.abc import AbstractChannel
from aiormq.abc import DeliveredMessage

from ...store.queues import Queued
from ...types import FlowVersionToRun
from ..embedded.process import Launcher, Result, StepDied, StepProcess, forget
from ..embedded.runner import AHEAD_BUDGET, FlowRunner, _either
from .broker import Broker, redact
from .router import AmqpRouter, Delivery, Inbound

log = logging.getLogger("deployd.rabbitmq")
CLOSE_TIMEOUT = 10.0  # seconds a consumer's channel may take to close
IDLE_POLL = 1.0  # an idle loop looks again this often (a reconnect is seen within it)


class Consumer:
    """The broker's deliveries of one step's queue for one action loop, in order.

    The broker pushes (`basic.consume` on a channel of the loop's own on the consuming connection,
    at most `prefetch` unacked). When the loop stops, what it was sent and did not hand on goes back
    by closing that channel, after every result was acked: a quorum queue delivers what a closed
    channel gave back first again, in order (a nack would put it at the end; tests/test_broker.py
    pins both). So the order survives switches and stops, and the next loop — of the same version or
    the next — gets those messages first.
    """

    def __init__(self, router: AmqpRouter, flow: str, step: str, prefetch: int) -> None:
        self.router = router
        self.flow = flow
        self.step = step
        self.prefetch = prefetch
        self.buffer: collections.deque[Queued] = collections.deque()
        self.arrived = asyncio.Event()
        self.channel: AbstractChannel | None = None
        self.closed = False
        # Its channel was closed under it (by the broker: a channel error, its consumer
        # timeout; or with the connection): the loop consumes anew on a new channel.
        self.lost = False
        self.epoch = router.broker.reconnects  # the connection it consumes on

    async def start(self) -> None:
        broker = self.router.broker
        self.closed = False
        self.lost = False
        self.channel = await broker.consumer_channel()
        self.channel.close_callbacks.add(self._on_close)
        await self.channel.set_qos(prefetch_count=self.prefetch)
        queue = await broker.declare_step(self.flow, self.step, self.channel)
        # aiormq's consumer directly: aio-pika's wraps each delivery in a message object and
        # one more task before the callback runs.
        underlay = await self.channel.get_underlay_channel()
        await underlay.basic_consume(queue.name, self._on_message)

    def _on_close(self, _channel: object, exc: BaseException | None = None) -> None:
        if self.closed:
            return  # closed by us
        log.warning(
            "flow %s step %s: its consumer channel was closed (%s); consuming again",
            self.flow,
            self.step,
            redact(str(exc) or type(exc).__name__) if exc is not None else "no reason given",
        )
        self.lost = True
        self.arrived.set()

    async def restart(self, stop: asyncio.Event) -> None:
        """After a reconnect, or when its channel was closed under it: a consumer of our own
        again, on a new channel (the client's own restore can fail for good while a quorum
        queue has no leader yet, just after the broker restarted, and it does not restore a
        consumer it did not make), retried with back-off until it works or the loop stops.
        What came on the old channel is forgotten: the broker gives it again."""
        lost = self.lost
        self.closed = True
        if self.channel is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.channel.close(), CLOSE_TIMEOUT)
        self.drop_stale(everything=lost)
        delay = 0.2
        while not stop.is_set():
            try:
                await self.router.broker.wait(CLOSE_TIMEOUT)
                await asyncio.wait_for(self.start(), CLOSE_TIMEOUT)
                self.epoch = self.router.broker.reconnects
                return
            except Exception as exc:
                log.info(
                    "flow %s step %s: consuming again failed (%s); retrying",
                    self.flow,
                    self.step,
                    exc,
                )
                await _either(stop, stop, delay)
                delay = min(delay * 2, 5.0)

    async def _on_message(self, message: DeliveredMessage) -> None:
        if self.closed:
            return  # not taken: it goes back with the channel
        row = self.router.row(self.flow, self.step, Inbound(message))
        if row is not None:
            self.buffer.append(row)
            self.arrived.set()

    def drop_stale(self, everything: bool = False) -> None:
        """After a reconnect the broker gives every unacked message again: what came on the
        old connection is forgotten (its acks could not arrive anyway) — with `everything`,
        all of the buffer (its channel was closed under it: all came on that channel)."""
        epoch = self.router.broker.reconnects
        deliveries = self.router.deliveries

        def fresh(row: Queued) -> bool:
            return not everything and _epoch(deliveries, row.id) == epoch

        keep = collections.deque(r for r in self.buffer if fresh(r))
        for row in self.buffer:
            if not fresh(row):
                deliveries.pop(row.id, None)
        self.buffer = keep

    async def close(self) -> None:
        """Every result made durable and acked, then the channel closed: what was sent and
        not handed on is delivered again first, to whichever loop consumes next."""
        self.closed = True
        await self.router.settle()
        for row in self.buffer:
            self.router.deliveries.pop(row.id, None)
        self.buffer.clear()
        if self.channel is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.channel.close(), CLOSE_TIMEOUT)


def _epoch(deliveries: dict[int, Delivery], row_id: int) -> int:
    delivery = deliveries.get(row_id)
    return -1 if delivery is None else delivery.epoch


class RabbitRunner(FlowRunner):
    """A flow version whose queues live in RabbitMQ (its `FlowRun`)."""

    router: AmqpRouter

    def __init__(
        self,
        launcher: Launcher,
        router: AmqpRouter,
        log_dir: Path,
        spec: FlowVersionToRun,
        drain_timeout: float,
        max_queue: int,
        prefetch: int,
    ) -> None:
        super().__init__(launcher, router, log_dir, spec, drain_timeout, max_queue)
        self.prefetch = prefetch
        self.broker: Broker = router.broker
        self.consumers: dict[str, Consumer] = {}  # each action loop's, by step id
        router.on_fail.append(self._forget_snapshots)

    def _forget_snapshots(self) -> None:
        """A group failed: what the step processes keep of their snapshot may be ahead of what
        was recorded, so the next request gives them the recorded one."""
        for proc in self.procs.values():
            proc.snap = None

    def _full(self, index: int, inflight: int) -> bool:
        # With the broker gone nothing can be made durable: hold the step (and so its
        # producers) until it is back, as if its next queue were full.
        if not self.broker.connected.is_set():
            return True
        return super()._full(index, inflight)

    async def _room_for(self, index: int, inflight: int, stop: asyncio.Event) -> bool:
        if self.broker.connected.is_set() or inflight:
            return await super()._room_for(index, inflight, stop)
        step_id = self.steps[index].id
        if self.held_since.get(step_id) is None:
            self.held_since[step_id] = asyncio.get_running_loop().time()
        while not self.broker.connected.is_set() and not stop.is_set():
            await _either(self.broker.connected, stop, IDLE_POLL)
        return await super()._room_for(index, inflight, stop)

    async def _deliver(
        self,
        index: int,
        stop: asyncio.Event,
        inflight: collections.deque[tuple[Queued, asyncio.Future[Result]]],
    ) -> None:
        step = self.steps[index]
        prefetch = max(1, min(step.prefetch, self.prefetch))
        while not self.broker.connected.is_set():
            if stop.is_set():
                return
            await _either(self.broker.connected, stop, IDLE_POLL)
        consumer = self.consumers[step.id] = Consumer(self.router, self.flow, step.id, prefetch)
        try:
            await consumer.start()
            await self._consume(index, stop, inflight, consumer, prefetch)
        finally:
            for _row, fut in inflight:
                forget(fut)
            # Rows still in flight were not committed: first in line again, before the buffer.
            consumer.buffer.extendleft(reversed([row for row, _ in inflight]))
            inflight.clear()
            await consumer.close()

    async def _consume(
        self,
        index: int,
        stop: asyncio.Event,
        inflight: collections.deque[tuple[Queued, asyncio.Future[Result]]],
        consumer: Consumer,
        prefetch: int,
    ) -> None:
        step = self.steps[index]
        ahead = 1
        pace: float | None = None
        generation = self.router.generation
        proc: StepProcess | None = None
        while True:
            if consumer.lost and not inflight:
                await consumer.restart(stop)
            if generation != self.router.generation and not inflight:
                # A group failed or the connection was replaced: the broker gives every
                # unacked message again, so what came before is stale.
                generation = self.router.generation
                if consumer.epoch != self.broker.reconnects:
                    await consumer.restart(stop)  # it notes the connection's epoch
                else:
                    consumer.drop_stale()
            if not inflight and stop.is_set():
                return
            if (
                not stop.is_set()
                and not consumer.lost
                and len(inflight) <= ahead // 2
                and await self._room_for(index, len(inflight), stop)
            ):
                if not inflight:
                    proc = await self._live_proc(step.id, stop)
                if proc is not None and proc is self.procs.get(step.id):
                    room = min(ahead, len(inflight) + self._space(index, len(inflight)))
                    await self._hand_rows(proc, room, inflight, consumer.buffer)
            if not inflight:
                if stop.is_set():
                    continue
                if self.held_since.get(step.id) is not None:
                    await _either(
                        self.router.room(self.flow, self.steps[index + 1].id)
                        if index + 1 < len(self.steps)
                        else stop,
                        stop,
                        0.05,
                    )
                else:
                    consumer.arrived.clear()
                    if not consumer.buffer:
                        await _either(consumer.arrived, stop, IDLE_POLL)
                continue
            try:
                await inflight[0][1]
                while inflight and inflight[0][1].done():
                    row, fut = inflight.popleft()
                    res = fut.result()
                    pace = res.took if pace is None else pace * 0.8 + res.took * 0.2
                    self.router.commit(self.spec, index, res, row)
            except StepDied:
                for _row, other in inflight:
                    forget(other)
                consumer.buffer.extendleft(reversed([row for row, _ in inflight]))
                inflight.clear()
                if proc is not None:
                    await self._gone(proc)
                continue
            if pace is not None:
                ahead = max(1, min(prefetch, int(AHEAD_BUDGET / max(pace, 1e-6))))

    async def _hand_rows(
        self,
        proc: StepProcess,
        target: int,
        inflight: collections.deque[tuple[Queued, asyncio.Future[Result]]],
        buffer: collections.deque[Queued],
    ) -> None:
        want = min(target - len(inflight), len(buffer))
        if want <= 0:
            return
        snapshot = self.router.snapshot(self.flow, proc.step_id)
        sent = len(inflight)
        try:
            for _ in range(want):
                row = buffer[0]
                inflight.append((row, self.submit(proc, row, snapshot)))
                buffer.popleft()
            await proc.drain()
        except StepDied:
            if len(inflight) == sent:
                await self._gone(proc)

    async def stop(self, timeout: float = 10.0) -> None:
        with contextlib.suppress(ValueError):
            self.router.on_fail.remove(self._forget_snapshots)
        await super().stop(timeout)
        with contextlib.suppress(Exception):
            await self.router.settle()
