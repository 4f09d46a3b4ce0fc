"""Choosing the runtime from config: the one place that knows the implementations.

The daemon has one `Runtime` object: `Runtimes`, which holds the embedded runtime and, when
[runtime.rabbitmq] has a url, the RabbitMQ one (sharing the embedded one's launcher), and
hands each flow version to the runtime it names (`FlowVersionToRun.runtime`, else
[runtime] default). A switch between versions on different runtimes is a flow moving
between them: the new runtime runs it and carries the queued messages across.
"""

from __future__ import annotations

from typing import Any

from ..config import Config, DaemonConfig
from ..errors import FlowError
from ..metrics import Metrics
from ..paths import Paths
from ..store import Store
from ..types import FlowVersionToRun, RetryResult
from .base import Accepted, CanaryRun, FlowRun, MethodCall, RunOutcome, Runtime
from .credentials import Credentials
from .embedded.runtime import EmbeddedRuntime
from .kubernetes.runtime import KubeRuntime
from .rabbitmq.runtime import RabbitRuntime


class Runtimes:
    """Every runtime the daemon has, as one `Runtime`."""

    name = "runtimes"

    def __init__(self, default: str, embedded: EmbeddedRuntime, rabbit: RabbitRuntime | None):
        self.default = default
        self.embedded = embedded
        self.rabbit = rabbit
        self.all: dict[str, EmbeddedRuntime] = {"embedded": embedded}
        if rabbit is not None:
            self.all["rabbitmq"] = rabbit

    def of(self, spec: FlowVersionToRun) -> EmbeddedRuntime:
        name = spec.runtime or self.default
        runtime = self.all.get(name)
        if runtime is None:
            if name == "rabbitmq":
                raise FlowError(
                    f"flow {spec.flow} runs on rabbitmq, but [runtime.rabbitmq] url is not set"
                    ' in the daemon config (e.g. url = "${DEPLOYD_AMQP_URL}")'
                )
            raise FlowError(f"flow {spec.flow}: unknown runtime {name!r} (embedded, rabbitmq)")
        return runtime

    def describe(self) -> dict[str, Any]:
        """What status shows about the runtimes: the default, and the broker's state."""
        out: dict[str, Any] = {"default": self.default}
        if self.rabbit is not None:
            out["rabbitmq"] = self.rabbit.describe()
        return out

    async def start(self) -> None:
        await self.embedded.start()  # first: it starts the launcher the others share
        if self.rabbit is not None:
            await self.rabbit.start()

    async def resumed(self) -> None:
        if self.rabbit is not None:
            await self.rabbit.resumed()

    def shutting_down(self) -> None:
        if self.rabbit is not None:
            self.rabbit.shutting_down()

    async def close(self) -> None:
        try:
            if self.rabbit is not None:
                await self.rabbit.close()
        finally:
            await self.embedded.close()

    def reload(self, settings: DaemonConfig) -> None:
        for runtime in self.all.values():
            runtime.reload(settings)

    async def warm_up(self, spec: FlowVersionToRun, timeout: float) -> FlowRun:
        return await self.of(spec).warm_up(spec, timeout)

    async def run(self, new: FlowRun) -> None:
        await self.of(new.spec).run(new)

    async def switch(
        self, old: FlowRun, new: FlowRun, *, old_failing: bool = False
    ) -> float | None:
        target, source = self.of(new.spec), self.of(old.spec)
        return await target.switch(old, new, old_failing=old_failing, source=source)

    async def run_once(self, run: FlowRun, timeout: float) -> RunOutcome:
        return await self.of(run.spec).run_once(run, timeout)

    def canary_refusal(self, spec: FlowVersionToRun) -> str | None:
        try:
            return self.of(spec).canary_refusal(spec)
        except FlowError as exc:
            return str(exc)

    async def canary(
        self, old: FlowRun, new: FlowRun, steps: tuple[str, ...], share: float
    ) -> CanaryRun:
        target, source = self.of(new.spec), self.of(old.spec)
        if target is not source:
            raise FlowError(
                f"flow {new.spec.flow} moves from {source.name} to {target.name}: a move "
                "switches at once, it is no canary"
            )
        return await target.canary(old, new, steps, share)

    async def accept(
        self, flow: str, body: str, headers: dict[str, str], reply: bool = False
    ) -> Accepted:
        # HTTP-fed flows run on the embedded runtime only (RabbitRuntime.warm_up refuses them)
        return await self.embedded.accept(flow, body, headers, reply)

    async def call_method(self, call: MethodCall, timeout: float) -> Any:
        return await self.embedded.call_method(call, timeout)  # one launcher for every runtime

    def queue_depths(self) -> dict[tuple[str, str], int]:
        out: dict[tuple[str, str], int] = {}
        for runtime in self.all.values():
            for key, n in runtime.queue_depths().items():
                out[key] = out.get(key, 0) + n
        return out

    def dead_letter_counts(self) -> dict[tuple[str, str], int]:
        return self.embedded.dead_letter_counts()  # one table for every runtime

    async def retry_dead_letters(
        self, spec: FlowVersionToRun, step: str | None, ids: list[int] | None
    ) -> RetryResult:
        return await self.of(spec).retry_dead_letters(spec, step, ids)


def create_runtime(
    config: Config,
    store: Store,
    paths: Paths,
    metrics: Metrics,
    credentials: Credentials | None = None,
) -> Runtime:
    """The runtimes flows run on: embedded always, RabbitMQ when it is configured (sharing
    its launcher, so its steps get their credentials the same way)."""
    embedded = EmbeddedRuntime(
        store, paths, config.daemon, metrics, credentials=credentials or Credentials(config, store)
    )
    rabbit: RabbitRuntime | None = None
    if (
        config.runtime.rabbitmq.url is not None
        and config.runtime.rabbitmq.placement == "kubernetes"
    ):
        rabbit = KubeRuntime(
            store,
            paths,
            config.daemon,
            metrics,
            config.runtime.rabbitmq,
            config.runtime.kubernetes,
            launcher=embedded.launcher,
        )
    elif config.runtime.rabbitmq.url is not None:
        rabbit = RabbitRuntime(
            store,
            paths,
            config.daemon,
            metrics,
            config.runtime.rabbitmq,
            launcher=embedded.launcher,
        )
    return Runtimes(config.runtime.default, embedded, rabbit)
