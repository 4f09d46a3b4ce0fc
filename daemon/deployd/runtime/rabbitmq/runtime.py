"""The RabbitMQ runtime: the queues between a flow's steps live in RabbitMQ.

Step processes are placed on this machine (`placement = "local"`) by the same launcher as
the embedded runtime's (shared with it: one fork server, one pool); each action step
consumes its durable quorum queue `deployd.<flow>.<step>` and what it produces is published
with confirms before its input is acked (`router.py`). Snapshots, dead letters and step
counters are kept in the state database, as on the embedded runtime, so they survive
restarts, switches and moves between runtimes. The switch choreography is the embedded
runtime's (`EmbeddedRuntime.switch`): only how queues are handed over differs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from pamqp import commands as spec

from ...config import DaemonConfig, RabbitConfig
from ...errors import FlowError
from ...metrics import Metrics
from ...paths import Paths
from ...store import Store
from ...store.db import Row
from ...store.queues import Queued
from ...types import FlowVersionToRun
from ..base import NO_RUNS, FlowRun, RunNotSupported, RunOutcome, StepFailed
from ..embedded.process import Launcher
from ..embedded.runner import FlowRunner
from ..embedded.runtime import EmbeddedRuntime
from .broker import EXCHANGE, Broker, BrokerUnreachable, properties, redact, routing_key
from .router import AmqpRouter, Inbound, envelope
from .runner import RabbitRunner

log = logging.getLogger("deployd.rabbitmq")
START_WAIT = 3.0  # seconds `start` waits for the broker before going on without it


class RabbitRuntime(EmbeddedRuntime):
    """`runtime/base.py`'s `Runtime`, with queues in RabbitMQ."""

    name = "rabbitmq"

    def __init__(
        self,
        store: Store,
        paths: Paths,
        settings: DaemonConfig,
        metrics: Metrics,
        config: RabbitConfig,
        launcher: Launcher | None = None,
    ) -> None:
        if config.url is None:
            raise FlowError('[runtime.rabbitmq] url is not set (e.g. url = "${DEPLOYD_AMQP_URL}")')
        self.broker = Broker(config.url.get_secret_value())
        self.config = config
        router = AmqpRouter(store, metrics, self.broker)
        super().__init__(store, paths, settings, metrics, router=router, launcher=launcher)
        self.router: AmqpRouter = router
        self.broker.on_reconnect.append(self._reconnected)
        self._steps: set[tuple[str, str]] = set()  # queues of flows that ran here

    async def start(self) -> None:
        await super().start()
        self.broker.start()  # in the background: a broker that is down does not stop us
        # Queue depths are known from the start when the broker answers at once.
        with contextlib.suppress(BrokerUnreachable):
            await self.broker.wait(START_WAIT)
            await self._count_queues()

    async def _count_queues(self) -> None:
        """Depths of every step queue declared before (this daemon is their only consumer
        until its flows run, so the broker's count is all of them)."""
        for flow, step in self.flows.broker_queues():
            self._know(flow, step, await self.broker.depth(flow, step))

    def _know(self, flow: str, step: str, depth: int | None = None) -> None:
        key = (flow, step)
        if key not in self._steps:
            self._steps.add(key)
            with self.store.tx():
                self.flows.add_broker_queue(flow, step)
            if depth is not None:
                self.router.set_depth(flow, step, depth)

    async def close(self) -> None:
        try:
            await super().close()
            await self.router.settle()
        finally:
            await self.broker.close()

    def _reconnected(self) -> None:
        self.router.generation += 1  # loops forget what the old connection delivered

    def describe(self) -> dict[str, Any]:
        return self.broker.describe()

    def _runner_for(self, spec: FlowVersionToRun) -> FlowRunner:
        return RabbitRunner(
            self.launcher,
            self.router,
            self.log_dir,
            spec,
            self.settings.stop_timeout,
            self.settings.max_queue,
            self.config.prefetch,
        )

    async def run_once(self, run: FlowRun, timeout: float) -> RunOutcome:
        raise RunNotSupported(NO_RUNS.format(flow=run.spec.flow))

    def canary_refusal(self, spec: FlowVersionToRun) -> str | None:
        """Two versions of a step on one broker queue need a split of its deliveries this
        runtime does not make yet: a [canary] flow is refused (at `flow apply`, and by a
        publish if the flow came here otherwise), never published at once silently."""
        where = "kubernetes" if self.config.placement == "kubernetes" else "rabbitmq"
        return (
            f"flow {spec.flow}: canary publishes ([canary]) run on the embedded runtime only "
            f"so far, and this flow runs on {where}; remove [canary] from the flow file, or "
            'run it on embedded (runtime = "embedded")'
        )

    async def warm_up(self, spec: FlowVersionToRun, timeout: float) -> FlowRun:
        if spec.http_fed:
            raise StepFailed(
                spec.steps[0].id,
                'builtin = "http" flows run on the embedded runtime only; keep (or move) the '
                "flow on embedded",
            )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        try:
            await self.broker.wait(timeout)
            for step in spec.steps[1:]:
                if (spec.flow, step.id) not in self._steps:  # counted once, then here
                    self._know(spec.flow, step.id, await self.broker.depth(spec.flow, step.id))
        except BrokerUnreachable as exc:
            raise StepFailed(spec.steps[0].id, str(exc)) from None
        except Exception as exc:  # a channel error while declaring
            raise StepFailed(spec.steps[0].id, f"RabbitMQ: {redact(str(exc))}") from None
        return await self._place(spec, max(1.0, deadline - loop.time()))

    async def _place(self, spec: FlowVersionToRun, timeout: float) -> FlowRun:
        """Start the step processes (here: on this machine, by the shared launcher)."""
        return await super().warm_up(spec, timeout)

    def queue_depths(self) -> dict[tuple[str, str], int]:
        return {key: self.router.depth(*key) for key in self._steps}

    async def hand_queues(self, flow: str, steps: list[str]) -> None:
        """Messages in queues of steps the new version does not have go to its first action."""
        await self.router.settle()
        for key in [k for k in self._steps if k[0] == flow and k[1] not in steps]:

            async def put(row: Queued) -> None:
                await self.import_queues(flow, [(steps[1], row)])

            moved = await self._drain(flow, key[1], put)
            if moved:
                log.info("flow %s: %d queued message(s) moved to step %s", flow, moved, steps[1])

    async def import_queues(self, flow: str, rows: list[tuple[str, Queued]]) -> None:
        """Publish (step, message) pairs from another runtime with confirms, in order."""
        await self.broker.wait(self.settings.warmup_timeout)
        for step in {step for step, _row in rows}:
            await self.broker.declare_step(flow, step)
        await self._publish(flow, rows)
        for step, _row in rows:
            self._know(flow, step, 0)
            self.router.add_depth(flow, step, 1)
        self.router.forget_depths(flow)  # wakes the consumers

    async def move_queues_to(self, target: EmbeddedRuntime, flow: str) -> int:
        """Carry `flow`'s messages from the broker to `target`, one at a time: queued there,
        then acked here."""
        await self.router.settle()
        moved = 0
        for _flow, step in sorted(k for k in self._steps if k[0] == flow):

            async def put(row: Queued, step: str = step) -> None:
                await target.import_queues(flow, [(step, row)])

            moved += await self._drain(flow, step, put)
        return moved

    async def _drain(self, flow: str, step: str, put: Callable[[Queued], Awaitable[None]]) -> int:
        """Take every message of `step`'s queue, `put` it elsewhere, then ack it."""
        await self.broker.wait(self.settings.warmup_timeout)
        queue = await self.broker.declare_step(flow, step)
        channel = await queue.channel.get_underlay_channel()
        moved = 0
        while True:
            got = await channel.basic_get(queue.name, no_ack=False)
            if not isinstance(got.delivery, spec.Basic.GetOk):
                break  # GetEmpty: the queue is drained
            message = Inbound(got)
            row = self.router.row(flow, step, message)
            if row is None:
                continue
            self.router.deliveries.pop(row.id, None)
            await put(row)
            await channel.basic_ack(got.delivery.delivery_tag or 0)
            moved += 1
        self.router.set_depth(flow, step, 0)
        return moved

    async def _publish(self, flow: str, rows: list[tuple[str, Queued]]) -> None:
        publish = self.broker.publish
        await asyncio.gather(
            *(
                publish(
                    EXCHANGE,
                    routing_key(flow, step),
                    envelope(row.msg_id, row.body, row.headers, row.passthrough, row.attachments),
                    properties(row.msg_id, _headers(flow, step, row)),
                )
                for step, row in rows
            )
        )

    async def put_back(
        self,
        flow: str,
        letters: list[Row],
        bodies: list[str],
        again: list[tuple[str, int, int, int]],
    ) -> None:
        """Letters to retry are published to their step's queue (confirmed) before they leave
        the state database; their attempts travel in `x-deployd-failures`."""
        await self.router.settle()
        if letters:
            await self.import_queues(
                flow,
                [
                    (
                        str(letter["step"]).removesuffix(":mapper"),
                        Queued(
                            0,
                            str(letter["msg_id"]),
                            _text(body),
                            _text(letter["headers"]),
                            0,
                            int(letter["attempts"]),
                            _text(letter["passthrough"]),
                            _text(letter["attachments"]),
                        ),
                    )
                    for letter, body in zip(letters, bodies, strict=True)
                ],
            )
        with self.store.tx():
            self.router.letters.delete([int(letter["id"]) for letter in letters])
            self.router.letters.failed_again(again)


def _headers(flow: str, step: str, row: Queued) -> dict[str, Any]:
    headers: dict[str, Any] = {
        "messageId": row.msg_id,
        "threadId": row.msg_id,
        "flowId": flow,
        "stepId": step,
    }
    if row.failures:
        headers["x-deployd-failures"] = row.failures
    if row.attempts:
        headers["x-deployd-attempts"] = row.attempts
    return headers


def _text(value: Any) -> str:
    if isinstance(value, str):
        return value
    return json.dumps(value)
