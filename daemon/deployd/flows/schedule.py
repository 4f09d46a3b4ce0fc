"""When ordinary (scheduled) flows are due: one APScheduler job per flow.

APScheduler 3 (`AsyncIOScheduler` on the daemon's loop) holds a cron trigger (`schedule`, in
`daemon.timezone`) or an interval trigger (`every`) per enabled ordinary flow; each firing
calls `due(flow, cause)`, which decides what happens (run, skip, queue: `runs.py`). The next
due time of every flow is kept in the state database (`flow_schedules`), so a due time that
passed while deployd was stopped is known at the next start: with `catch_up = "one"` the job
is added with that past time as its next run, and APScheduler's misfire handling (no grace
limit, coalesced) makes it one run at once, then the schedule goes on; with `"none"` the
schedule goes on from now.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.triggers.base import BaseTrigger
from apscheduler.triggers.interval import IntervalTrigger

from ..store import Store
from ..store.runs import RunStore
from .model import cron_trigger

log = logging.getLogger("deployd.schedule")


def make_trigger(spec: dict[str, Any], timezone: str) -> BaseTrigger:
    """The APScheduler trigger of an ordinary flow's spec (`schedule` or `every`)."""
    if spec.get("schedule"):
        return cron_trigger(str(spec["schedule"]), timezone)
    return IntervalTrigger(seconds=float(spec["every"]), timezone=timezone)


def _iso(ts: datetime | None) -> str | None:
    return ts.astimezone(UTC).isoformat(timespec="milliseconds") if ts else None


class Schedule:
    """The jobs of every scheduled flow; `due(flow, cause)` is called when one is due."""

    def __init__(
        self,
        store: Store,
        timezone: str,
        due: Callable[[str, str], None],
        *,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.store = store
        self.runs = RunStore(store)
        self.timezone = timezone
        self.due = due
        self.now = now
        self.scheduler = AsyncIOScheduler(timezone=timezone)
        self._catching_up: set[str] = set()

    def start(self) -> None:
        self.scheduler.start()

    def stop(self) -> None:
        if self.scheduler.running:
            self.scheduler.shutdown(wait=False)

    def add(self, flow: str, spec: dict[str, Any], at_start: bool = False) -> str | None:
        """Schedule `flow` (again: a new spec replaces the old job); at daemon start, a due
        time missed while it was stopped is caught up per `catch_up`. The next due time."""
        trigger = make_trigger(spec, self.timezone)
        now = self.now()
        first = trigger.get_next_fire_time(None, now)
        if at_start:
            missed = self.runs.next_run_at(flow)
            if missed is not None and datetime.fromisoformat(missed) <= now:
                if (spec.get("catch_up") or "one") == "one":
                    first = datetime.fromisoformat(missed)  # a misfire: run once, at once
                    self._catching_up.add(flow)
                else:
                    with self.store.tx():
                        self.store.event(
                            "run.missed",
                            f"flow {flow}: the run due at {missed} was missed while deployd "
                            'was stopped; not caught up (catch_up = "none")',
                            flow=flow,
                        )
        self.scheduler.add_job(
            self._fire,
            trigger,
            args=[flow],
            id=flow,
            name=f"run:{flow}",
            replace_existing=True,
            misfire_grace_time=None,  # a late run still runs (catch-up, a busy loop)
            coalesce=True,  # many missed due times are one run
            max_instances=1,
            next_run_time=first,
        )
        return self._record(flow)

    def remove(self, flow: str) -> None:
        """No more runs of `flow` on its schedule (stopped, or deleted)."""
        if self.scheduler.get_job(flow) is not None:
            self.scheduler.remove_job(flow)
        self._catching_up.discard(flow)
        with self.store.tx():
            self.runs.set_next_run(flow, None)

    def next_run_at(self, flow: str) -> str | None:
        job = self.scheduler.get_job(flow)
        return _iso(job.next_run_time) if job is not None else None

    def _record(self, flow: str) -> str | None:
        at = self.next_run_at(flow)
        with self.store.tx():
            self.runs.set_next_run(flow, at)
        return at

    async def _fire(self, flow: str) -> None:
        # APScheduler has moved the job's next run time on before this coroutine starts.
        self._record(flow)
        cause = "catch_up" if flow in self._catching_up else "schedule"
        self._catching_up.discard(flow)
        self.due(flow, cause)
