"""The RabbitMQ runtime with placement = "kubernetes": the queues in RabbitMQ as before, the
step processes as Deployments placed by `placement.KubePlacement` (see there for warm-up,
switch, rollback and reconciliation)."""

from __future__ import annotations

import logging
from typing import Any

from ...config import DaemonConfig, KubernetesConfig, RabbitConfig
from ...metrics import Metrics
from ...paths import Paths
from ...store import Store
from ...types import FlowVersionToRun
from ..base import FlowRun
from ..embedded.process import Launcher
from ..embedded.runtime import EmbeddedRuntime
from ..rabbitmq.broker import properties, redact
from ..rabbitmq.runtime import RabbitRuntime
from .placement import KubePlacement, KubeRun
from .records import Records

log = logging.getLogger("deployd.kubernetes")
DRAIN_TIMEOUT = 10.0  # seconds a switch waits for the records of the old trigger


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
        )
        self.records = Records(store, self.broker)

    async def close(self) -> None:
        try:
            await self.records.close()
            await self.kube.close()
        finally:
            await super().close()

    async def _place(self, spec: FlowVersionToRun, timeout: float) -> FlowRun:
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
        """One message into a trigger pod's start gate, confirmed — once what the flow's pods
        reported is written (the old trigger's last snapshot: the new one starts from it)."""
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

    async def _close_gate(self, name: str) -> None:
        """Delete a trigger's start gate (an old version's, at its switch)."""
        await self.broker.wait(self.settings.warmup_timeout)
        assert self.broker.channel is not None
        await self.broker.channel.queue_delete(name)
