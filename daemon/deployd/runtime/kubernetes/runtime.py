"""The RabbitMQ runtime with placement = "kubernetes": the queues in RabbitMQ as before, the
step processes as Deployments placed by `placement.KubePlacement` (see there for warm-up,
switch, rollback and reconciliation)."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from ...config import DaemonConfig, KubernetesConfig, RabbitConfig
from ...metrics import Metrics
from ...paths import Paths
from ...store import Store
from ...types import FlowVersionToRun
from ..base import FlowRun
from ..embedded.process import Launcher
from ..embedded.runtime import EmbeddedRuntime
from ..rabbitmq.broker import BrokerUnreachable, properties, redact
from ..rabbitmq.runtime import RabbitRuntime
from . import hooks
from .placement import KubePlacement, KubeRun
from .records import Records

log = logging.getLogger("deployd.kubernetes")
DRAIN_TIMEOUT = 10.0  # seconds a switch waits for the records of the old trigger
CONSUMER_POLL = 0.02  # seconds between looks at a queue's consumers after its pods went
DEPTH_EVERY = 1.0  # seconds between counts of the queues of flows on Kubernetes


class KubeRuntime(RabbitRuntime):
    """`runtime/base.py`'s `Runtime`: queues in RabbitMQ, steps on Kubernetes."""

    def __init__(
        self,
        store: Store,
        paths: Paths,
        settings: DaemonConfig,
        metrics: Metrics,
        config: RabbitConfig,
        kube: KubernetesConfig,
        launcher: Launcher | None = None,
    ) -> None:
        super().__init__(store, paths, settings, metrics, config, launcher=launcher)
        assert config.url is not None  # RabbitRuntime refused it otherwise
        self.kube = KubePlacement(
            kube,
            settings,
            paths,
            config.url.get_secret_value(),
            lambda: self.launcher.object_key,
            self._step_configs,
            self._open_gate,
            self._close_gate,
            self._unconsumed,
            ask_hook=self._ask_hook,
        )
        self.records = Records(store, self.broker)
        self._counter: asyncio.Task[None] | None = None

    async def resumed(self) -> None:
        self.kube.reconcile_soon()

    def shutting_down(self) -> None:
        self.kube.keep_on_stop = True

    async def close(self) -> None:
        if self._counter is not None:
            self._counter.cancel()
        try:
            await self.records.close()
            await self.kube.close()
        finally:
            await super().close()

    async def _count(self) -> None:
        """The depths of the queues pods consume (this daemon does not see them go): counted
        by the broker every second, for `status`, metrics and each step's backpressure."""
        while True:
            await asyncio.sleep(DEPTH_EVERY)
            if not self.broker.connected.is_set():
                continue
            try:
                for run in list(self.kube.runs.values()):
                    for step in run.spec.steps[1:]:
                        depth = await self.broker.depth(run.spec.flow, step.id)
                        self.kube.depths[(run.spec.flow, step.id)] = depth
                        self.router.set_depth(run.spec.flow, step.id, depth)
            except Exception as exc:  # the connection went meanwhile: counted again later
                log.debug("kubernetes: counting queues: %s", exc)

    async def _place(self, spec: FlowVersionToRun, timeout: float) -> FlowRun:
        if self._counter is None:
            self._counter = asyncio.get_running_loop().create_task(self._count())
        run = await self.kube.warm_up(spec, timeout)
        for step in spec.steps:
            self.records.know(spec.flow, spec.version, step.id, step.component, step.version)
        try:
            await self.records.follow(spec.flow)  # its pods' snapshots and dead letters
        except Exception as exc:  # the records queue stays; it is followed at the next try
            log.warning("flow %s: following its records queue: %s", spec.flow, redact(str(exc)))
        return run

    async def run(self, new: FlowRun) -> None:
        if isinstance(new, KubeRun):
            await self.kube.run(new)
            return
        await super().run(new)

    async def switch(
        self,
        old: FlowRun,
        new: FlowRun,
        *,
        old_failing: bool = False,
        source: EmbeddedRuntime | None = None,
    ) -> float | None:
        if isinstance(new, KubeRun) and isinstance(old, KubeRun):
            if old_failing:  # a rollback: `old` is the failing version, `new` the one before
                return await self.kube.rollback(old, new, self.settings.warmup_timeout)
            return await self.kube.switch(old, new)
        return await super().switch(old, new, old_failing=old_failing, source=source)

    async def quiesce(self, run: FlowRun, *, failing: bool = False) -> float:
        """A version on Kubernetes stops for a move: every Deployment scaled to 0 and its
        pods gone (the trigger at a call boundary; the actions after their current message,
        what they held back in their queues, first), then its pods' records written."""
        if not isinstance(run, KubeRun):
            return await super().quiesce(run, failing=failing)
        end = await self.kube.quiesce(run)
        if not await self.records.drained(run.spec.flow, DRAIN_TIMEOUT):
            log.warning(
                "flow %s: its records queue was not drained in %.0f s; the new version may "
                "start from an older snapshot",
                run.spec.flow,
                DRAIN_TIMEOUT,
            )
        return end

    async def _unconsumed(self, flow: str, step: str) -> None:
        """Until no consumer of a stopped pod is left on `step`'s queue: the broker gives back
        what the pod held when it handles the pod's going (after the pod is gone), and
        messages taken from the queue before that would go ahead of them."""
        deadline = time.monotonic() + DRAIN_TIMEOUT
        while await self.broker.consumers(flow, step):
            if time.monotonic() > deadline:
                log.warning(
                    "flow %s: step %s's queue still has a consumer after its pods went; its "
                    "messages may come out of order",
                    flow,
                    step,
                )
                return
            await asyncio.sleep(CONSUMER_POLL)

    async def start_moved(self, new: FlowRun) -> float | None:
        if not isinstance(new, KubeRun):
            return await super().start_moved(new)
        await self.kube.run(new)  # the trigger's gate: its pod starts from the last snapshot
        return time.monotonic()

    def retire(self, old: FlowRun) -> None:
        if not isinstance(old, KubeRun):
            super().retire(old)
            return
        self.kube.retire_now(old)

    def _step_configs(self, spec: FlowVersionToRun) -> dict[str, dict[str, Any]]:
        """Each step's cfg as its pod gets it: its credential merged, as at a local start."""
        out = {}
        creds = self.launcher.credentials
        for step in spec.steps:
            config = dict(step.config)
            if step.credential is not None and creds is not None:
                config, warning = creds.cfg(step.credential, step.component, config)
                if warning is not None:
                    log.warning("flow %s step %s: %s", spec.flow, step.id, warning)
            out[step.id] = config
        return out

    async def _open_gate(self, flow: str, name: str) -> None:
        """One message into a step's start gate, confirmed — once what the flow's pods reported
        is written (the old version's last snapshots: the new one starts from them)."""
        await self.broker.wait(self.settings.warmup_timeout)
        if not await self.records.drained(flow, DRAIN_TIMEOUT):
            log.warning(
                "flow %s: its records queue was not drained in %.0f s; the new trigger may "
                "start from an older snapshot",
                flow,
                DRAIN_TIMEOUT,
            )
        assert self.broker.channel is not None
        await self.broker.channel.declare_queue(
            name, durable=True, arguments={"x-queue-type": "quorum"}
        )
        await self.broker.publish("", name, b'"go"', properties("go", {}))

    async def _ask_hook(self, queue: str, hook: str, data: Any, timeout: float) -> Any:
        """A trigger pod's hook, asked through its hooks queue (`hooks.ask`)."""
        deadline = time.monotonic() + timeout
        try:
            await self.broker.wait(timeout)
        except BrokerUnreachable as exc:
            raise hooks.HookUnanswered(str(exc)) from None
        assert self.broker.conn is not None
        wait = max(0.1, deadline - time.monotonic())
        return await hooks.ask(self.broker.conn, queue, hook, data, wait)

    async def _close_gate(self, name: str) -> None:
        """Delete a trigger pod's queue: an old version's start gate at its switch; a
        version's gate and hooks queue with its objects."""
        await self.broker.wait(self.settings.warmup_timeout)
        assert self.broker.channel is not None
        await self.broker.channel.queue_delete(name)
