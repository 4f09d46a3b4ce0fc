"""The publish state machine (with rollback), on top of the runtime interface.

Publishing a new version of a running flow, crash-only:
    deployment(starting_new) → the runtime warms every new step up
      ├─ a step fails or times out → the new steps are gone, deployment(failed); old runs on
      └─ all ready → in ONE transaction: flow.active_version = new, deployment(switching)
         → runtime.switch(old, new): trigger handed over at a call boundary (gap_ms),
           old actions finish their in-flight message, new actions take over the queues
         → deployment(done); a watcher restores the old version if the new steps exit
           `rollback_exits` times within `rollback_window` → deployment(rolled_back)
A daemon killed at any line restarts into exactly one active version: `recover()` marks
starting_new as failed (the old version is still active) and switching as done.

A canary publish (issue 16, flow key [canary], see `canary.py`): when only action steps
change and the flow runs,
    deployment(starting_new) → warm-up as above → deployment(canary): the old version stays
    active and runs whole; the new version's changed steps take a share of their messages
      ├─ duration passed, min_messages handled, error rate good (or `flow promote`) → in ONE
      │  transaction: flow.active_version = new, deployment(promoted) → the switch as above
      └─ error rate too high, crash loops, `flow rollback`, a later publish, `flow stop` →
         the new version stops, the old one handles what its share left; deployment(rolled_back)
A daemon stopped or killed during a canary comes back on the old version: `recover()` marks
the canary rolled_back (interrupted) and puts the messages left in the new version's share
back into the steps' queues; an automatic publish is then tried again by the catch-up at
start-up (a new canary, from the start), a person's is not. A promoted canary whose switch
was cut by a kill is finished like a switching one.

Re-drive (flow key `retry_errors = "on_publish"`): once the rollback window of a publish has
passed without a rollback and the version is still the active one, the dead letters of every
step whose component version the publish changed, failed by another version of it, are put
back once into the new version (`deployments.redriven` counts them). A letter that fails again
was failed by the new version, so this publish never takes it again.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Coroutine
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

from ..config import Config
from ..errors import FlowError, UnknownFlow
from ..metrics import Metrics
from ..runtime.base import FlowRun, Runtime, StepFailed
from ..store import FlowStore, Store
from ..store.db import utcnow
from ..store.letters import DeadLetterStore
from ..store.quarantine import QuarantineStore
from ..types import DeploymentResult, DeploymentState, FlowState, FlowVersionToRun, StepStatus
from . import canary
from .canary import Canary
from .drafts import Drafts

log = logging.getLogger("deployd.deploy")
INTERRUPTED = "interrupted: the daemon stopped before the new steps were ready"
CANARY_INTERRUPTED = (
    "interrupted: the daemon stopped during the canary; the old version was kept (an automatic"
    " publish is tried again at start-up)"
)
CANARY_POLL = 0.1  # seconds between two looks at a canary's counts
CANARY_SAVE = 5.0  # seconds between two saves of them (what a kill -9 leaves in the record)


@dataclass(frozen=True)
class Cause:
    """What asked for a publish: a person's command or a registered component version."""

    trigger: str
    component: str | None = None
    component_version: int | None = None
    sha: str | None = None
    # An automatic publish (a new component version, `resume`, the end of a freeze): the
    # component versions it brings in are quarantined for the flow when it fails.
    automatic: bool = False


