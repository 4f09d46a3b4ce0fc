"""The deployer: what people and new component versions ask of flows.

`apply`, `publish`, `rollback`, `start_flow`, `stop_flow` and `resume` are the operations
behind the CLI and API; `on_version_registered` is the pipeline's cue to draft, validate and
(auto) publish every affected flow. Drafting and validation are `drafts.py`; the publish
state machine with rollback is `publish.py`; what runs the steps is a `Runtime`
(`runtime/base.py`) passed in — the deployer knows no runtime implementation.
"""

from __future__ import annotations

import asyncio
import logging
import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from ..config import Config
from ..errors import FlowError, FlowFrozen, NoCanary, UnknownFlow
from ..metrics import Metrics
from ..pauses import Pauses
from ..runtime.base import Runtime
from ..runtime.credentials import Credentials
from ..store import FlowStore, Row, Store
from ..store.letters import DeadLetterStore
from ..store.pushes import PushStore
from ..store.quarantine import QuarantineStore
from ..toolchains import node as nodetool
from ..types import (
    RUNTIME_NAMES,
    DeploymentState,
    FlowState,
    RetryResult,
    StepStatus,
    VersionRegistered,
)
from . import canary, schema
from .drafts import Drafts
from .freeze import Clock, FreezeTimers, Hold, Sleep, frozen, utc_now
from .letters import MAPPER, Letters
from .metadata import Metadata
from .model import Step
from .ordinary import Ordinary, same_type
from .publish import Cause, Publisher
from .runs import Runs

log = logging.getLogger("deployd.deploy")
_COMPONENT_VERSION_RE = re.compile(r"^([a-z0-9][a-z0-9-]{0,62})@v?([1-9][0-9]{0,17})$")


def _by_hand(what: str, c: canary.Canary) -> str:
    tally = c.run.tally()
    return (
        f"{what} by hand after {tally.new.messages} message(s) of the new version"
        f" ({tally.new.errors} error(s)) and {tally.old.messages} of the old"
        f" ({tally.old.errors} error(s))"
    )


def parse_component_version(text: str) -> tuple[str, int]:
    """ "hello@5" (or "hello@v5") → ("hello", 5); FlowError naming the form otherwise."""
    match = _COMPONENT_VERSION_RE.match(text)
    if match is None:
        raise FlowError(
            f"--version {text[:80]!r} is not COMPONENT@N (e.g. hello@5; see `deployd versions"
            " COMPONENT`)"
        )
    return match[1], int(match[2])


# What an automatic redeploy does with the draft it made (`Deployer.redeploy_action`).
PUBLISH = "publish"
DRAFT_ONLY = "draft only"
NEEDS_ATTENTION = "needs attention"
HELD = "held by freeze"  # `why`: `until <time> (reason)`


@dataclass(frozen=True)
class Action:
    """What happens to a flow's draft for a new component version: `kind` is one of
    PUBLISH, DRAFT_ONLY, NEEDS_ATTENTION, HELD; `why` says why when it is not published
    (with HELD, the hold itself: `held by freeze until … (reason)`)."""

    kind: str
    why: str = ""
    hold: Hold | None = None

    def shown(self) -> str:
        if self.kind == HELD:
            return f"{self.kind} {self.why}"
        return self.kind + (f" ({self.why})" if self.why else "")


def decide(
    config: Config, flow: Row, problems: list[str], paused: bool, now: datetime | None = None
) -> Action:
    """What an automatic redeploy does with the draft it made for `flow` — the one place
    that decides, for `Deployer._redeploy` and for `deployd plan` (which makes no draft).
    `now` is the time the freeze windows are read at (default: the current time)."""
    if problems:
        return Action(NEEDS_ATTENTION, "; ".join(problems))
    if flow["update"] != "auto":
        return Action(DRAFT_ONLY, f'update = "manual": `deployd flow publish {flow["name"]}`')
    if paused:
        return Action(DRAFT_ONLY, f"paused: `deployd resume {flow['name']}` publishes it")
    hold = frozen(config, flow["name"], now)
    if hold is not None:
        return Action(HELD, hold.text().removeprefix(HELD + " "), hold)
    return Action(PUBLISH)


