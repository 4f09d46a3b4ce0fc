"""One running flow version on the RabbitMQ runtime: the embedded `FlowRunner` (processes,
supervision, trigger loop, backpressure, switch hooks) whose action loops consume from the
broker instead of the SQLite file.

Each action loop pulls from its step's quorum queue only what it hands to the step process
(up to `prefetch` unacked), so a switch is simple: the old version's loop finishes what it
holds, then the new version's loop pulls the next message — nothing is returned to the
broker, so the order survives (a quorum queue puts a returned message at its end). A step
process that dies gets its unfinished messages again, in order, from the loop's buffer (the
broker does not need to know).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from pathlib import Path

from aio_pika.abc import AbstractQueue

from ...store.queues import Queued
from ...types import FlowVersionToRun
from ..embedded.process import Launcher, Result, StepDied, StepProcess, forget
from ..embedded.runner import AHEAD_BUDGET, FlowRunner, _either
from .broker import Broker
from .router import AmqpRouter, Delivery

log = logging.getLogger("deployd.rabbitmq")
GET_TIMEOUT = 10.0  # seconds a basic.get may take before the queue counts as not answering
IDLE_POLL = 1.0  # an idle step looks for messages from elsewhere this often (seconds)


class Consumer:
    """Takes messages of one step's queue from the broker, as many as the action loop can
    hand on, in order.

    It pulls (`basic.get`, several at once) rather than having the broker push: a pushed
    message that was not handed on when the loop stops would have to be returned, and a
    quorum queue puts returned messages at its end — the order of the step's queue would
    not survive a switch or a held step. The router wakes it when it publishes to the
    queue; otherwise an idle step looks every IDLE_POLL seconds (messages from elsewhere:
    rebounds coming back, other producers).
    """

    def __init__(self, router: AmqpRouter, flow: str, step: str) -> None:
        self.router = router
        self.flow = flow
        self.step = step
        self.buffer: collections.deque[Queued] = collections.deque()
        self.queue: AbstractQueue | None = None
        self.empty = False  # the last pull found the queue empty

    async def start(self) -> None:
        self.queue = await self.router.broker.declare_step(self.flow, self.step)
        # What the step's previous loop had taken and not handed on comes first.
        self.buffer.extend(self.router.leftovers.pop((self.flow, self.step), ()))

    async def fill(self, want: int, stop: asyncio.Event) -> None:
        """Pull up to `want` messages into the buffer (fewer when the queue has fewer), one
        get after the other, none once `stop` is set: a get sent before a switch's new
        trigger published anything cannot return what it published (one channel, in order)."""
        queue = self.queue
        if queue is None or not self.router.broker.connected.is_set():
            self.empty = True
            return
        self.empty = False
        for _ in range(want):
            if stop.is_set():
                return
            try:
                message = await queue.get(no_ack=False, fail=False, timeout=GET_TIMEOUT)
            except TimeoutError:
                # A quorum queue without a leader does not answer (RabbitMQ 3.10, after a
                # crash right after its declaration: README); the loop tries again later.
                log.warning(
                    "flow %s step %s: queue %s does not answer within %gs (no quorum leader?)",
                    self.flow,
                    self.step,
                    queue.name,
                    GET_TIMEOUT,
                )
                self.empty = True
                return
            except Exception as exc:  # the channel or connection broke: pulled again later
                log.debug("flow %s step %s: pulling failed: %s", self.flow, self.step, exc)
                self.empty = True
                return
            if message is None:
                self.empty = True
                return
            row = self.router.row(self.flow, self.step, message)
            if row is not None:
                self.buffer.append(row)

    def drop_stale(self) -> None:
        """After a reconnect the broker gives every unacked message again: what was pulled
        on the old connection is forgotten (its acks could not arrive anyway)."""
        epoch = self.router.broker.reconnects
        deliveries = self.router.deliveries
        keep = collections.deque(r for r in self.buffer if _epoch(deliveries, r.id) == epoch)
        for row in self.buffer:
            if _epoch(deliveries, row.id) != epoch:
                deliveries.pop(row.id, None)
        self.buffer = keep

    async def close(self) -> None:
        """What was taken and not handed on (the unfinished messages of a step that died
        while it was being stopped) is kept for the step's next loop, first in line: given
        back to the broker, it would go to the end of the queue."""
        if self.buffer:
            key = (self.flow, self.step)
            self.router.leftovers.setdefault(key, collections.deque()).extend(self.buffer)
            self.buffer.clear()
        await self.router.settle()


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
        consumer = Consumer(self.router, self.flow, step.id)
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
        wake = self.router.waker(self.flow, step.id)
        ahead = 1
        pace: float | None = None
        generation = self.router.generation
        proc: StepProcess | None = None
        due: float | None = None  # when the earliest rebound of this loop comes back
        while True:
            if generation != self.router.generation and not inflight:
                # A group failed or the connection was replaced: the broker gives every
                # unacked message again, so what was pulled before is stale.
                generation = self.router.generation
                consumer.drop_stale()
            if not inflight and stop.is_set():
                return
            if (
                not stop.is_set()
                and len(inflight) <= ahead // 2
                and await self._room_for(index, len(inflight), stop)
            ):
                if not inflight:
                    proc = await self._live_proc(step.id, stop)
                if proc is not None and proc is self.procs.get(step.id):
                    room = min(ahead, len(inflight) + self._space(index, len(inflight)))
                    wake.clear()
                    await consumer.fill(room - len(inflight) - len(consumer.buffer), stop)
                    # handed on even if a stop came meanwhile: taken, they belong to this loop
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
                elif consumer.empty and not consumer.buffer:
                    wait = IDLE_POLL
                    if due is not None:
                        wait = min(wait, max(0.005, due - time.time()))
                        due = None if due <= time.time() else due
                    await _either(wake, stop, wait)
                continue
            try:
                await inflight[0][1]
                while inflight and inflight[0][1].done():
                    row, fut = inflight.popleft()
                    res = fut.result()
                    pace = res.took if pace is None else pace * 0.8 + res.took * 0.2
                    again = self.router.commit(self.spec, index, res, row)
                    if again is not None:
                        due = again if due is None else min(due, again)
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
                inflight.append((row, proc.submit_msg(row, snapshot)))
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
