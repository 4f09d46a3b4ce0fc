"""Placement "kubernetes" of the RabbitMQ runtime: a flow version's steps as Deployments.

warm_up   render (secrets filled, credentials merged) → apply → watched until available;
          a failure deletes what was applied and is a `StepFailed` with the cluster's
          reason (the running version goes on). Trigger pods wait at their start gate.
run       opens the new trigger's gate (`deployd.<flow>.<step>.v<N>.go`).
switch    scales the old trigger to 0 (its pod stops at a call boundary on SIGTERM), waits
          until it is gone, opens the new trigger's gate (gap_ms: from the old pod gone to
          the gate confirmed); the old actions are scaled to 0 (they finish their message;
          what they held goes back to the queue, which the new actions consume); the old
          version is deleted once the rollback window has passed.
rollback  `switch(new, old)`: the old version is applied again (its replicas back), warmed,
          and the new one removed.
reconcile once every active flow was started again at a daemon start, then every minute:
          what deployd owns (by label) and no run of this daemon holds is deleted; a run's
          Deployment gone missing is applied again.
hooks     `trigger_hook`: the trigger pod runs startup()/shutdown() when deployd asks
          (`hooks.py`), within `warmup_timeout`; unanswered, a warning and None. A version's
          gate and hooks queues are deleted with its objects.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from ...config import DaemonConfig, KubernetesConfig
from ...objects import flow_token
from ...paths import Paths
from ...types import FlowVersionToRun, StepExit, StepKind, StepState, StepStatus
from ..base import StepFailed
from .artifacts import artifact_token, ensure_archive
from .cluster import Cluster, ClusterError, client_for
from .hooks import HookFailed, HookUnanswered
from .manifests import PodSecrets, gate_queue, hooks_queue, object_name, render, step_label

log = logging.getLogger("deployd.kubernetes")
RECONCILE_EVERY = 60.0  # seconds
QUEUE_DELETE_WAIT = 5.0  # seconds the deletion of a version's gate or hooks queue may take


def _pod_steps(spec: FlowVersionToRun) -> list[str]:
    """The ids of `spec`'s steps that are pods (its trigger first, then its actions)."""
    return [s.id for s in spec.steps if s.kind != StepKind.MAPPER]


class KubeRun:
    """`runtime/base.py`'s `FlowRun` of a version placed on Kubernetes."""

    def __init__(self, spec: FlowVersionToRun, placement: KubePlacement, docs: list[Any]) -> None:
        self._spec = spec
        self.placement = placement
        self.docs = docs
        self.state = StepState.READY
        self.stopped = asyncio.Event()
        self.exits: asyncio.Queue[StepExit] = asyncio.Queue(maxsize=100)
        self.watcher: asyncio.Task[None] | None = None
        self.retire: asyncio.Task[None] | None = None  # its deletion after a switch from it
        self.closing: asyncio.Task[None] | None = None  # its gates' closing after that switch
        self._last_error: str | None = None

    @property
    def spec(self) -> FlowVersionToRun:
        return self._spec

    @property
    def last_error(self) -> str | None:
        return self._last_error

    def last_error_log(self) -> str:
        return ""

    def status(self) -> list[StepStatus]:
        out = []
        steps = self._spec.steps
        for i, step in enumerate(steps):
            where = object_name(self._spec.flow, step.id, self._spec.version)
            after = steps[i + 1] if i + 1 < len(steps) else None
            held = after is not None and self.placement.depths.get(
                (self._spec.flow, after.id), 0
            ) >= (after.max_queue or self.placement.settings.max_queue)
            out.append(
                StepStatus(
                    id=step.id,
                    kind=step.kind,
                    component=step.component,
                    function=step.function,
                    version=step.version,
                    state=self.state,
                    location=f"kubernetes:{self.placement.kube.namespace}/{where}",
                    backpressure=held and self.state == StepState.RUNNING,
                )
            )
        return out

    async def next_exit(self) -> StepExit | None:
        """A container restart of one of this version's pods (Kubernetes restarts it)."""
        getter = asyncio.ensure_future(self.exits.get())
        stop = asyncio.ensure_future(self.stopped.wait())
        await asyncio.wait({getter, stop}, return_when=asyncio.FIRST_COMPLETED)
        stop.cancel()
        if getter.done():
            return getter.result()
        getter.cancel()
        return None

    async def watch_exits(self) -> None:
        steps = {step_label(s.id): s.id for s in self._spec.steps}
        while not self.stopped.is_set():
            try:
                async for label, reason in self.placement.cluster.restarts(
                    self._spec.flow, self._spec.version
                ):
                    self._last_error = f"step {steps.get(label, label)}: {reason}"
                    if not self.exits.full():
                        self.exits.put_nowait(
                            StepExit(steps.get(label, label), time.monotonic(), reason)
                        )
            except Exception as exc:  # the watch ended or failed: watch again
                log.info("flow %s: pod watch: %s", self._spec.flow, exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopped.wait(), 1.0)

    async def trigger_hook(self, name: str, data: Any = None) -> Any:
        """The trigger pod's `startup()` or `shutdown(data)`, asked over the broker; None (a
        warning in the log) when it failed or no pod answered within `warmup_timeout`."""
        return await self.placement.trigger_hook(self, name, data)

    async def stop(self) -> None:
        self.state = StepState.STOPPED
        self.stopped.set()
        if self.watcher is not None:
            self.watcher.cancel()
        if self.placement.keep_on_stop:
            return  # the daemon stops: its pods go on, the next start adopts them
        await self.placement.remove(self)