def published_line(res: dict[str, Any]) -> tuple[str, str]:
    """A publish's result as one line for `git push` (and its level)."""
    name, version = res["flow"], res["version"]
    if res["status"] == DeploymentState.DONE:
        gap, warmup = res.get("gap_ms"), res.get("warmup_ms")
        text = f"{name} v{version} published"
        if gap is not None:
            text += f", gap {gap:.1f} ms"
        if warmup is not None:
            text += f" (warm-up {warmup:.0f} ms)"
        return text, "info"
    if res["status"] == DeploymentState.CANARY:
        return (
            f"{name} v{version} started as a canary (`deployd status` shows how it does; it is "
            "promoted or rolled back by itself)",
            "info",
        )
    return (
        f"{name} v{version} was not published: {res.get('reason') or res['status']};"
        f" {name} needs attention (`deployd status`)",
        "error",
    )


def affected(fs: FlowStore, component: str, version: int) -> list[tuple[Row, Row]]:
    """(flow, its active version) of every flow a new `version` of `component` redeploys:
    published, with an unpinned step of it on an older version, running unless manual."""
    out = []
    for flow in fs.flows():
        if not flow["active_version"] or flow["type"] == "ordinary":
            continue  # an ordinary flow's next run takes the new version by itself
        fv = fs.flow_version(flow["name"], flow["active_version"])
        if fv is None:
            continue
        uses = [s for s in fv["steps"] if s["component"] == component and not s["pinned"]]
        if not uses or any(s["version"] >= version for s in uses):
            continue
        if flow["update"] == "auto" and not flow["enabled"]:
            continue  # stopped flows are left alone
        out.append((flow, fv))
    return out