class Publisher:
    """Runs flows through a `Runtime`: start, publish, roll back, stop; one lock per flow."""

    def __init__(
        self, config: Config, store: Store, runtime: Runtime, drafts: Drafts, metrics: Metrics
    ) -> None:
        self.config = config
        self.store = store
        self.fs = FlowStore(store)
        self.runtime = runtime
        self.drafts = drafts
        self.metrics = metrics
        self.runs: dict[str, FlowRun] = {}
        self.publishing: set[str] = set()
        self.failed: dict[str, str] = {}
        self.canaries: dict[str, Canary] = {}  # canary publishes in progress, by flow
        self._locks: dict[str, asyncio.Lock] = {}
        self._tasks: set[asyncio.Task[Any]] = set()

    def lock(self, name: str) -> asyncio.Lock:
        return self._locks.setdefault(name, asyncio.Lock())

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # -- state -----------------------------------------------------------------------------

    def state(self, name: str, enabled: bool) -> FlowState:
        if name in self.publishing:
            return FlowState.PUBLISHING
        if name in self.failed:
            return FlowState.FAILED
        if name in self.runs:
            return FlowState.RUNNING
        return FlowState.FAILED if enabled else FlowState.STOPPED

    def step_status(self, name: str) -> list[StepStatus] | None:
        run = self.runs.get(name)
        return run.status() if run is not None else None

    def recover(self) -> None:
        """Finish deployments a killed daemon left mid-way (before anything runs)."""
        unfinished = self.fs.unfinished_deployments()
        if any(
            d["status"] in (DeploymentState.CANARY, DeploymentState.PROMOTED) for d in unfinished
        ):
            with self.store.tx():  # nothing reads canary queues now: their messages go back
                moved = self.fs.merge_canary_queues()
            if moved:
                log.info("%d message(s) of interrupted canaries went back to their queues", moved)
        for dep in unfinished:
            with self.store.tx():
                if dep["status"] == DeploymentState.SWITCHING:
                    self.fs.set_deployment(dep["id"], status=DeploymentState.DONE)
                elif dep["status"] == DeploymentState.PROMOTED:  # its switch was cut short
                    self.fs.set_deployment(dep["id"], finished_at=utcnow())
                elif dep["status"] == DeploymentState.CANARY:
                    record = dict(dep["canary"] or {})  # its counts as last saved
                    record.update(
                        ended=canary.INTERRUPTED, outcome="rolled_back", reason=CANARY_INTERRUPTED
                    )
                    self.fs.set_deployment(
                        dep["id"],
                        status=DeploymentState.ROLLED_BACK,
                        interrupted=1,
                        reason=CANARY_INTERRUPTED,
                        canary=json.dumps(record),
                    )
                else:
                    self.fs.set_deployment(
                        dep["id"], status=DeploymentState.FAILED, interrupted=1, reason=INTERRUPTED
                    )
                self.store.event(
                    "deploy.recovered",
                    f"deployment {dep['id']} of {dep['flow']} finished at start-up",
                    flow=dep["flow"],
                )

    def resume_redrives(self) -> None:
        """At start-up: a re-drive a stopped daemon still owed (the last publish of a flow was
        live, with `retry_errors = "on_publish"`, but its rollback window had not passed) runs
        when what is left of the window has passed (at once if it has)."""
        window = self.config.daemon.rollback_window
        for name, dep in self.fs.last_deployments().items():
            if (
                dep["status"] not in (DeploymentState.DONE, DeploymentState.PROMOTED)
                or dep["from_version"] is None
                or dep["redriven"] is not None
                or dep["warmup_ms"] is None  # published while stopped: nothing was started
                or dep["finished_at"] is None
            ):
                continue
            flow = self.fs.flow(name)
            fv = self.fs.flow_version(name, dep["to_version"])
            if flow is None or fv is None or flow["active_version"] != dep["to_version"]:
                continue
            if (fv["spec"].get("retry_errors") or "manual") != "on_publish":
                continue
            try:
                spec = self.drafts.runnable(name, fv["version"], fv["steps"])
            except FlowError as exc:
                log.warning("flow %s: no re-drive of its dead letters: %s", name, exc)
                continue
            since = datetime.now(UTC) - datetime.fromisoformat(dep["finished_at"])
            switched_at = time.monotonic() - min(window, max(0.0, since.total_seconds()))
            self.spawn(
                self._redrive(name, dep["id"], spec, dep["from_version"], switched_at),
                f"redrive:{name}",
            )

    async def stop_all(self) -> None:
        """Daemon shutdown: every flow's steps stop (flows stay enabled for the next start)."""
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for c in list(self.canaries.values()):  # the old version is kept (see `recover`)
            try:
                await self.end_canary(c, False, CANARY_INTERRUPTED, canary.INTERRUPTED)
            except Exception:
                log.exception("flow %s: ending its canary at shutdown failed", c.name)
        await asyncio.gather(*(r.stop() for r in self.runs.values()))
        self.runs.clear()

    # -- starting and stopping one flow ----------------------------------------------------

    async def _warm_up(self, name: str, version: int, steps: list[dict[str, Any]]) -> FlowRun:
        spec = self.drafts.runnable(name, version, steps)
        return await self.runtime.warm_up(spec, self.config.daemon.warmup_timeout)

    async def start_run(self, name: str, initial: bool) -> None:
        """Bring the active version of `name` up (daemon start, `flow start`)."""
        flow = self.fs.flow(name)
        if flow is None or not flow["active_version"]:
            return
        fv = self.fs.flow_version(name, flow["active_version"])
        if fv is None:
            return
        try:
            run = await self._warm_up(name, fv["version"], fv["steps"])
        except FlowError as exc:
            self.failed[name] = str(exc)
            with self.store.tx():
                self.store.event("flow.failed", f"flow {name} did not start: {exc}", flow=name)
            return
        self.failed.pop(name, None)
        if initial or flow["startup_data"] is None:
            data = await run.trigger_hook("startup")  # before the first process() call
            with self.store.tx():
                self.fs.set_flow(name, startup_data=_ran(data))
        await self.runtime.run(run)
        self.runs[name] = run
        with self.store.tx():
            self.store.event("flow.started", f"flow {name} v{fv['version']} running", flow=name)

    async def stop_run(self, name: str, startup_data: str | None) -> None:
        """`flow stop`: the trigger's shutdown(), then every step stops after its work (a
        canary in progress is rolled back first)."""
        c = self.canaries.get(name)
        if c is not None:
            await self.end_canary(
                c, False, "the flow was stopped during the canary", canary.STOPPED
            )
        run = self.runs.pop(name, None)
        if run is not None:
            await run.trigger_hook("shutdown", _json_load(startup_data))
            await run.stop()
        self.failed.pop(name, None)

    # -- publishing ------------------------------------------------------------------------

    async def publish(
        self,
        name: str,
        spec: dict[str, Any],
        steps: list[dict[str, Any]],
        reason: str | None,
        cause: Cause,
        from_draft: bool = False,
        origin: tuple[str, str] | None = None,
        no_canary: str = "",
    ) -> DeploymentResult:
        """The publish state machine (see the module docstring). Holds the flow's lock.

        `origin`: the (component, sha) whose new version the published draft was made for,
        when a person publishes it (`cause` then names no commit): the deploy events name it,
        so its commit gets the flow's status.

        A canary in progress is rolled back first (this publish supersedes it). With a
        [canary] in `spec`, a publish that changes only action steps of the running flow
        starts a canary and returns with status `canary`; its end is recorded on the same
        deployment. `no_canary`: why this publish switches at once all the same (a rollback
        to an earlier version, a move)."""
        # What the events name (the deployment's record keeps `cause` as it was).
        ev = cause
        if cause.sha is None and origin is not None:
            ev = replace(cause, component=origin[0], sha=origin[1])
        current = self.canaries.get(name)
        if current is not None:
            await self.end_canary(
                current,
                False,
                f"superseded by a new publish ({cause.trigger})",
                canary.SUPERSEDED,
            )
        flow = self.fs.flow(name)
        if flow is None:
            raise UnknownFlow(name)
        old = self.runs.get(name)
        from_version = flow["active_version"]
        plan: canary.Plan | None = None
        at_once = ""  # why a flow with [canary] switches at once
        if flow["enabled"] and not no_canary and from_version is not None:
            old_fv = self.fs.flow_version(name, from_version)
            plan, at_once = canary.plan(
                spec,
                old_fv["spec"] if old_fv and old is not None else None,
                old_fv["steps"] if old_fv and old is not None else None,
                steps,
            )
        elif flow["enabled"] and from_version is not None and canary.Settings.of(spec):
            at_once = no_canary
        with self.store.tx():
            version = self.fs.add_flow_version(name, spec, steps, reason)
            dep = self.fs.start_deployment(
                name,
                from_version,
                version,
                cause.trigger,
                cause.component,
                cause.component_version,
                cause.sha,
            )
            self.store.event(
                "deploy.started",
                f"publishing {name} v{version}"
                + (f" (was v{from_version})" if from_version else "")
                + (f" as a {plan.text()}" if plan else "")
                + (f" at once, no canary: {at_once}" if at_once else ""),
                flow=name,
                component=ev.component,
                sha=ev.sha,
                detail={"deployment": dep, "trigger": cause.trigger},
            )

        def result(status: DeploymentState, **more: Any) -> DeploymentResult:
            return DeploymentResult(name, dep, version, from_version, status, **more)

        if not flow["enabled"]:
            with self.store.tx():
                self._activate(name, version, spec, from_draft)
                self.fs.set_deployment(
                    dep, status=DeploymentState.DONE, reason="flow is stopped: not started"
                )
            return result(DeploymentState.DONE)
        self.publishing.add(name)
        try:
            started = time.monotonic()
            refusal: str | None = None
            try:
                new = await self._warm_up(name, version, steps)
                refusal = self.runtime.canary_refusal(new.spec) if plan is not None else None
                if refusal is not None:
                    await new.stop()
                    raise FlowError(refusal)
            except FlowError as exc:
                tail = exc.log_tail if isinstance(exc, StepFailed) else ""
                msg = f"deploy of v{version} failed: {exc}"
                with self.store.tx():
                    self.fs.set_deployment(
                        dep, status=DeploymentState.FAILED, reason=str(exc), log_tail=tail
                    )
                    self.fs.set_flow(name, needs_attention=msg)
                    self.store.event(
                        "deploy.failed",
                        f"{name}: {msg}",
                        flow=name,
                        component=ev.component,
                        sha=ev.sha,
                        detail={"deployment": dep, "version": version, "reason": str(exc)},
                    )
                    if cause.automatic and refusal is None:  # the runtime's refusal is no fault
                        self._quarantine(name, from_version, steps, f"warm-up failed: {exc}", dep)
                log.warning("flow %s: %s", name, msg)
                self.metrics.deployment(name, DeploymentState.FAILED)
                return result(DeploymentState.FAILED, reason=str(exc))
            warmup_ms = (time.monotonic() - started) * 1000
            if plan is not None and old is not None and from_version is not None:
                return await self._start_canary(
                    name,
                    dep,
                    version,
                    from_version,
                    spec,
                    plan,
                    old,
                    new,
                    cause,
                    from_draft,
                    warmup_ms,
                )
            with self.store.tx():
                self.fs.set_deployment(dep, status=DeploymentState.SWITCHING, warmup_ms=warmup_ms)
                self._activate(name, version, spec, from_draft)
            if old is None and flow["startup_data"] is None:
                data = await new.trigger_hook("startup")  # before the first process() call
                with self.store.tx():
                    self.fs.set_flow(name, startup_data=_ran(data))
            switched_at = time.monotonic()
            if old is None:
                await self.runtime.run(new)
                gap_ms = None
            else:
                gap_ms = await self.runtime.switch(old, new)
            self.runs[name] = new
            self.failed.pop(name, None)
            with self.store.tx():
                self.fs.set_deployment(dep, status=DeploymentState.DONE, gap_ms=gap_ms)
                self.store.event(
                    "deploy.done",
                    f"{name} v{version} live (warm-up {warmup_ms:.0f} ms"
                    + (f", gap {gap_ms:.1f} ms)" if gap_ms is not None else ")"),
                    flow=name,
                    component=ev.component,
                    sha=ev.sha,
                    detail={
                        "deployment": dep,
                        "version": version,
                        "from_version": from_version,
                        "warmup_ms": round(warmup_ms, 1),
                        "gap_ms": None if gap_ms is None else round(gap_ms, 3),
                    },
                )
            if from_version is not None:
                self.spawn(
                    self._watch_rollback(name, dep, new, from_version, switched_at, ev),
                    f"rollback-watch:{name}",
                )
            self.metrics.deployment(name, DeploymentState.DONE)
            self.metrics.warmup(name, warmup_ms / 1000)
            if gap_ms is not None:
                self.metrics.switch_gap(name, gap_ms / 1000)
            return result(DeploymentState.DONE, warmup_ms=warmup_ms, gap_ms=gap_ms)
        finally:
            self.publishing.discard(name)

    # -- canary publishes (issue 16) -------------------------------------------------------

    async def _start_canary(
        self,
        name: str,
        dep: int,
        version: int,
        from_version: int,
        spec: dict[str, Any],
        plan: canary.Plan,
        old: FlowRun,
        new: FlowRun,
        cause: Cause,
        from_draft: bool,
        warmup_ms: float,
    ) -> DeploymentResult:
        """`new` is warm: its changed steps take their share beside `old` (still the active
        version), and a watcher judges the canary when its time is up."""
        with self.store.tx():
            self.fs.set_deployment(
                dep,
                status=DeploymentState.CANARY,
                warmup_ms=warmup_ms,
                canary=json.dumps(plan.as_json()),
            )
            self.fs.set_flow(name, needs_attention=None)
            if from_draft:
                self.fs.delete_draft(name)  # published: it is flow version `version` now
        try:
            run = await self.runtime.canary(old, new, plan.steps, plan.settings.share)
        except FlowError as exc:
            await new.stop()
            with self.store.tx():
                self.fs.set_deployment(dep, status=DeploymentState.FAILED, reason=str(exc))
                self.fs.set_flow(name, needs_attention=f"deploy of v{version} failed: {exc}")
                self.store.event("deploy.failed", f"{name}: v{version}: {exc}", flow=name)
            self.metrics.deployment(name, DeploymentState.FAILED)
            return DeploymentResult(
                name, dep, version, from_version, DeploymentState.FAILED, reason=str(exc)
            )
        c = Canary(name, dep, version, from_version, spec, plan, old, new, run, cause)
        self.canaries[name] = c
        with self.store.tx():
            self.store.event(
                "deploy.canary",
                f"{name} v{version} is a {plan.text()} beside v{from_version} (warm-up"
                f" {warmup_ms:.0f} ms); `deployd flow promote {name}` or `deployd flow rollback"
                f" {name}` ends it now",
                flow=name,
                component=cause.component,
                sha=cause.sha,
                detail={"deployment": dep, "canary": plan.as_json()},
            )
        log.info("flow %s: v%s is a %s", name, version, plan.text())
        self.metrics.warmup(name, warmup_ms / 1000)
        c.task = self.spawn(self._watch_canary(c), f"canary:{name}")
        return DeploymentResult(
            name,
            dep,
            version,
            from_version,
            DeploymentState.CANARY,
            warmup_ms=warmup_ms,
            canary=plan.as_json(),
        )

    async def _watch_canary(self, c: Canary) -> None:
        """Wait until the canary's time is up and its new version handled `min_messages`,
        then promote or roll it back by its error rates; roll it back at once when the new
        version's steps crash-loop (`rollback_exits` within `rollback_window`)."""
        crashes = asyncio.ensure_future(self._canary_crashes(c))
        saved = time.monotonic()
        try:
            while True:
                if time.monotonic() - saved >= CANARY_SAVE:
                    saved = time.monotonic()
                    with self.store.tx():
                        record = {**c.plan.as_json(), **canary.tally_json(c.run.tally())}
                        self.fs.set_deployment(c.deployment, canary=json.dumps(record))
                crashed = crashes.result() if crashes.done() else None
                if crashed is not None:
                    promote, why, ended = False, crashed, canary.CRASHED
                    break
                tally = c.run.tally()
                left = c.deadline - time.monotonic()
                if left <= 0 and tally.new.messages >= c.settings.min_messages:
                    promote, why = canary.verdict(c.settings, tally)
                    ended = canary.JUDGED
                    break
                wait = CANARY_POLL if left <= 0 else min(CANARY_POLL, left)
                if crashes.done():  # the new version stops: only the time is waited for
                    await asyncio.sleep(wait)
                else:
                    await asyncio.wait({crashes}, timeout=wait)
        finally:
            crashes.cancel()
        async with self.lock(c.name):
            if self.canaries.get(c.name) is not c:
                return  # ended meanwhile (by hand, a publish, a stop)
            await self.end_canary(c, promote, why, ended)

    async def _canary_crashes(self, c: Canary) -> str | None:
        """Why the new version crash-loops (`rollback_exits` exits of its steps within any
        `rollback_window`), once it does; None once it stops."""
        window = self.config.daemon.rollback_window
        limit = self.config.daemon.rollback_exits
        seen: list[float] = []
        while True:
            exit_ = await c.new.next_exit()
            if exit_ is None:
                return None
            seen = [t for t in seen if t > exit_.at - window] + [exit_.at]
            if len(seen) >= limit:
                return f"{len(seen)} step exits within {window:g}s: {c.new.last_error}"

    async def end_canary(
        self, c: Canary, promote: bool, reason: str, ended: str
    ) -> DeploymentResult:
        """End `c` (the caller holds the flow's lock, or the daemon stops): promoted — the
        commit point, then the switch — or rolled back. Recorded on its deployment."""
        if self.canaries.get(c.name) is c:
            del self.canaries[c.name]
        if c.task is not None and c.task is not asyncio.current_task():
            c.task.cancel()
        name, dep, version = c.name, c.deployment, c.version

        def result(status: DeploymentState, **more: Any) -> DeploymentResult:
            record = c.record(ended, promote, reason)
            return DeploymentResult(
                name, dep, version, c.from_version, status, reason=reason, canary=record, **more
            )

        if promote:
            with self.store.tx():  # the commit point: the new version is the active one
                self._activate(name, version, c.spec, from_draft=False)
                self.fs.set_deployment(
                    dep,
                    status=DeploymentState.PROMOTED,
                    reason=reason,
                    finished_at=None,  # set once the switch is made
                    canary=json.dumps(c.record(ended, True, reason)),
                )
                self.store.event(
                    "deploy.promoted",
                    f"{name}: canary v{version} promoted ({ended}): {reason}",
                    flow=name,
                    component=c.cause.component,
                    sha=c.cause.sha,
                    detail={"deployment": dep},
                )
                self._lift_quarantine(c)
            switched_at = time.monotonic()
            gap_ms = await c.run.promote()
            self.runs[name] = c.new
            self.failed.pop(name, None)
            with self.store.tx():
                self.fs.set_deployment(
                    dep,
                    gap_ms=gap_ms,
                    finished_at=utcnow(),
                    canary=json.dumps(c.record(ended, True, reason)),
                )
            log.info("flow %s: canary v%s promoted: %s", name, version, reason)
            self.spawn(
                self._watch_rollback(name, dep, c.new, c.from_version, switched_at, c.cause),
                f"rollback-watch:{name}",
            )
            self.metrics.deployment(name, DeploymentState.PROMOTED)
            if gap_ms is not None:
                self.metrics.switch_gap(name, gap_ms / 1000)
            return result(DeploymentState.PROMOTED, gap_ms=gap_ms)
        await c.run.rollback(failing=ended == canary.CRASHED)
        tail = c.new.last_error_log() if ended == canary.CRASHED else ""
        with self.store.tx():
            self.fs.set_deployment(
                dep,
                status=DeploymentState.ROLLED_BACK,
                reason=reason,
                log_tail=tail,
                interrupted=1 if ended == canary.INTERRUPTED else 0,
                canary=json.dumps(c.record(ended, False, reason)),
            )
            if ended in (canary.JUDGED, canary.CRASHED):
                self.fs.set_flow(name, needs_attention=f"canary v{version} rolled back: {reason}")
            self.store.event(
                "deploy.rolled_back",
                f"{name}: canary v{version} rolled back ({ended}), v{c.from_version} kept:"
                f" {reason}",
                flow=name,
                component=c.cause.component,
                sha=c.cause.sha,
                detail={"deployment": dep},
            )
            if c.cause.automatic and ended in canary.QUARANTINING:
                fv_new = self.fs.flow_version(name, version)
                self._quarantine(
                    name,
                    c.from_version,
                    fv_new["steps"] if fv_new else [],
                    f"canary rolled back: {reason}",
                    dep,
                )
        log.warning("flow %s: canary v%s rolled back (%s): %s", name, version, ended, reason)
        self.metrics.deployment(name, DeploymentState.ROLLED_BACK)
        return result(DeploymentState.ROLLED_BACK)

    def _lift_quarantine(self, c: Canary) -> None:
        """A person's `flow publish --version C@N` of a quarantined version, promoted: as a
        live publish of it, it lifts the quarantine (inside the caller's transaction)."""
        cause = c.cause
        if cause.automatic or cause.component is None or cause.component_version is None:
            return
        quarantine = QuarantineStore(self.store)
        if quarantine.get(c.name, cause.component, cause.component_version) is None:
            return
        quarantine.lift(c.name, cause.component, cause.component_version)
        self.store.event(
            "quarantine.lifted",
            f"{c.name}: {cause.component} v{cause.component_version} published on purpose and"
            " live: no longer quarantined",
            flow=c.name,
            component=cause.component,
        )

    def canary_status(self, name: str) -> dict[str, Any] | None:
        """The `canary` object of `name` in the status (None: no canary in progress)."""
        c = self.canaries.get(name)
        return c.as_json() if c is not None else None

    def _activate(self, name: str, version: int, spec: dict[str, Any], from_draft: bool) -> None:
        """Make `version` the active one (inside the caller's transaction): the commit point."""
        self.fs.set_flow(
            name, active_version=version, update=spec.get("update", "auto"), needs_attention=None
        )
        if from_draft:
            self.fs.delete_draft(name)

    # -- quarantine ------------------------------------------------------------------------

    def _quarantine(
        self,
        name: str,
        from_version: int | None,
        steps: list[dict[str, Any]],
        reason: str,
        dep: int,
    ) -> None:
        """Quarantine for `name` every component version `steps` brings in that its version
        `from_version` did not run (inside the caller's transaction), with an event."""
        old = self.fs.flow_version(name, from_version) if from_version else None
        before = {(s["component"], s["version"]) for s in (old or {}).get("steps", [])}
        brought = sorted(
            {(str(s["component"]), int(s["version"])) for s in steps if s.get("version")} - before
        )
        if not brought:
            return
        QuarantineStore(self.store).add(name, brought, reason, dep)
        named = ", ".join(f"{c} v{v}" for c, v in brought)
        self.store.event(
            "version.quarantined",
            f"{name}: {named} quarantined ({reason}); automatic redeploys will not try it"
            f" again (`deployd flow publish {name} --version {brought[0][0]}@{brought[0][1]}`"
            " publishes it on purpose)",
            flow=name,
            component=brought[0][0],
            detail={"versions": [list(b) for b in brought], "deployment": dep},
        )

    # -- rollback --------------------------------------------------------------------------

    async def _crash_loops(self, new: FlowRun, switched_at: float) -> int | None:
        """Count `new`'s step exits until `rollback_exits` fall within `rollback_window`
        of the switch; the count, or None when the window passed (or `new` stopped)."""
        window = self.config.daemon.rollback_window
        limit = self.config.daemon.rollback_exits
        deadline = switched_at + window  # exits while the switch was under way count too
        seen = 0
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            try:
                exit_ = await asyncio.wait_for(new.next_exit(), remaining)
            except TimeoutError:
                return None
            if exit_ is None:
                return None
            if exit_.at >= deadline - window:
                seen += 1
            if seen >= limit:
                return seen

    async def _watch_rollback(
        self,
        name: str,
        dep: int,
        new: FlowRun,
        from_version: int,
        switched_at: float,
        cause: Cause,
    ) -> None:
        exits = await self._crash_loops(new, switched_at)
        if exits is None:
            await self._redrive(name, dep, new.spec, from_version, switched_at)
            return
        window = self.config.daemon.rollback_window
        async with self.lock(name):
            if self.runs.get(name) is not new:
                return
            c = self.canaries.get(name)
            if c is not None:  # a canary on top of the version that crash-loops: it goes first
                await self.end_canary(
                    c,
                    False,
                    f"v{new.spec.version}, which it was tried beside, crash-loops",
                    canary.SUPERSEDED,
                )
            version = new.spec.version
            reason = f"{exits} step exits within {window:g}s: {new.last_error}"
            tail = new.last_error_log()
            fv = self.fs.flow_version(name, from_version)
            assert fv is not None
            try:
                old = await self._warm_up(name, from_version, fv["steps"])
            except FlowError as exc:
                msg = (
                    f"v{version} crash-loops ({reason}) and the rollback to "
                    f"v{from_version} failed: {exc}"
                )
                self.failed[name] = msg
                with self.store.tx():
                    self.fs.set_flow(name, needs_attention=msg)
                    self.fs.set_deployment(dep, reason=msg, log_tail=tail)
                    self.store.event(
                        "deploy.rollback_failed",
                        f"{name}: {msg}",
                        flow=name,
                        component=cause.component,
                        sha=cause.sha,
                        detail={"deployment": dep, "version": version, "reason": msg},
                    )
                log.error("flow %s: %s", name, msg)
                return
            with self.store.tx():
                self.fs.set_flow(
                    name,
                    active_version=from_version,
                    needs_attention=f"v{version} rolled back: {reason}",
                )
                self.fs.set_deployment(
                    dep, status=DeploymentState.ROLLED_BACK, reason=reason, log_tail=tail
                )
                self.store.event(
                    "deploy.rolled_back",
                    f"{name}: v{version} rolled back to v{from_version}: {reason}",
                    flow=name,
                    component=cause.component,
                    sha=cause.sha,
                    detail={
                        "deployment": dep,
                        "version": version,
                        "to_version": from_version,
                        "reason": reason,
                    },
                )
                if cause.automatic:
                    fv_new = self.fs.flow_version(name, version)
                    self._quarantine(
                        name,
                        from_version,
                        fv_new["steps"] if fv_new else [],
                        f"rolled back: {reason}",
                        dep,
                    )
            log.warning("flow %s: rolled back to v%s: %s", name, from_version, reason)
            self.metrics.deployment(name, DeploymentState.ROLLED_BACK)
            await self.runtime.switch(new, old, old_failing=True)
            self.runs[name] = old

    # -- re-drive on publish ---------------------------------------------------------------

    async def _redrive(
        self, name: str, dep: int, spec: FlowVersionToRun, from_version: int, switched_at: float
    ) -> None:
        """After the rollback window of `spec`'s publish passed: with `retry_errors =
        "on_publish"`, re-queue once into `spec` the dead letters of each step the publish
        moved to another component version that another version of that step failed."""
        version = spec.version
        fv = self.fs.flow_version(name, version)
        if fv is None or (fv["spec"].get("retry_errors") or "manual") != "on_publish":
            return
        # The window must have passed even when the run ended early (`flow stop`): a stopped
        # flow's letters are re-queued all the same and wait for the next start.
        remaining = switched_at + self.config.daemon.rollback_window - time.monotonic()
        if remaining > 0:
            await asyncio.sleep(remaining)
        async with self.lock(name):
            flow = self.fs.flow(name)
            if flow is None or flow["active_version"] != version:
                return  # rolled back, or replaced by a later publish within the window
            old = self.fs.flow_version(name, from_version)
            before = {s["id"]: (s["component"], s["version"]) for s in (old or {}).get("steps", [])}
            letters = DeadLetterStore(self.store)
            redriven: dict[str, int] = {}
            for step in spec.actions:
                now = (step.component, step.version)
                if before.get(step.id) == now:
                    continue
                ids = [
                    int(r["id"])
                    for r in letters.select(name, step.id, None)
                    if (r["component"], r["component_version"]) != now
                ]
                if not ids:
                    continue
                res = await self.runtime.retry_dead_letters(spec, step.id, ids)
                if res.retried + res.failed:
                    redriven[step.id] = res.retried + res.failed
            total = sum(redriven.values())
            with self.store.tx():
                self.fs.set_deployment(dep, redriven=total)
                if total:
                    self.store.event(
                        "errors.redriven",
                        f"{name}: {total} dead letter(s) re-driven into v{version} ("
                        + ", ".join(f"{step} {n}" for step, n in redriven.items())
                        + ")",
                        flow=name,
                        detail={"deployment": dep, "version": version, "steps": redriven},
                    )
        if total:
            log.info("flow %s: %d dead letter(s) re-driven into v%s", name, total, version)


def _ran(data: Any) -> str:
    """What `flows.startup_data` keeps once startup() ran: its result as JSON — "null" when it
    returned nothing, so that it is not run again at every daemon start (NULL: not run since
    the flow was last stopped)."""
    return json.dumps(data)


def _json_load(text: str | None) -> Any:
    return None if text is None else json.loads(text)