class KubePlacement:
    """What the RabbitMQ runtime asks of the cluster."""

    def __init__(
        self,
        kube: KubernetesConfig,
        settings: DaemonConfig,
        paths: Paths,
        amqp_url: str,
        key: Callable[[], bytes | None],
        configs: Callable[[FlowVersionToRun], dict[str, dict[str, Any]]],
        open_gate: Callable[[str, str], Awaitable[None]],
        close_gate: Callable[[str], Awaitable[None]],
        unconsumed: Callable[[str, str], Awaitable[None]],
        ask_hook: Callable[[str, str, Any, float], Awaitable[Any]] | None = None,
    ) -> None:
        self.kube = kube
        self.settings = settings
        self.paths = paths
        self.amqp_url = amqp_url
        self.key = key
        self.configs = configs
        self.open_gate = open_gate  # (flow, gate queue): its records drained, then "go"
        self.close_gate = close_gate  # delete a gate queue
        self.unconsumed = unconsumed  # (flow, step): until no consumer is left on its queue
        self.ask_hook = ask_hook  # (hooks queue, hook, data, timeout): `hooks.ask`
        self._cluster: Cluster | None = None
        self.runs: dict[tuple[str, int], KubeRun] = {}
        self.depths: dict[tuple[str, str], int] = {}  # (flow, step): as the broker last counted
        # Versions being applied and warmed (a warm-up, a rollback): not orphans, whatever the
        # reconciliation finds of them meanwhile.
        self.busy: set[tuple[str, int]] = set()
        self._retiring: set[asyncio.Task[None]] = set()
        self._reconciler: asyncio.Task[None] | None = None
        self._reconcile_now = asyncio.Event()
        # The daemon is stopping (`Runtime.shutting_down`): a run's stop leaves its objects.
        self.keep_on_stop = False

    @property
    def cluster(self) -> Cluster:
        if self._cluster is None:
            self._cluster = Cluster(client_for(self.kube), self.kube.namespace)
        return self._cluster

    async def close(self) -> None:
        for task in [*self._retiring, *([self._reconciler] if self._reconciler else [])]:
            task.cancel()
        if self._cluster is not None:
            await self._cluster.close()

    def _docs(self, spec: FlowVersionToRun) -> list[dict[str, Any]]:
        digests = {}
        for step in spec.steps:
            if step.kind != StepKind.MAPPER and (step.component, step.version) not in digests:
                digests[(step.component, step.version)] = ensure_archive(
                    self.paths.artifacts, step.component, step.version, Path(step.artifact_dir)
                )[1]
        key = self.key() or b""
        secrets = PodSecrets(
            self.amqp_url, artifact_token(key, spec.flow, spec.version), flow_token(key, spec.flow)
        )
        return render(
            spec,
            self.kube,
            digests,
            stop_timeout=self.settings.stop_timeout,
            secrets=secrets,
            configs=self.configs(spec),
            max_queue=self.settings.max_queue,
        )

    async def warm_up(self, spec: FlowVersionToRun, timeout: float) -> KubeRun:
        deadline = time.monotonic() + timeout
        key = (spec.flow, spec.version)
        self.busy.add(key)
        adopting = False
        try:
            docs = await asyncio.to_thread(self._docs, spec)
            # Already there (a daemon start after a clean stop: its pods went on running):
            # adopted, and never deleted because a re-apply failed.
            adopting = bool(await self.cluster.deployment_names(spec.flow, spec.version))
            await self.cluster.apply(docs)
            await self.cluster.wait_available(
                spec.flow, spec.version, max(0.1, deadline - time.monotonic())
            )
        except ClusterError as exc:
            if not adopting:
                with contextlib.suppress(ClusterError):
                    await self.cluster.delete_version(spec.flow, spec.version)
                await self._delete_queues(spec)
            raise StepFailed(spec.steps[0].id, f"Kubernetes: {exc}") from None
        finally:
            self.busy.discard(key)
        run = KubeRun(spec, self, docs)
        run.watcher = asyncio.get_running_loop().create_task(run.watch_exits())
        self.runs[key] = run
        self._start_reconciler()
        return run

    async def trigger_hook(self, run: KubeRun, name: str, data: Any) -> Any:
        spec = run.spec
        if self.ask_hook is None:
            return None
        queue = hooks_queue(spec.flow, spec.trigger.id, spec.version)
        try:
            return await self.ask_hook(queue, name, data, self.settings.warmup_timeout)
        except HookFailed as exc:  # as on one machine: its error in the log, no data
            log.warning("flow %s: %s", spec.flow, exc)
        except HookUnanswered as exc:
            log.warning(
                "flow %s v%s: step %s: %s() did not run in its pod: %s",
                spec.flow,
                spec.version,
                spec.trigger.id,
                name,
                exc,
            )
        return None

    async def run(self, new: KubeRun) -> None:
        """Open every step's gate of `new` (its first start: no other version runs)."""
        flow, version = new.spec.flow, new.spec.version
        await asyncio.gather(
            *(self.open_gate(flow, gate_queue(flow, s, version)) for s in _pod_steps(new.spec))
        )
        new.state = StepState.RUNNING

    async def switch(self, old: KubeRun, new: KubeRun) -> float:
        """From `old` to `new`, each step on its own and all at once: the trigger at a call
        boundary (the gap), each action once the old version's pods of it are gone and left
        its queue (one consumer at a time: the step's order is kept)."""
        flow = new.spec.flow
        old.state = StepState.STOPPING
        wait = self.settings.stop_timeout + 10

        async def trigger() -> float:
            old_trigger = object_name(flow, old.spec.trigger.id, old.spec.version)
            await self._scale_down(old, [old_trigger], wait)
            gone = time.monotonic()
            await self.open_gate(flow, gate_queue(flow, new.spec.trigger.id, new.spec.version))
            return (time.monotonic() - gone) * 1000

        async def action(step: str) -> None:
            if step in old_actions:
                await self._scale_down(old, [object_name(flow, step, old.spec.version)], wait)
                await self.unconsumed(flow, step)  # what the old pod held is back, first
            if step in new_actions:
                await self.open_gate(flow, gate_queue(flow, step, new.spec.version))

        old_actions = set(_pod_steps(old.spec)[1:])
        new_actions = set(_pod_steps(new.spec)[1:])
        gap_ms, _ = await asyncio.gather(
            trigger(), asyncio.gather(*(action(s) for s in sorted(old_actions | new_actions)))
        )
        new.state = StepState.RUNNING
        # The old gates are closed after the switch (its pods are gone, its Deployments at 0),
        # so that an old pod brought back by a rollback waits at its gate again: a rollback
        # waits for this first.
        old.closing = asyncio.get_running_loop().create_task(self._close_gates(old))
        self._retiring.add(old.closing)
        old.closing.add_done_callback(self._retiring.discard)
        task = asyncio.get_running_loop().create_task(self._retire(old))
        old.retire = task
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)
        return gap_ms

    async def _close_gates(self, run: KubeRun) -> None:
        flow, version = run.spec.flow, run.spec.version
        results = await asyncio.gather(
            *(self.close_gate(gate_queue(flow, s, version)) for s in _pod_steps(run.spec)),
            return_exceptions=True,
        )
        for step, result in zip(_pod_steps(run.spec), results, strict=True):
            if isinstance(result, Exception):
                log.warning("flow %s v%s: closing the gate of %s: %s", flow, version, step, result)

    async def quiesce(self, run: KubeRun) -> float:
        """Every Deployment of `run` scaled to 0 and its pods gone, all at once: the trigger's
        pod stops at a call boundary, each action's after its message (what it held goes back
        to its queue, first; what the trigger published meanwhile waits there); every gate
        closed. When the trigger was gone."""
        flow, version = run.spec.flow, run.spec.version
        wait = self.settings.stop_timeout + 10
        run.state = StepState.STOPPING

        async def stop(step: str) -> float:
            await self._scale_down(run, [object_name(flow, step, version)], wait)
            end = time.monotonic()
            await self.close_gate(gate_queue(flow, step, version))
            if step != run.spec.trigger.id:
                await self.unconsumed(flow, step)
            return end

        ends = await asyncio.gather(*(stop(s) for s in _pod_steps(run.spec)))
        return ends[0]  # the trigger's

    async def _scale_down(self, run: KubeRun, names: list[str], timeout: float) -> None:
        async def one(name: str) -> None:
            try:
                await self.cluster.scale_down(name, timeout)
            except ClusterError as exc:
                log.warning("flow %s: stopping %s: %s", run.spec.flow, name, exc)

        await asyncio.gather(*(one(name) for name in names))

    def retire_now(self, old: KubeRun) -> None:
        """Delete `old`'s objects in the background (a move's old side: a rollback warms its
        version up anew)."""
        task = asyncio.get_running_loop().create_task(old.stop())
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def rollback(self, new: KubeRun, old: KubeRun, timeout: float) -> float:
        """Back to `old`: applied again with its replicas, warmed, then `new` removed."""
        # Not retired any more: its rollback window may end while it is applied and warmed
        # again (a slow cluster), and that must not delete what is being brought back.
        if old.retire is not None:
            old.retire.cancel()
            old.retire = None
        if old.closing is not None:
            await old.closing  # its pods must wait at their gates when they come back
        old.state = StepState.READY
        old.stopped.clear()
        if old.watcher is None or old.watcher.done():
            old.watcher = asyncio.get_running_loop().create_task(old.watch_exits())
        key = (old.spec.flow, old.spec.version)
        self.runs[key] = old  # before the apply: never an orphan meanwhile
        self.busy.add(key)
        try:
            await self.cluster.apply(old.docs)
            with contextlib.suppress(ClusterError):
                await self.cluster.wait_available(old.spec.flow, old.spec.version, timeout)
        finally:
            self.busy.discard(key)
        gap = await self.switch(new, old)
        await new.stop()
        return gap

    async def _retire(self, old: KubeRun) -> None:
        await asyncio.sleep(self.settings.rollback_window)
        if old.state == StepState.STOPPING:  # not rolled back to meanwhile: final
            await old.stop()

    async def remove(self, run: KubeRun) -> None:
        key = (run.spec.flow, run.spec.version)
        if key in self.busy or self.runs.get(key, run) is not run:
            # The same version runs again as another run (a rollback warmed it up anew while
            # this one's rollback window ran out): its objects are that run's now.
            return
        self.runs.pop(key, None)
        try:
            await self.cluster.delete_version(run.spec.flow, run.spec.version)
        except ClusterError as exc:
            log.warning("flow %s v%s: %s", run.spec.flow, run.spec.version, exc)
        await self._delete_queues(run.spec)  # a switch closed its gates; a stop did not

    async def _delete_queues(self, spec: FlowVersionToRun) -> None:
        """The version's start gates (each pod declared its own) and its hooks queue (its
        trigger pod's), deleted with its objects: nothing of a stopped flow, a replaced
        version or a failed warm-up is left in the broker (a killed daemon's leftover hooks
        queue expires by itself)."""
        names = [gate_queue(spec.flow, s, spec.version) for s in _pod_steps(spec)]
        names.append(hooks_queue(spec.flow, spec.trigger.id, spec.version))
        for name in names:
            try:
                await asyncio.wait_for(self.close_gate(name), QUEUE_DELETE_WAIT)
            except Exception as exc:  # a broker that is down: it is not worth a stop's wait
                log.warning("flow %s: queue %s not deleted: %s", spec.flow, name, exc)

    async def reconcile(self) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
        return await self.cluster.reconcile(
            lambda: set(self.runs), lambda f, v: self.runs[(f, v)].docs, lambda: set(self.busy)
        )

    def reconcile_soon(self) -> None:
        """Reconcile now (every active flow was started again after a daemon start: what is
        left of a version no run holds is an orphan, say one a killed daemon applied)."""
        self._reconcile_now.set()
        self._start_reconciler()

    def _start_reconciler(self) -> None:
        if self._reconciler is None:
            self._reconciler = asyncio.get_running_loop().create_task(self._reconcile_loop())

    async def _reconcile_loop(self) -> None:
        first = min(RECONCILE_EVERY, self.settings.warmup_timeout)
        while True:
            # At a daemon start, once every active flow was warmed up again (applying what is
            # missing: `reconcile_soon`), or else a warm-up's length after the first one;
            # then every minute.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._reconcile_now.wait(), first)
            self._reconcile_now.clear()
            first = RECONCILE_EVERY
            try:
                recreated, deleted = await self.reconcile()
                if recreated or deleted:
                    log.warning("kubernetes: recreated %s, deleted orphans %s", recreated, deleted)
            except ClusterError as exc:
                log.warning("kubernetes: reconciliation failed: %s", exc)