class Deployer:
    """Flows, drafts and publishing, on one runtime."""

    def __init__(
        self,
        config: Config,
        store: Store,
        runtime: Runtime,
        pauses: Pauses,
        metrics: Metrics,
        credentials: Credentials | None = None,
        clock: Clock = utc_now,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        self.config = config
        self.store = store
        self.fs = FlowStore(store)
        self.pushes = PushStore(store)
        self.runtime = runtime
        self.pauses = pauses
        self.metrics = metrics
        self.drafts = Drafts(config, store)
        # The runtime's, when the daemon shares one (a reload then reaches both).
        self.credentials = credentials or Credentials(config, store)
        self.metadata = Metadata(config, store, runtime, self.credentials)
        self.publisher = Publisher(config, store, runtime, self.drafts, metrics)
        # Freeze windows: the clock and sleep are passed in, so tests can drive them.
        self.freezes = FreezeTimers(config, self._freeze_ended, clock=clock, sleep=sleep)
        self.runs = Runs(
            config, store, runtime, self.drafts, lambda steps, ran: self._validate(steps, ran=ran)
        )
        self.ordinary = Ordinary(config, store, self.drafts, self.runs, self.publisher.lock)

    # -- service lifecycle -----------------------------------------------------------------

    async def start(self) -> None:
        """Finish interrupted deployments, bring every enabled flow back up, resume owed
        re-drives of dead letters, then catch up on versions registered but not deployed."""
        await self.runtime.start()
        self.publisher.recover()
        flows = [
            f
            for f in self.fs.flows()
            if f["enabled"] and f["active_version"] and f["type"] != "ordinary"
        ]
        await asyncio.gather(*(self.publisher.start_run(f["name"], initial=False) for f in flows))
        await self.runtime.resumed()  # every run this daemon owns is known now
        self.publisher.resume_redrives()
        await self.catch_up()
        self.arm_freezes()
        self.runs.start()  # ordinary flows: interrupted runs recorded, schedules (catch-up)

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

    async def reload(self, config: Config) -> None:
        """SIGHUP: new settings apply to the next publish; running flows are not restarted."""
        self.config = self.drafts.config = self.publisher.config = config
        self.metadata.config = self.credentials.config = config
        self.freezes.config = config
        self.arm_freezes()  # windows may have been added, moved or removed
        self.runs.reload(config)
        self.ordinary.config = config
        nodetool.forget()  # node may have been installed or upgraded meanwhile
        self.runtime.reload(config.daemon)

    async def stop(self) -> None:
        """Daemon shutdown: stop every flow's processes (flows stay enabled for next start)."""
        await self.freezes.close()
        self.runtime.shutting_down()  # what runs outside this machine keeps running
        await self.runs.stop()
        await self.publisher.stop_all()
        await self.runtime.close()

    # -- user operations -------------------------------------------------------------------

    async def apply(self, text: str, draft_only: bool = False) -> dict[str, Any]:
        """Create the flow or a new draft of it from flow-file text; publish unless draft_only."""
        spec = self.drafts.parse(text)
        if spec.type == "ordinary":
            return await self.ordinary.apply(spec, draft_only)
        async with self.publisher.lock(spec.name):
            existing = self.fs.flow(spec.name)
            same_type(spec.name, existing, spec.type)
            steps = self.drafts.resolve(spec)
            problems = await self._validate(steps, self._active_steps(existing))
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
            return await self._publish_draft(spec.name, Cause("flow apply"))

    async def run_flow(self, name: str) -> dict[str, Any]:
        """`flow run NAME`: a run of an ordinary flow now, whatever its schedule."""
        self._known(name)
        return self.runs.run_now(name)

    async def _validate(
        self, steps: list[Step], before: list[Step] | None = None, ran: list[Step] | None = None
    ) -> list[str]:
        """Every reason `steps` cannot run: component.json's static checks, what the dynamic
        metadata (getMetaModel) of functions that declare it says, and the schema check of
        the edges whose steps changed version against `before` (the steps running now).
        `ran`: the steps that ran before, when not `before` (an ordinary flow's runs)."""
        static = self.drafts.validate(steps, before=before if ran is None else ran)
        # A step already refused (no such version, node missing) is not asked for more.
        refused = {s.id for s in steps if any(p.startswith(f"step {s.id}: ") for p in static)}
        dynamic = await self.metadata.problems(steps, skip=refused)
        return static + dynamic + schema.problems(self.drafts.schema_edges(before, steps))

    def _active_steps(self, flow: Row | None) -> list[Step] | None:
        """The steps of `flow`'s active version (None: no flow, or never published)."""
        if flow is None or not flow["active_version"]:
            return None
        fv = self.fs.flow_version(flow["name"], flow["active_version"])
        return None if fv is None else [Step.model_validate(s) for s in fv["steps"]]

    def redeploy_action(self, flow: Row, problems: list[str]) -> Action:
        """What an automatic redeploy does with the draft it made for `flow` (`decide`)."""
        return decide(
            self.config, flow, problems, self.pauses.flow(flow["name"]), self.freezes.clock()
        )

    async def call_method(
        self,
        component: str,
        method: str,
        function: str,
        cfg: dict[str, Any],
        version: int | None = None,
        field: str | None = None,
        timeout: float | None = None,
        credential: str | None = None,
    ) -> dict[str, Any]:
        """`deployd component call`: a service verb of a component version, run once."""
        extra: dict[str, Any] = {} if timeout is None else {"timeout": timeout}
        return await self.metadata.call(
            component, method, function, cfg, version, field, credential=credential, **extra
        )

    async def verify_credential(
        self, name: str, version: int | None = None, timeout: float | None = None
    ) -> dict[str, Any]:
        """`deployd credential verify`: the verifier of the credential's component, run once
        with the credential's fields."""
        extra = {} if timeout is None else {"timeout": timeout}
        return await self.metadata.verify(name, version, **extra)

    async def publish(
        self, name: str, version: str | None = None, force: bool = False
    ) -> dict[str, Any]:
        """`flow publish NAME`: publish the draft; with `version` ("COMPONENT@N"), publish the
        active version with every unpinned step of COMPONENT moved to vN instead — on purpose,
        also a quarantined version, whose quarantine a live publish lifts. In a freeze window
        it is refused unless `force` (then the event log says it was forced)."""
        self._real_time(name, "publish")
        hold = self.freezes.hold(name)
        if hold is not None and not force:
            raise FlowFrozen(
                f"flow {name} is {hold.text()}: an automatic publish waits for the end of the"
                f" window; `deployd flow publish {name} --force` publishes now"
            )
        trigger = "flow publish --force" if hold is not None else "flow publish"
        if version is not None:
            component, number = parse_component_version(version)
            res = await self._publish_version(name, component, number, trigger)
        else:
            async with self.publisher.lock(name):
                res = await self._publish_draft(name, Cause(trigger))
        if hold is not None:
            with self.store.tx():
                self.store.event(
                    "deploy.forced",
                    f"{name}: v{res.get('version')} published with --force during a freeze"
                    f" ({hold.text()}): {res.get('status')}",
                    flow=name,
                    detail={"freeze": hold.as_json(), "deployment": res.get("deployment")},
                )
        return res

    async def _publish_version(
        self, name: str, component: str, number: int, trigger: str = "flow publish"
    ) -> dict[str, Any]:
        row = self.store.version(component, number) if self.config.component(component) else None
        if row is None:
            raise FlowError(
                f"{component} has no version {number} (see `deployd versions {component}`)"
                if self.config.component(component)
                else f"unknown component {component!r} (see `deployd status`)"
            )
        if not row["artifact_dir"]:
            raise FlowError(f"{component} v{number} was removed by retention; push it again")
        async with self.publisher.lock(name):
            flow = self._known(name)
            if not flow["active_version"]:
                raise FlowError(f"flow {name} has never been published (`deployd flow publish`)")
            fv = self.fs.flow_version(name, flow["active_version"])
            assert fv is not None
            if not any(s["component"] == component and not s["pinned"] for s in fv["steps"]):
                raise FlowError(
                    f"flow {name} v{fv['version']} has no unpinned step of {component}; pin the"
                    " version in the flow file and `deployd flow apply` it instead"
                )
            steps = self.drafts.with_version(fv["steps"], component, number)
            problems = await self._validate(
                steps, ran=[Step.model_validate(s) for s in fv["steps"]]
            )
            if problems:
                raise FlowError(
                    f"{component} v{number} cannot run in {name}, nothing was changed: "
                    + "; ".join(problems)
                )
            reason = f"flow publish --version {component}@{number}"
            res = await self.publisher.publish(
                name,
                fv["spec"],
                [s.model_dump() for s in steps],
                reason,
                Cause(trigger, component, number, row["sha"]),
            )
            quarantine = QuarantineStore(self.store)
            if res.status == DeploymentState.DONE and quarantine.get(name, component, number):
                with self.store.tx():
                    quarantine.lift(name, component, number)
                    self.store.event(
                        "quarantine.lifted",
                        f"{name}: {component} v{number} published on purpose and live: no"
                        " longer quarantined",
                        flow=name,
                        component=component,
                    )
            return res.as_json()

    async def rollback(self, name: str, to: int | None) -> dict[str, Any]:
        """`flow rollback NAME`: during a canary, end it (rolled back: the old version, still
        the active one, keeps running); else publish an earlier version's steps anew (`to`,
        default the version the active one replaced), switching at once."""
        self._real_time(name, "rollback")
        async with self.publisher.lock(name):
            flow = self._known(name)  # read under the lock: a redeploy may just have finished
            c = self.publisher.canaries.get(name)
            if c is not None:
                if to is not None:
                    raise FlowError(
                        f"flow {name} has a canary of v{c.version} in progress: `deployd flow"
                        f" rollback {name}` (without --to) ends it first, keeping"
                        f" v{c.from_version}"
                    )
                res = await self.publisher.end_canary(
                    c, False, _by_hand("rolled back", c), canary.MANUAL
                )
                return res.as_json()
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
            res = await self.publisher.publish(
                name,
                target["spec"],
                target["steps"],
                f"rollback to v{to}",
                Cause("flow rollback"),
                no_canary="a rollback to an earlier version switches at once",
            )
            return res.as_json()

    async def promote(self, name: str) -> dict[str, Any]:
        """`flow promote NAME`: end the canary in progress now, switching to its version."""
        self._real_time(name, "promote")
        async with self.publisher.lock(name):
            c = self._canary(name, "promote")
            res = await self.publisher.end_canary(c, True, _by_hand("promoted", c), canary.MANUAL)
            return res.as_json()

    async def rollback_canary(self, name: str) -> dict[str, Any]:
        """End the canary in progress by rolling it back (refused when none is)."""
        self._real_time(name, "roll back")
        async with self.publisher.lock(name):
            c = self._canary(name, "roll back")
            res = await self.publisher.end_canary(
                c, False, _by_hand("rolled back", c), canary.MANUAL
            )
            return res.as_json()

    def _canary(self, name: str, verb: str) -> canary.Canary:
        self._known(name)
        c = self.publisher.canaries.get(name)
        if c is None:
            raise NoCanary(
                f"flow {name} has no canary in progress: there is nothing to {verb} (a publish"
                " of a flow with [canary] that changes only action steps starts one; see"
                f" `deployd flow show {name}`)"
            )
        return c

    def canary_status(self, name: str) -> dict[str, Any] | None:
        """The canary in progress of `name`, as `status --json` shows it (None: none)."""
        return self.publisher.canary_status(name)

    async def move(self, name: str, runtime: str) -> dict[str, Any]:
        """`flow move`: publish the active version onto another runtime (warm-up there,
        switch at a trigger call boundary); its queued messages are carried across, its dead
        letters and snapshots stay (they are the state database's on every runtime)."""
        if runtime not in RUNTIME_NAMES:
            raise FlowError(f"unknown runtime {runtime!r}: use one of {', '.join(RUNTIME_NAMES)}")
        if runtime == "rabbitmq" and self.config.runtime.rabbitmq.url is None:
            raise FlowError(
                "the rabbitmq runtime is not configured: set [runtime.rabbitmq] url in the"
                " daemon config (README: Queues in RabbitMQ)"
            )
        self._real_time(name, "move")
        async with self.publisher.lock(name):
            flow = self._known(name)
            active = flow["active_version"]
            if not active:
                raise FlowError(f"flow {name} has never been published (`deployd flow publish`)")
            fv = self.fs.flow_version(name, active)
            assert fv is not None
            if runtime != "embedded" and canary.Settings.of(fv["spec"]) is not None:
                raise FlowError(
                    f"flow {name} has [canary]: canary publishes run on the embedded runtime"
                    f" only so far; remove [canary] from its flow file (`deployd flow apply`)"
                    f" before moving it to {runtime}"
                )
            current = fv["spec"].get("runtime") or self.config.runtime.default
            if current == runtime:
                raise FlowError(f"flow {name} already runs on {runtime}")
            if not flow["enabled"]:
                raise FlowError(
                    f"flow {name} is stopped: start it (`deployd flow start {name}`) to move it;"
                    " its queued messages move with it"
                )
            spec = {**fv["spec"], "runtime": runtime}
            res = await self.publisher.publish(
                name,
                spec,
                fv["steps"],
                f"moved from {current} to {runtime}",
                Cause("flow move"),
                no_canary="a move to another runtime switches at once",
            )
            return res.as_json()

    async def start_flow(self, name: str) -> dict[str, Any]:
        flow = self._known(name)
        if flow["type"] == "ordinary":
            return await self.ordinary.resume(name)
        if not flow["active_version"]:
            raise FlowError(f"flow {name} has never been published (`deployd flow publish {name}`)")
        async with self.publisher.lock(name):
            with self.store.tx():
                self.fs.set_flow(name, enabled=1)
            if name not in self.publisher.runs:
                await self.publisher.start_run(name, initial=True)
        if name in self.publisher.failed:
            raise FlowError(f"flow {name} did not start: {self.publisher.failed[name]}")
        return {"flow": name, "state": "running", "version": flow["active_version"]}

    async def stop_flow(self, name: str) -> dict[str, Any]:
        if self._known(name)["type"] == "ordinary":
            return await self.ordinary.pause(name)
        async with self.publisher.lock(name):
            flow = self._known(name)  # read under the lock: a redeploy may just have finished
            await self.publisher.stop_run(name, flow["startup_data"])
            with self.store.tx():
                self.fs.set_flow(name, enabled=0, startup_data=None)
                self.store.event("flow.stopped", f"flow {name} stopped", flow=name)
        return {"flow": name, "state": "stopped"}

    async def resume(self, name: str) -> dict[str, Any] | None:
        """After `deployd resume`: publish the draft an automatic redeploy left, if valid."""
        async with self.publisher.lock(name):
            flow = self._known(name)
            if flow["type"] == "ordinary":
                return None  # its runs take new versions themselves
            draft = self.fs.draft(name)
            if (
                draft is None
                or draft["problems"]
                or flow["update"] != "auto"
                or not flow["enabled"]
                or draft["reason"] == "flow apply"
            ):
                return None
            hold = self.freezes.hold(name)
            if hold is not None:
                self._held(name, str(draft["reason"]), hold)
                return None
            return await self._publish_draft(name, Cause("resume", automatic=True))

    # -- dead letters ----------------------------------------------------------------------

    async def retry_errors(
        self, name: str, step: str | None, ids: list[int] | None
    ) -> dict[str, Any]:
        """Put dead letters of `name` back at the end of their step's input queue, to be
        handled by the flow's active version (running or stopped: stopped, they wait in the
        queue). `ids` None: every letter (of `step`). Unknown names or ids change nothing."""
        async with self.publisher.lock(name):  # the active version cannot change meanwhile
            flow = self._known(name)
            rows = Letters(self.store).choose(name, step, ids)
            if not flow["active_version"]:
                raise FlowError(f"flow {name} has never been published: no version can retry")
            fv = self.fs.flow_version(name, flow["active_version"])
            assert fv is not None
            spec = self.drafts.runnable(name, fv["version"], fv["steps"])
            actions = {s.id for s in spec.actions}
            stray = sorted(
                {str(r["step"]) for r in rows if str(r["step"]).removesuffix(MAPPER) not in actions}
            )
            if ids is not None and stray:
                raise FlowError(
                    f"dead letter(s) of step(s) {', '.join(stray)}, which v{spec.version} of "
                    f"{name} does not have, cannot be retried; nothing was changed (discard "
                    f"them: `deployd flow discard {name} --step STEP --all`)"
                )
            res = RetryResult()
            if rows:
                chosen = None if ids is None else [int(r["id"]) for r in rows]
                res = await self.runtime.retry_dead_letters(spec, step, chosen)
            out = {"flow": name, "version": spec.version, **res.as_json()}
            if rows:
                with self.store.tx():
                    self.store.event(
                        "errors.retried",
                        f"{name}: {res.retried} dead letter(s) put back for v{spec.version}"
                        + (f" (step {step})" if step else "")
                        + (f"; {res.failed} failed their mapping again" if res.failed else "")
                        + (
                            f"; {len(res.skipped)} left (step not in v{spec.version})"
                            if res.skipped
                            else ""
                        ),
                        flow=name,
                        detail={"step": step, "ids": ids, **out},
                    )
        return out

    async def discard_errors(
        self, name: str, step: str | None, ids: list[int] | None
    ) -> dict[str, Any]:
        """Delete dead letters of `name` (`ids` None: every one, of `step`); recorded."""
        self._known(name)
        rows = Letters(self.store).choose(name, step, ids)
        with self.store.tx():
            gone = DeadLetterStore(self.store).delete([int(r["id"]) for r in rows])
            if gone:
                self.store.event(
                    "errors.discarded",
                    f"{name}: {gone} dead letter(s) discarded"
                    + (f" (step {step})" if step else ""),
                    flow=name,
                    detail={"step": step, "ids": ids, "discarded": gone},
                )
        return {"flow": name, "discarded": gone}

    def _real_time(self, name: str, verb: str) -> Row:
        flow = self._known(name)
        if flow["type"] == "ordinary":
            raise FlowError(
                f"flow {name} is an ordinary (scheduled) flow: there is nothing to {verb}, each "
                f"run takes the newest valid component versions (`deployd flow apply FILE` "
                f"changes it, `deployd flow run {name}` runs it now)"
            )
        return flow

    def _known(self, name: str) -> Row:
        flow = self.fs.flow(name)
        if flow is None:
            raise UnknownFlow(name)
        return flow

    async def _publish_draft(self, name: str, cause: Cause) -> dict[str, Any]:
        draft = self.fs.draft(name)
        if draft is None:
            raise FlowError(f"flow {name} has no draft to publish (`deployd flow apply FILE`)")
        if draft["problems"]:
            raise FlowError(f"draft of {name} is not valid: " + "; ".join(draft["problems"]))
        origin = (
            (draft["cause_component"], draft["cause_sha"])
            if draft.get("cause_component") and draft.get("cause_sha")
            else None
        )
        res = await self.publisher.publish(
            name,
            draft["spec"],
            draft["steps"],
            draft["reason"],
            cause,
            from_draft=True,
            origin=origin,
        )
        return res.as_json()

    # -- automatic redeploy ----------------------------------------------------------------

    async def on_version_registered(self, event: VersionRegistered, catch_up: bool = False) -> None:
        """A new component version: draft, validate and (auto) publish every affected flow.

        With `catch_up` (at start-up), flows that already have a draft or a deployment for
        this version are left as they are: a failed deploy is not retried at every restart.
        """
        flows = affected(self.fs, event.component, event.version)
        if not flows and event.push_id is not None:
            self.pushes.note(event.push_id, self._unused(event.component, event.version))
        for flow, _fv in flows:
            held = QuarantineStore(self.store).get(flow["name"], event.component, event.version)
            if held is not None:
                self.pushes.note(
                    event.push_id,
                    f"{flow['name']}: {event.component} v{event.version} is quarantined"
                    f" ({held['reason']}); not published",
                    level="error",
                )
                if not catch_up:  # a catch-up at every start would repeat it
                    with self.store.tx():
                        self.store.event(
                            "deploy.skipped",
                            f"{flow['name']}: {event.component} v{event.version} is quarantined"
                            f" ({held['reason']}); not tried again (`deployd flow publish"
                            f" {flow['name']} --version {event.component}@{event.version}`"
                            " publishes it on purpose)",
                            flow=flow["name"],
                            component=event.component,
                            sha=event.sha,
                        )
                continue
            if catch_up and self._handled(flow["name"], event):
                continue
            self.pushes.note(event.push_id, opened=1)
            self.publisher.spawn(self._reported(flow["name"], event), f"redeploy:{flow['name']}")

    def _unused(self, component: str, version: int) -> str:
        """Why no flow takes `component` v`version` automatically, for the push's feedback."""
        users = []
        for flow in self.fs.flows():
            fv = self.fs.flow_version(flow["name"], flow["active_version"] or 0)
            if fv is not None and any(s["component"] == component for s in fv["steps"]):
                users.append(flow["name"])
        if not users:
            return (
                f"nothing uses {component} yet (a flow whose steps name it deploys it:"
                " `deployd flow apply FILE`)"
            )
        return (
            f"no flow redeploys {component} v{version} by itself ({', '.join(users)}: its"
            " steps are pinned, the flow is stopped, or it takes the newest version at each run)"
        )

    async def _reported(self, name: str, event: VersionRegistered) -> None:
        """`_redeploy`, then one line for the push that brought `event` (if any)."""
        text, level = f"{name}: redeploy interrupted (deployd stopped)", "error"
        try:
            text, level = await self._redeploy(name, event)
        except Exception as exc:
            text = f"{name}: redeploy of {event.component} v{event.version} failed: {exc}"
            raise
        finally:
            self.pushes.note(event.push_id, text, level=level, closed=1)

    def _handled(self, name: str, event: VersionRegistered) -> bool:
        """True when this version was already drafted for a person, or deployed (not merely
        interrupted by a crash) to flow `name`."""
        drafted = self.fs.drafted_for_person(name, event.component, event.sha)
        waiting = self.fs.waiting_draft(name)  # held by a freeze: `arm_freezes` has it
        if waiting is not None and (waiting["cause_component"], waiting["cause_version"]) == (
            event.component,
            event.version,
        ):
            return True
        return drafted or self.fs.deployed_version(name, event.component, event.version)

    async def _redeploy(self, name: str, event: VersionRegistered) -> tuple[str, str]:
        """Draft, validate and (by `redeploy_action`) publish `name` with the new version;
        what happened, as a line for the push's feedback and its level."""
        async with self.publisher.lock(name):
            flow = self._known(name)
            fv = self.fs.flow_version(name, flow["active_version"])
            assert fv is not None
            steps = self.drafts.with_version(fv["steps"], event.component, event.version)
            problems = await self._validate(steps, [Step.model_validate(s) for s in fv["steps"]])
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
                    detail={"version": event.version, "problems": problems},
                )
            action = self.redeploy_action(flow, problems)
            if action.kind == NEEDS_ATTENTION:
                return f"{name} needs attention: {action.why}", "error"
            if action.kind == DRAFT_ONLY:
                if flow["update"] == "auto":  # paused
                    with self.store.tx():
                        self.store.event(
                            "deploy.paused",
                            f"{name} is paused: draft for {reason} kept, not published "
                            f"(`deployd resume {name}` publishes it)",
                            flow=name,
                        )
                return f"{name}: draft for {reason} kept, not published ({action.why})", "info"
            if action.kind == HELD:
                assert action.hold is not None
                self._held(name, reason, action.hold)
                return f"{name}: draft for {reason} kept: {action.why}", "info"
            res = await self._publish_draft(
                name,
                Cause(
                    "component version",
                    event.component,
                    event.version,
                    event.sha,
                    automatic=True,
                ),
            )
            return published_line(res)

    # -- freeze windows --------------------------------------------------------------------

    def _held(self, name: str, reason: str, hold: Hold) -> None:
        """An automatic publish of `name` waits for the end of a freeze: say so, arm the timer."""
        with self.store.tx():
            self.store.event(
                "deploy.frozen",
                f"{name}: draft for {reason} kept, {hold.text()}; it is published when the"
                f" window ends (`deployd flow publish {name} --force` publishes it now)",
                flow=name,
                detail=hold.as_json(),
            )
        self.freezes.arm(name, hold)

    def _waiting(self, name: str) -> Row | None:
        """The draft an automatic publish of `name` left waiting (see `FlowStore.waiting_draft`)
        when it may still be published automatically: the flow runs, is updated
        automatically, is not paused, and the draft brings in no quarantined version."""
        flow = self.fs.flow(name)
        draft = self.fs.waiting_draft(name)
        if flow is None or draft is None or flow["update"] != "auto" or not flow["enabled"]:
            return None
        if self.pauses.flow(name):
            return None
        quarantine = QuarantineStore(self.store)
        if any(quarantine.get(name, s["component"], s["version"]) for s in draft["steps"]):
            return None
        return draft

    def arm_freezes(self) -> None:
        """At start and after a reload: a timer for every waiting draft of a frozen flow; a
        draft whose freeze ended while the daemon was down (or whose window was removed) is
        published now. This is what makes a held publish survive a restart."""
        for flow in self.fs.flows():
            name = flow["name"]
            if self._waiting(name) is None:
                self.freezes.cancel(name)
                continue
            hold = self.freezes.hold(name)
            if hold is not None:
                self.freezes.arm(name, hold)
            else:
                self.freezes.cancel(name)
                self.publisher.spawn(self._freeze_ended(name), f"freeze-end:{name}")

    async def _freeze_ended(self, name: str) -> None:
        """The timer of `name` ran out: publish its waiting draft, unless another window holds
        it now (then the timer is armed again)."""
        async with self.publisher.lock(name):
            draft = self._waiting(name)
            if draft is None:
                return
            hold = self.freezes.hold(name)
            if hold is not None:
                self.freezes.arm(name, hold)
                return
            with self.store.tx():
                self.store.event(
                    "freeze.ended",
                    f"{name}: the freeze is over; publishing the draft for {draft['reason']}",
                    flow=name,
                )
            await self._publish_draft(
                name,
                Cause(
                    "freeze ended",
                    draft["cause_component"],
                    draft["cause_version"],
                    draft["cause_sha"],
                    automatic=True,
                ),
            )

    # -- status ----------------------------------------------------------------------------

    def flow_state(self, name: str, enabled: bool, type_: str = "realtime") -> FlowState:
        if type_ == "ordinary":
            if self.runs.running(name):
                return FlowState.RUNNING
            return FlowState.SCHEDULED if enabled else FlowState.STOPPED
        return self.publisher.state(name, enabled)

    def step_status(self, name: str) -> list[StepStatus] | None:
        """Live steps of a running flow or run (None when it does not run)."""
        return self.runs.step_status(name) or self.publisher.step_status(name)

    def next_run_at(self, name: str) -> str | None:
        """When an ordinary flow runs next (None: not scheduled)."""
        return self.runs.next_run_at(name)

    def running_count(self) -> int:
        return len(self.publisher.runs)

    def update_gauges(self) -> None:
        """Refresh the point-in-time metrics (queue depths, dead letters, flows by state) before
        a scrape."""
        depths = self.runtime.queue_depths()
        for flow_name, run in self.publisher.runs.items():  # an empty queue has no row: 0
            for action in run.spec.actions:
                depths.setdefault((flow_name, action.id), 0)
        for (flow_name, step_id), depth in depths.items():
            self.metrics.set_queue_depth(flow_name, step_id, depth)
        self.metrics.set_dead_letters(self.runtime.dead_letter_counts())
        states: dict[str, int] = {}
        for flow in self.fs.flows():
            state = self.flow_state(flow["name"], bool(flow["enabled"]), flow["type"])
            states[state] = states.get(state, 0) + 1
        self.metrics.set_flows(states)
