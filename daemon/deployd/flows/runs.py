"""Runs of ordinary (scheduled) flows: each run takes the newest valid component versions.

    due (schedule, catch-up, `flow run`) ─▶ run recorded `running` (the intent)
      ─▶ resolve: every unpinned step → its component's newest registered version that
         validates against the flow (an older valid one + needs attention when the newest
         does not) ─▶ warm up ─▶ trigger startup() ─▶ `Runtime.run_once` (process() once,
         every queue drained) ─▶ shutdown() ─▶ stop ─▶ run recorded with its status

A run holds its resolved steps to the end: a version registered meanwhile is the next run's.
There is no draft, no publish and no deployment record. `overlap` decides about a run due
while one is going ("skip": recorded skipped; "queue": one waits). A run a killed daemon left
`running` is recorded `failed` (interrupted) at the next start; its messages stay queued and
the next run's actions take them first.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from datetime import datetime
from typing import Any

from ..config import Config
from ..errors import FlowError, UnknownFlow
from ..runtime.base import FlowRun, RunOutcome, Runtime, StepFailed
from ..store import FlowStore, Row, Store
from ..store.runs import RunStore
from ..types import StepStatus
from .drafts import Drafts
from .freeze import Hold, frozen
from .model import Step
from .schedule import Schedule

log = logging.getLogger("deployd.runs")
INTERRUPTED = (
    "interrupted: the daemon stopped during the run (its queued messages wait for the next run)"
)
MAX_ERRORS = 20  # error lines kept with a run (and how many more there were)
KEEP_RUNS = 1000  # runs kept per flow (the newest)

# (steps, the steps that ran before: a function of theirs missing now "no longer exists")
Validate = Callable[[list[Step], list[Step]], Awaitable[list[str]]]


class Runs:
    """Schedules ordinary flows and runs them through a `Runtime`."""

    def __init__(
        self,
        config: Config,
        store: Store,
        runtime: Runtime,
        drafts: Drafts,
        validate: Validate,
    ) -> None:
        self.config = config
        self.store = store
        self.fs = FlowStore(store)
        self.rs = RunStore(store)
        self.runtime = runtime
        self.drafts = drafts
        self.validate = validate
        self.schedule = Schedule(store, config.daemon.timezone, self.due)
        self.tasks: dict[str, asyncio.Task[None]] = {}  # the run going, by flow
        self.current: dict[str, FlowRun] = {}  # its steps, once warm
        self.run_ids: dict[str, int] = {}
        self.waiting: set[str] = set()  # overlap = "queue": a run waits for the one going
        self.stopping = False

    # -- lifecycle -------------------------------------------------------------------------

    def recover(self) -> None:
        """At start-up: a run a killed daemon left `running` is failed (interrupted)."""
        with self.store.tx():
            for row in self.rs.interrupt_running(INTERRUPTED):
                self.store.event(
                    "run.failed",
                    f"run {row['id']} of {row['flow']} {INTERRUPTED}",
                    flow=row["flow"],
                )

    def start(self) -> None:
        """Schedule every enabled ordinary flow (missed due times caught up per catch_up)."""
        self.recover()
        self.schedule.start()
        for flow in self.fs.flows():
            if flow["type"] == "ordinary" and flow["enabled"] and flow["active_version"]:
                fv = self.fs.flow_version(flow["name"], flow["active_version"])
                if fv is not None:
                    self.schedule.add(flow["name"], fv["spec"], at_start=True)

    async def stop(self) -> None:
        """Daemon shutdown: no more runs; a run going is stopped and recorded interrupted."""
        self.stopping = True
        self.schedule.stop()
        self.waiting.clear()
        tasks = list(self.tasks.values())
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    def reload(self, config: Config) -> None:
        self.config = config  # a new daemon.timezone applies after a restart

    # -- schedule --------------------------------------------------------------------------

    def scheduled(self, name: str, spec: dict[str, Any]) -> str | None:
        """`flow apply` / `flow start`: (re)schedule `name`; its next due time."""
        return self.schedule.add(name, spec)

    def paused(self, name: str) -> None:
        """`flow stop`: no more runs on the schedule (a run going finishes)."""
        self.schedule.remove(name)
        self.waiting.discard(name)

    def next_run_at(self, name: str) -> str | None:
        return self.schedule.next_run_at(name)

    def running(self, name: str) -> bool:
        return name in self.tasks

    def step_status(self, name: str) -> list[StepStatus] | None:
        run = self.current.get(name)
        return run.status() if run is not None else None

    # -- runs ------------------------------------------------------------------------------

    def due(self, name: str, cause: str) -> None:
        """The schedule says `name` is due: run, or skip/queue per its overlap."""
        if self.stopping:
            return
        if name in self.tasks:
            overlap = self._spec(name).get("overlap") or "skip"
            going = self.run_ids.get(name)
            if overlap == "queue" and name not in self.waiting:
                self.waiting.add(name)
                return
            reason = (
                f"run {going} was still going"
                if overlap == "skip"
                else f"run {going} was still going and another run already waits"
            )
            with self.store.tx():  # recorded as a run, not an event: it may happen every second
                self.rs.skipped_run(name, cause, reason)
                self.rs.prune(name, KEEP_RUNS)
            return
        self.begin(name, cause)

    def begin(self, name: str, cause: str) -> int:
        """Record a run of `name` as running and start it; its id."""
        flow = self.fs.flow(name)
        if flow is None or not flow["active_version"]:
            raise UnknownFlow(name)
        with self.store.tx():
            run_id = self.rs.start_run(name, cause, flow["active_version"], [])
        self.run_ids[name] = run_id
        self.tasks[name] = self._spawn(self._run(name, run_id), f"run:{name}")
        return run_id

    def run_now(self, name: str) -> dict[str, Any]:
        """`flow run NAME`: a run now, whatever the schedule (also of a stopped flow)."""
        flow = self.fs.flow(name)
        if flow is None:
            raise UnknownFlow(name)
        if flow["type"] != "ordinary":
            raise FlowError(
                f"flow {name} is a real-time flow: it runs all the time; `deployd flow run` "
                'is for ordinary (scheduled) flows (type = "ordinary")'
            )
        if name in self.tasks:
            raise FlowError(
                f"flow {name} has a run going (run {self.run_ids.get(name)}); wait for it to "
                f"finish (`deployd flow runs {name}`), then run it again"
            )
        run_id = self.begin(name, "manual")
        return {"flow": name, "run": run_id, "status": "running"}

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        return asyncio.get_running_loop().create_task(coro, name=name)

    def _spec(self, name: str) -> dict[str, Any]:
        flow = self.fs.flow(name)
        fv = self.fs.flow_version(name, flow["active_version"]) if flow else None
        return dict(fv["spec"]) if fv else {}

    async def _run(self, name: str, run_id: int) -> None:
        try:
            await self._execute(name, run_id)
        except asyncio.CancelledError:
            self._finish(name, run_id, "failed", 0, [INTERRUPTED], INTERRUPTED)
            raise
        except Exception as exc:  # a bug must not leave the run `running` until a restart
            log.exception("run %d of %s failed", run_id, name)
            self._finish(name, run_id, "failed", 0, [str(exc)], str(exc))
        finally:
            self.tasks.pop(name, None)
            self.current.pop(name, None)
            self.run_ids.pop(name, None)
            if name in self.waiting and not self.stopping:
                self.waiting.discard(name)
                try:
                    self.begin(name, "queued")
                except FlowError as exc:  # the flow went meanwhile
                    log.warning("flow %s: the queued run did not start: %s", name, exc)

    async def _execute(self, name: str, run_id: int) -> None:
        flow = self.fs.flow(name)
        fv = self.fs.flow_version(name, flow["active_version"]) if flow else None
        if fv is None:
            self._finish(name, run_id, "failed", 0, ["the flow has no version"], "no version")
            return
        spec = fv["spec"]
        started = time.monotonic()
        timeout = float(spec.get("run_timeout") or 3600.0)
        hold = frozen(self.config, name)  # a freeze holds new versions back from runs too
        steps, attention, problems = await self.resolve(fv["steps"], hold)
        with self.store.tx():
            self.rs.set_run_steps(run_id, _versions(steps))
            if flow is not None and attention != flow["needs_attention"]:
                self.fs.set_flow(name, needs_attention=attention)
        if problems:
            reason = "no version can run: " + "; ".join(problems)
            self._finish(name, run_id, "failed", 0, problems, reason)
            return
        actions = [s.id for s in steps if s.kind == "action"]
        handled_before = self.rs.processed(name, actions)
        letters_before = self.rs.last_letter_id()
        try:
            runnable = self.drafts.runnable(name, fv["version"], [s.model_dump() for s in steps])
            run = await self.runtime.warm_up(runnable, self.config.daemon.warmup_timeout)
        except FlowError as exc:
            detail = [str(exc)]
            if isinstance(exc, StepFailed) and exc.log_tail:
                detail.append(exc.log_tail[-2000:])
            self._finish(name, run_id, "failed", 0, detail, f"the steps did not start: {exc}")
            return
        self.current[name] = run
        outcome = RunOutcome()
        try:
            remaining = max(0.001, timeout - (time.monotonic() - started))
            try:
                data = await asyncio.wait_for(run.trigger_hook("startup"), remaining)
            except TimeoutError:
                outcome = RunOutcome(("startup() did not return within run_timeout",), True)
            else:
                remaining = max(0.001, timeout - (time.monotonic() - started))
                outcome = await self.runtime.run_once(run, remaining)
                if not outcome.timed_out:
                    await run.trigger_hook("shutdown", data)
        finally:
            with contextlib.suppress(Exception):
                await asyncio.shield(run.stop())
        handled = self.rs.processed(name, actions) - handled_before
        errors = [f"step {steps[0].id}: {e.splitlines()[0]}" for e in outcome.errors if e]
        letters, count = self.rs.letters_since(name, letters_before, MAX_ERRORS)
        status = "timed_out" if outcome.timed_out else "succeeded"
        if outcome.timed_out:
            errors.insert(
                0,
                f"timed out after {timeout:g}s (run_timeout); {outcome.lettered} unfinished "
                "message(s) kept as dead letters",
            )
        for letter in letters:
            errors.append(f"step {letter['step']}: {str(letter['error']).splitlines()[0][:500]}")
        if count > len(letters):
            errors.append(f"… and {count - len(letters)} more (see `deployd flow errors {name}`)")
        if errors and not outcome.timed_out:
            status = "failed"
        self._finish(name, run_id, status, handled, errors, errors[0] if errors else None)

    def _finish(
        self,
        name: str,
        run_id: int,
        status: str,
        handled: int,
        errors: list[str],
        reason: str | None,
    ) -> None:
        with self.store.tx():
            self.rs.finish_run(run_id, status, handled, errors, reason)
            self.rs.prune(name, KEEP_RUNS)
            if status != "succeeded":  # the run is the record; the event log gets the trouble
                self.store.event(
                    f"run.{status}",
                    f"run {run_id} of {name} {status}: {reason}",
                    flow=name,
                    detail={"run": run_id, "handled": handled, "errors": len(errors)},
                )
        level = logging.DEBUG if status == "succeeded" else logging.WARNING
        log.log(level, "flow %s: run %d %s (%d handled): %s", name, run_id, status, handled, reason)

    # -- resolving versions ----------------------------------------------------------------

    async def resolve(
        self, stored: list[dict[str, Any]], hold: Hold | None = None
    ) -> tuple[list[Step], str | None, list[str]]:
        """Every unpinned step on its component's newest registered version that validates
        against the flow; (steps, needs-attention reason or None, problems that stop the run).
        `hold`: the freeze the flow is in — only versions registered before it began count
        (a freeze holds back what would be an automatic publish on a real-time flow).
        """
        steps = [Step.model_validate(s) for s in stored]
        attention: list[str] = []
        for comp in dict.fromkeys(s.component for s in steps if not s.pinned):
            ids = {s.id for s in steps if s.component == comp and not s.pinned}
            rows = [r for r in self.store.versions(comp) if r["artifact_dir"]]
            candidates = [r["version"] for r in rows if _before(r, hold)]
            if hold is not None and len(candidates) < len(rows):
                held = [r["version"] for r in rows if not _before(r, hold)]
                log.info(
                    "%s: %s v%s not used by runs (registered during the freeze)",
                    hold.text(),
                    comp,
                    ", v".join(str(v) for v in held),
                )
                if not candidates:
                    return (
                        steps,
                        None,
                        [
                            f"{hold.text()}: no version of {comp} was registered before it "
                            "began, and runs take none registered during it"
                        ],
                    )
            first_problems: list[str] | None = None
            pick = None
            for version in candidates:
                trial = self.drafts.with_version([s.model_dump() for s in steps], comp, version)
                problems = [p for p in await self.validate(trial, steps) if _about(p, ids)]
                if not problems:
                    pick = version
                    break
                if first_problems is None:
                    first_problems = problems
            if pick is None:
                if not candidates:
                    return steps, None, [f"component {comp!r} has no version yet (push it)"]
                return (
                    steps,
                    None,
                    (first_problems or [])
                    + [f"no registered version of {comp} validates against the flow"],
                )
            if pick != candidates[0]:
                attention.append("; ".join(first_problems or []) + f" (runs use {comp} v{pick})")
            steps = self.drafts.with_version([s.model_dump() for s in steps], comp, pick)
        problems = await self.validate(steps, steps)  # pinned steps, and the whole once more
        return steps, ("; ".join(attention) or None), problems


def _before(row: Row, hold: Hold | None) -> bool:
    """Whether version `row` was registered before `hold` began (always, without a hold)."""
    if hold is None or hold.since is None:
        return True
    return datetime.fromisoformat(str(row["built_at"])) < hold.since


def _about(problem: str, step_ids: set[str]) -> bool:
    return any(problem.startswith(f"step {sid}: ") for sid in step_ids)


def _versions(steps: list[Step]) -> list[dict[str, Any]]:
    return [{"id": s.id, "component": s.component, "version": s.version} for s in steps]


def run_json(row: Row) -> dict[str, Any]:
    """One run as `flow runs --json` shows it."""
    out = {k: row[k] for k in ("id", "flow", "status", "cause", "started_at", "finished_at")}
    out["flow_version"] = row["flow_version"]
    out["steps"] = row["steps"] if isinstance(row["steps"], list) else json.loads(row["steps"])
    out["handled"] = row["handled"]
    out["errors"] = row["errors"] if isinstance(row["errors"], list) else json.loads(row["errors"])
    out["reason"] = row["reason"]
    return out
