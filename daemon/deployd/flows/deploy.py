"""The deployer: flows, drafts, validation and the publish state machine (with rollback).

Publishing a new version of a running flow, crash-only:
    deployment(starting_new) → start every new step process, wait until all are ready
      ├─ a step fails or times out → kill the new processes, deployment(failed); old runs on
      └─ all ready → in ONE transaction: flow.active_version = new, deployment(switching)
         → old trigger stops at a call boundary, new trigger starts at once (gap_ms);
           old actions finish their in-flight message; new actions take over the queues
         → deployment(done); a watcher restores the old version if the new steps exit
           `rollback_exits` times within `rollback_window` → deployment(rolled_back)
A daemon killed at any line restarts into exactly one active version: `recover()` marks
starting_new as failed (the old version is still active) and switching as done.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import tomllib
from typing import Any

from ..config import Config
from ..errors import FlowError
from ..paths import Paths
from ..runtime.node_pool import NodeSettings
from ..runtime.process import Launcher, StepFailed, log_tail
from ..runtime.router import Router
from ..runtime.runner import FlowRunner
from ..store import FlowStore, Store
from ..toolchains import node as noderuntime
from ..types import VersionRegistered
from . import model

log = logging.getLogger("deployd.deploy")
BOUNDARY_WAIT = 5.0


class Deployer:
    def __init__(self, config: Config, store: Store, paths: Paths) -> None:
        self.config = config
        self.store = store
        self.fs = FlowStore(store)
        self.paths = paths
        self.router = Router(store)
        self.launcher = Launcher(
            paths.root,
            NodeSettings(
                binary=config.daemon.node,
                pool=config.daemon.node_pool,
                end_timeout=config.daemon.node_end_timeout,
            ),
        )
        self.runners: dict[str, FlowRunner] = {}
        self.publishing: set[str] = set()
        self.failed: dict[str, str] = {}
        self.paused: set[str] = set()  # flows whose automatic redeploys are paused
        self.metrics: Any = None  # deployd.metrics.Metrics, set by the service
        self._locks: dict[str, asyncio.Lock] = {}
        self._tasks: set[asyncio.Task[Any]] = set()

    def _lock(self, name: str) -> asyncio.Lock:
        return self._locks.setdefault(name, asyncio.Lock())

    def _spawn(self, coro: Any, name: str) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # -- service lifecycle -----------------------------------------------------------------

    async def start(self) -> None:
        """Finish interrupted deployments, then bring every enabled flow back up."""
        await self.launcher.start()
        self.recover()
        flows = [f for f in self.fs.flows() if f["enabled"] and f["active_version"]]
        await asyncio.gather(*(self._start_runner(f["name"], initial=False) for f in flows))
        await self.catch_up()

    async def catch_up(self) -> None:
        """Redeploy what a killed daemon registered but never got to publish.

        A version registered just before a crash has no draft or deployment yet; without this
        its flows would stay on the older version until the next push. Every version newer
        than what a flow runs is offered, oldest first, not only the recent one: when a kill
        cut the publish of a good version and a newer one cannot run (import error, missing
        action), replaying them in order ends on the good one, as it would have without it.
        """
        used: dict[str, int] = {}
        for flow in self.fs.flows():
            fv = self.fs.flow_version(flow["name"], flow["active_version"] or 0)
            for s in fv["steps"] if fv else ():
                if not s["pinned"]:
                    used[s["component"]] = min(used.get(s["component"], s["version"]), s["version"])
        for comp, oldest in used.items():
            for row in reversed(self.store.versions(comp)):
                if row["version"] > oldest and row["artifact_dir"]:  # not removed by gc
                    event = VersionRegistered(comp, row["version"], row["sha"], row["semver"])
                    await self.on_version_registered(event, catch_up=True)

    def recover(self) -> None:
        for dep in self.fs.unfinished_deployments():
            with self.store.tx():
                if dep["status"] == "switching":
                    self.fs.set_deployment(dep["id"], status="done")
                else:
                    self.fs.set_deployment(
                        dep["id"],
                        status="failed",
                        interrupted=1,
                        reason="interrupted: the daemon stopped before the new steps were ready",
                    )
                self.store.event(
                    "deploy.recovered",
                    f"deployment {dep['id']} of {dep['flow']} finished at start-up",
                    flow=dep["flow"],
                )

    async def reload(self, config: Config) -> None:
        """SIGHUP: new settings apply to the next publish; running flows are not restarted."""
        self.config = config
        noderuntime.forget()  # node may have been installed or upgraded meanwhile
        self.launcher.node.settings = NodeSettings(
            binary=config.daemon.node,
            pool=config.daemon.node_pool,
            end_timeout=config.daemon.node_end_timeout,
        )

    async def stop(self) -> None:
        """Daemon shutdown: stop every flow's processes (flows stay enabled for next start)."""
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await asyncio.gather(*(r.stop() for r in self.runners.values()))
        self.runners.clear()
        await self.launcher.stop()

    # -- resolving steps -------------------------------------------------------------------

    def _recent_versions(self, spec: model.FlowSpec) -> dict[str, int | None]:
        recent = self.store.recent_all()  # one query, no descriptor decoding
        return {
            s.component: (recent[s.component]["version"] if s.component in recent else None)
            for s in spec.steps
        }

    def _descriptors(self, steps: list[model.Step]) -> dict[tuple[str, int], dict[str, Any]]:
        out = {}
        for s in steps:
            if s.version is not None and (s.component, s.version) not in out:
                row = self.store.version(s.component, s.version)
                if row:
                    desc = dict(row["descriptor"])
                    desc.setdefault("runtime", row["runtime"])
                    out[(s.component, s.version)] = desc
        return out

    def _node_error(self) -> str | None:
        """Why `runtime = "node"` steps cannot run here (None: they can)."""
        return noderuntime.detect(self.config.daemon.node).error

    def _check_components(self, spec: model.FlowSpec) -> None:
        for step in spec.steps:
            if self.config.component(step.component) is None:
                known = ", ".join(c.name for c in self.config.components) or "none"
                raise FlowError(
                    f"step {step.id}: unknown component {step.component!r} (known: {known})"
                )

    def _runnable(self, steps: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Steps with their artifact folder, `main` file and runtime filled in."""
        out = []
        rows: dict[tuple[str, int], Any] = {}
        for s in steps:
            key = (s["component"], s["version"])
            if key not in rows:  # 30 steps of one component: one read, one JSON decode
                rows[key] = self.store.version(*key)
            row = rows[key]
            if row is None:
                raise FlowError(f"step {s['id']}: {s['component']} v{s['version']} is gone")
            if not row["artifact_dir"]:
                raise FlowError(
                    f"step {s['id']}: the code of {s['component']} v{s['version']} was removed "
                    "by retention (raise daemon.keep_versions, or use a newer version)"
                )
            desc = row["descriptor"]
            group = "triggers" if s["kind"] == "trigger" else "actions"
            func = (desc.get(group) or {}).get(s["function"])
            if func is None:
                raise FlowError(f"step {s['id']}: {s['function']!r} is not in {s['component']}")
            out.append(
                {
                    **s,
                    "artifact_dir": row["artifact_dir"],
                    "main": func["main"],
                    "runtime": desc.get("runtime") or row["runtime"],
                }
            )
        return out

    # -- user operations -------------------------------------------------------------------

    async def apply(self, text: str, draft_only: bool = False) -> dict[str, Any]:
        """Create the flow or a new draft of it from flow-file text; publish unless draft_only."""
        try:
            raw = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise FlowError(f"flow file is not valid TOML: {exc}") from exc
        except RecursionError as exc:
            raise FlowError("flow file is nested too deeply to read; flatten it") from exc
        spec = model.parse(raw, "flow file")
        self._check_components(spec)
        async with self._lock(spec.name):
            existing = self.fs.flow(spec.name)
            steps = model.resolve(spec, self._recent_versions(spec))
            problems = model.validate(steps, self._descriptors(steps), self._node_error())
            if problems and not draft_only:
                raise FlowError(
                    f"flow {spec.name} is not valid, nothing was changed: " + "; ".join(problems)
                )
            with self.store.tx():
                if existing is None:
                    self.fs.create_flow(spec.name, spec.type, spec.update)
                self.fs.put_draft(
                    spec.name,
                    spec.model_dump(mode="json"),
                    [s.model_dump() for s in steps],
                    problems,
                    "flow apply",
                    cause=None,  # a person's apply, not a component version
                )
                self.store.event(
                    "draft.created",
                    f"draft of {spec.name} created by flow apply"
                    + (f" with {len(problems)} problem(s)" if problems else ""),
                    flow=spec.name,
                )
            if draft_only:
                return {"flow": spec.name, "draft": True, "problems": problems}
            if existing is None:
                with self.store.tx():
                    self.fs.set_flow(spec.name, enabled=1)
            return await self._publish_draft(spec.name, trigger="flow apply")

    async def publish(self, name: str) -> dict[str, Any]:
        self._known(name)
        async with self._lock(name):
            return await self._publish_draft(name, trigger="flow publish")

    async def rollback(self, name: str, to: int | None) -> dict[str, Any]:
        self._known(name)
        async with self._lock(name):
            flow = self._known(name)  # read under the lock: a redeploy may just have finished
            active = flow["active_version"]
            if to is None:
                to = self.fs.rollback_source(name, active)
                if to is None:
                    raise FlowError(f"flow {name} has no earlier version to roll back to; use --to")
            target = self.fs.flow_version(name, to)
            if target is None:
                raise FlowError(f"flow {name} has no version {to} (see `deployd flow history`)")
            if to == active:
                raise FlowError(f"flow {name} already runs version {to}")
            return await self._publish(
                name, target["spec"], target["steps"], f"rollback to v{to}", trigger="flow rollback"
            )

    async def start_flow(self, name: str) -> dict[str, Any]:
        flow = self._known(name)
        if not flow["active_version"]:
            raise FlowError(f"flow {name} has never been published (`deployd flow publish {name}`)")
        async with self._lock(name):
            with self.store.tx():
                self.fs.set_flow(name, enabled=1)
            if name not in self.runners:
                await self._start_runner(name, initial=True)
        if name in self.failed:
            raise FlowError(f"flow {name} did not start: {self.failed[name]}")
        return {"flow": name, "state": "running", "version": flow["active_version"]}

    async def stop_flow(self, name: str) -> dict[str, Any]:
        self._known(name)
        async with self._lock(name):
            flow = self._known(name)  # read under the lock: a redeploy may just have finished
            runner = self.runners.pop(name, None)
            if runner is not None:
                data = flow["startup_data"]
                await runner.trigger_hook("shutdown", _json_load(data))
                await runner.stop()
            self.failed.pop(name, None)
            with self.store.tx():
                self.fs.set_flow(name, enabled=0, startup_data=None)
                self.store.event("flow.stopped", f"flow {name} stopped", flow=name)
        return {"flow": name, "state": "stopped"}

    def _known(self, name: str) -> dict[str, Any]:
        flow = self.fs.flow(name)
        if flow is None:
            raise FlowError(f"unknown flow {name!r} (see `deployd flow list`)")
        return flow

    # -- running ---------------------------------------------------------------------------

    def _runner(self, name: str, version: int, steps: list[dict[str, Any]]) -> FlowRunner:
        runner = FlowRunner(
            self.launcher, self.router, self.paths.step_logs, name, version, self._runnable(steps)
        )
        runner.drain_timeout = self.config.daemon.stop_timeout
        return runner

    async def _start_runner(self, name: str, initial: bool) -> None:
        flow = self.fs.flow(name)
        if flow is None or not flow["active_version"]:
            return
        fv = self.fs.flow_version(name, flow["active_version"])
        if fv is None:
            return
        try:
            runner = self._runner(name, fv["version"], fv["steps"])
            await runner.start(self.config.daemon.warmup_timeout)
        except (StepFailed, FlowError) as exc:
            self.failed[name] = str(exc)
            with self.store.tx():
                self.store.event("flow.failed", f"flow {name} did not start: {exc}", flow=name)
            return
        self.failed.pop(name, None)
        if initial or flow["startup_data"] is None:
            data = await runner.trigger_hook("startup")  # before the first process() call
            with self.store.tx():
                self.fs.set_flow(name, startup_data=_json_dump(data))
        runner.start_loops()
        self.runners[name] = runner
        with self.store.tx():
            self.store.event("flow.started", f"flow {name} v{fv['version']} running", flow=name)

    async def _publish_draft(self, name: str, trigger: str, **cause: Any) -> dict[str, Any]:
        draft = self.fs.draft(name)
        if draft is None:
            raise FlowError(f"flow {name} has no draft to publish (`deployd flow apply FILE`)")
        if draft["problems"]:
            raise FlowError(f"draft of {name} is not valid: " + "; ".join(draft["problems"]))
        return await self._publish(
            name, draft["spec"], draft["steps"], draft["reason"], trigger, from_draft=True, **cause
        )

    async def _publish(
        self,
        name: str,
        spec: dict[str, Any],
        steps: list[dict[str, Any]],
        reason: str | None,
        trigger: str,
        from_draft: bool = False,
        component: str | None = None,
        component_version: int | None = None,
        sha: str | None = None,
    ) -> dict[str, Any]:
        """The publish state machine (see the module docstring). Holds the flow's lock."""
        flow = self._known(name)
        old = self.runners.get(name)
        from_version = flow["active_version"]
        with self.store.tx():
            version = self.fs.add_flow_version(name, spec, steps, reason)
            dep = self.fs.start_deployment(
                name, from_version, version, trigger, component, component_version, sha
            )
            self.store.event(
                "deploy.started",
                f"publishing {name} v{version}"
                + (f" (was v{from_version})" if from_version else ""),
                flow=name,
                component=component,
                sha=sha,
                detail={"deployment": dep, "trigger": trigger},
            )
        result = {"flow": name, "deployment": dep, "version": version, "from_version": from_version}
        if not flow["enabled"]:
            with self.store.tx():
                self._activate(name, version, spec, from_draft)
                self.fs.set_deployment(dep, status="done", reason="flow is stopped: not started")
            return {**result, "status": "done"}
        self.publishing.add(name)
        try:
            started = time.monotonic()
            try:
                new = self._runner(name, version, steps)
                await new.start(self.config.daemon.warmup_timeout)
            except (StepFailed, FlowError) as exc:
                tail = ""
                if isinstance(exc, StepFailed):
                    tail = log_tail(self.paths.step_logs / name / f"{exc.step}.log")
                msg = f"deploy of v{version} failed: {exc}"
                with self.store.tx():
                    self.fs.set_deployment(dep, status="failed", reason=str(exc), log_tail=tail)
                    self.fs.set_flow(name, needs_attention=msg)
                    self.store.event("deploy.failed", f"{name}: {msg}", flow=name)
                log.warning("flow %s: %s", name, msg)
                if self.metrics is not None:
                    self.metrics.deployment(name, "failed")
                return {**result, "status": "failed", "reason": str(exc)}
            warmup_ms = (time.monotonic() - started) * 1000
            with self.store.tx():
                self.fs.set_deployment(dep, status="switching", warmup_ms=warmup_ms)
                self._activate(name, version, spec, from_draft)
            if old is None and flow["startup_data"] is None:
                data = await new.trigger_hook("startup")  # before the first process() call
                with self.store.tx():
                    self.fs.set_flow(name, startup_data=_json_dump(data))
            switched_at = time.monotonic()
            gap_ms = await self._switch(name, old, new)
            self.runners[name] = new
            self.failed.pop(name, None)
            with self.store.tx():
                self.fs.set_deployment(dep, status="done", gap_ms=gap_ms)
                self.store.event(
                    "deploy.done",
                    f"{name} v{version} live (warm-up {warmup_ms:.0f} ms"
                    + (f", gap {gap_ms:.1f} ms)" if gap_ms is not None else ")"),
                    flow=name,
                    component=component,
                    sha=sha,
                )
            if from_version is not None:
                self._spawn(
                    self._watch_rollback(name, dep, new, from_version, switched_at),
                    f"rollback-watch:{name}",
                )
            if self.metrics is not None:
                self.metrics.deployment(name, "done")
                self.metrics.warmup(name, warmup_ms / 1000)
                if gap_ms is not None:
                    self.metrics.switch_gap(name, gap_ms / 1000)
            return {**result, "status": "done", "warmup_ms": warmup_ms, "gap_ms": gap_ms}
        finally:
            self.publishing.discard(name)

    def _activate(self, name: str, version: int, spec: dict[str, Any], from_draft: bool) -> None:
        """Make `version` the active one (inside the caller's transaction): the commit point."""
        self.fs.set_flow(
            name, active_version=version, update=spec.get("update", "auto"), needs_attention=None
        )
        if from_draft:
            self.fs.delete_draft(name)

    async def _switch(self, name: str, old: FlowRunner | None, new: FlowRunner) -> float | None:
        """Hand the flow from `old` to `new`; returns the trigger gap in ms (None if no old)."""
        if old is None:
            new.start_loops()
            return None
        trigger_new = new.steps[0]["id"]
        actions_old = [s["id"] for s in old.steps[1:]]

        async def switch_trigger() -> float | None:
            await old.stop_trigger_at_boundary(BOUNDARY_WAIT)
            end = old.last_call_end
            new.start_loops([trigger_new])
            try:  # a new trigger that died before its first call is restarted (or rolled back)
                await asyncio.wait_for(new.first_call.wait(), self.config.daemon.warmup_timeout)
            except TimeoutError:
                return None
            if end is None or new.first_call_at is None:
                return None
            return max(0.0, (new.first_call_at - end) * 1000)

        async def switch_actions() -> None:
            await asyncio.gather(*(old.stop_loop(sid) for sid in actions_old))
            new_ids = [s["id"] for s in new.steps[1:]]
            with self.store.tx():
                moved = self.fs.requeue_orphans(name, [s["id"] for s in new.steps], new_ids[0])
            if moved:
                log.info("flow %s: %d queued message(s) moved to step %s", name, moved, new_ids[0])
            new.start_loops(new_ids)

        gap_ms, _ = await asyncio.gather(switch_trigger(), switch_actions())
        self._spawn(old.stop(), f"stop-old:{name}")
        return gap_ms

    async def _watch_rollback(
        self, name: str, dep: int, new: FlowRunner, from_version: int, switched_at: float
    ) -> None:
        window = self.config.daemon.rollback_window
        limit = self.config.daemon.rollback_exits
        # The window starts at the switch: exits while it was under way count too.
        deadline = switched_at + window
        while time.monotonic() < deadline:
            await asyncio.sleep(0.1)
            if self.runners.get(name) is not new:
                return
            recent = [t for t in new.exit_times if t >= deadline - window]
            if len(recent) >= limit:
                break
        else:
            return
        async with self._lock(name):
            if self.runners.get(name) is not new:
                return
            reason = f"{len(new.exit_times)} step exits within {window:g}s: {new.last_error}"
            tail = ""
            if new.last_error_step is not None:
                tail = log_tail(self.paths.step_logs / name / f"{new.last_error_step}.log")
            fv = self.fs.flow_version(name, from_version)
            assert fv is not None
            try:
                old = self._runner(name, from_version, fv["steps"])
                await old.start(self.config.daemon.warmup_timeout)
            except (StepFailed, FlowError) as exc:
                msg = (
                    f"v{new.version} crash-loops ({reason}) and the rollback to "
                    f"v{from_version} failed: {exc}"
                )
                self.failed[name] = msg
                with self.store.tx():
                    self.fs.set_flow(name, needs_attention=msg)
                    self.fs.set_deployment(dep, reason=msg, log_tail=tail)
                    self.store.event("deploy.rollback_failed", f"{name}: {msg}", flow=name)
                log.error("flow %s: %s", name, msg)
                return
            with self.store.tx():
                self.fs.set_flow(
                    name,
                    active_version=from_version,
                    needs_attention=f"v{new.version} rolled back: {reason}",
                )
                self.fs.set_deployment(dep, status="rolled_back", reason=reason, log_tail=tail)
                self.store.event(
                    "deploy.rolled_back",
                    f"{name}: v{new.version} rolled back to v{from_version}: {reason}",
                    flow=name,
                )
            log.warning("flow %s: rolled back to v%s: %s", name, from_version, reason)
            if self.metrics is not None:
                self.metrics.deployment(name, "rolled_back")
            new.supervise = False
            await self._switch(name, new, old)
            self.runners[name] = old

    # -- automatic redeploy ----------------------------------------------------------------

    async def on_version_registered(self, event: VersionRegistered, catch_up: bool = False) -> None:
        """A new component version: draft, validate and (auto) publish every affected flow.

        With `catch_up` (at start-up), flows that already have a draft or a deployment for
        this version are left as they are: a failed deploy is not retried at every restart.
        """
        for flow in self.fs.flows():
            if not flow["active_version"]:
                continue
            fv = self.fs.flow_version(flow["name"], flow["active_version"])
            if fv is None:
                continue
            uses = [s for s in fv["steps"] if s["component"] == event.component and not s["pinned"]]
            if not uses or any(s["version"] >= event.version for s in uses):
                continue
            if flow["update"] == "auto" and not flow["enabled"]:
                continue  # stopped flows are left alone
            if catch_up and self._handled(flow["name"], event):
                continue
            self._spawn(self._redeploy(flow["name"], event), f"redeploy:{flow['name']}")

    def _handled(self, name: str, event: VersionRegistered) -> bool:
        """True when this version was already drafted for a person, or deployed (not merely
        interrupted by a crash) to flow `name`."""
        drafted = self.fs.drafted_for_person(name, event.component, event.sha)
        return drafted or self.fs.deployed_version(name, event.component, event.version)

    async def _redeploy(self, name: str, event: VersionRegistered) -> None:
        async with self._lock(name):
            flow = self._known(name)
            fv = self.fs.flow_version(name, flow["active_version"])
            assert fv is not None
            steps = [
                model.Step.model_validate(
                    {**s, "version": event.version}
                    if s["component"] == event.component and not s["pinned"]
                    else s
                )
                for s in fv["steps"]
            ]
            problems = model.validate(steps, self._descriptors(steps), self._node_error())
            reason = f"{event.component} v{event.version} ({event.sha[:12]})"
            with self.store.tx():
                self.fs.put_draft(
                    name, fv["spec"], [s.model_dump() for s in steps], problems, reason, cause=event
                )
                if problems:
                    self.fs.set_flow(name, needs_attention="; ".join(problems))
                self.store.event(
                    "draft.created",
                    f"draft of {name} for {reason}"
                    + (": needs attention: " + "; ".join(problems) if problems else ""),
                    flow=name,
                    component=event.component,
                    sha=event.sha,
                )
            if problems or flow["update"] != "auto":
                return
            if name in self.paused:
                with self.store.tx():
                    self.store.event(
                        "deploy.paused",
                        f"{name} is paused: draft for {reason} kept, not published "
                        f"(`deployd resume {name}` publishes it)",
                        flow=name,
                    )
                return
            await self._publish_draft(
                name,
                trigger="component version",
                component=event.component,
                component_version=event.version,
                sha=event.sha,
            )

    async def resume(self, name: str) -> dict[str, Any] | None:
        """After `deployd resume`: publish the draft an automatic redeploy left, if valid."""
        async with self._lock(name):
            flow = self._known(name)
            draft = self.fs.draft(name)
            if (
                draft is None
                or draft["problems"]
                or flow["update"] != "auto"
                or not flow["enabled"]
                or draft["reason"] == "flow apply"
            ):
                return None
            return await self._publish_draft(name, trigger="resume")

    def update_gauges(self) -> None:
        """Refresh the point-in-time metrics (queue depths, flows by state) before a scrape."""
        if self.metrics is None:
            return
        depths = self.fs.queue_depths()
        for flow_name, runner in self.runners.items():  # an empty queue has no row: 0
            for action in runner.steps[1:]:
                depths.setdefault((flow_name, action["id"]), 0)
        for (flow_name, step_id), depth in depths.items():
            self.metrics.set_queue_depth(flow_name, step_id, depth)
        states: dict[str, int] = {}
        for flow in self.fs.flows():
            state = self.flow_state(flow["name"], bool(flow["enabled"]))
            states[state] = states.get(state, 0) + 1
        self.metrics.set_flows(states)

    # -- status ----------------------------------------------------------------------------

    def flow_state(self, name: str, enabled: bool) -> str:
        if name in self.publishing:
            return "publishing"
        if name in self.failed:
            return "failed"
        return "running" if name in self.runners else ("failed" if enabled else "stopped")


def _json_dump(data: Any) -> str | None:
    import json

    return None if data is None else json.dumps(data)


def _json_load(text: str | None) -> Any:
    import json

    return None if text is None else json.loads(text)
