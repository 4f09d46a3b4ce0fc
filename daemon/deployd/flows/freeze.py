"""Freeze windows (issue 16): when automatic publishes of a flow wait, and the timers that
publish the held drafts when a window ends.

`frozen(config, flow, now)` answers "is this flow frozen at `now`, until when, and why" from
the config alone (`[[freeze]]`, `daemon.timezone`): `deployd plan`, the status object and the
deployer all ask it. `FreezeTimers` holds one timer per held flow; the clock and the sleep
are passed in, so tests drive time instead of waiting for Friday (huey's `now=` habit).

Windows that overlap or touch are one hold: the flow is held until the last of them ends.
Recurring windows start at each fire time of their cron `schedule` (APScheduler's
`CronTrigger`, in `daemon.timezone`, so "17:00 on Fridays" follows daylight saving time) and
last `duration`; one-off windows are `[from, to)`.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from ..config import Config, FreezeConfig, check_timezone

log = logging.getLogger("deployd.freeze")

Clock = Callable[[], datetime]
Sleep = Callable[[float], Awaitable[None]]
# A recurring window's fire times are walked from `now - duration`; a schedule that fires
# more often than this within one duration counts as frozen throughout.
_MAX_FIRES = 5000
# Chained windows (one starting before the other ends) are followed this many steps.
_MAX_CHAIN = 100
# A timer re-checks at least this often, so a wall-clock step (NTP, a suspended VM) delays
# the publish by at most this much; it is still one timer per held flow, not a poll loop.
MAX_TIMER_SLEEP = 3600.0


def utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class Hold:
    """A flow is frozen until `until` (UTC) because of `reason`."""

    until: datetime
    reason: str
    # When the window holding the flow now began (the earliest of those covering now): what
    # was registered after it is held back (scheduled runs). Not part of a Hold's identity.
    since: datetime | None = field(default=None, compare=False)

    def text(self) -> str:
        """What the flow shows: `held by freeze until 2026-12-07T09:00:00Z (weekend freeze)`."""
        return f"held by freeze until {iso(self.until)} ({self.reason})"

    def as_json(self) -> dict[str, Any]:
        return {"until": iso(self.until), "reason": self.reason}


def iso(when: datetime) -> str:
    """`when` in UTC as RFC 3339 with a Z, to the second."""
    return when.astimezone(UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def matches(window: FreezeConfig, flow: str) -> bool:
    """Whether `window` covers flow `flow` (its `flows` globs, case-sensitive)."""
    return any(fnmatch.fnmatchcase(flow, pattern) for pattern in window.flows)


def _span(window: FreezeConfig, at: datetime, tz: Any) -> tuple[datetime, datetime] | None:
    """The occurrence of `window` that covers `at` (start, end), the one ending last; None."""
    if window.from_ is not None and window.to is not None:
        start, end = window.from_, window.to
        return (start, end) if start <= at < end else None
    assert window.schedule is not None and window.duration is not None
    from apscheduler.triggers.cron import CronTrigger

    trigger = CronTrigger.from_crontab(window.schedule, timezone=tz)
    length = timedelta(seconds=window.duration)
    # Occurrences covering `at` started in (at - length, at]; the last such one ends last.
    fire = trigger.get_next_fire_time(None, at - length + timedelta(microseconds=1))
    best: datetime | None = None
    for _ in range(_MAX_FIRES):
        if fire is None or fire > at:
            break
        best = fire
        fire = trigger.get_next_fire_time(fire, fire + timedelta(seconds=1))
    else:
        best = at  # fires more often than _MAX_FIRES per duration: frozen from now on
    return (best, best + length) if best is not None else None


def frozen(config: Config, flow: str, now: datetime | None = None) -> Hold | None:
    """Whether automatic publishes of `flow` wait at `now` (default: the current time): a
    `Hold` with the time the freeze ends (following windows that overlap or touch) and the
    reasons of the windows that make it; None when `flow` is not frozen."""
    now = (now or utc_now()).astimezone(UTC)
    windows = [w for w in config.freeze if matches(w, flow)]
    if not windows:
        return None
    tz = check_timezone(config.daemon.timezone)
    until: datetime | None = None
    since: datetime | None = None
    reasons: list[str] = []
    at = now
    for _ in range(_MAX_CHAIN):
        extended = False
        for window in windows:
            span = _span(window, at, tz)
            if span is None:
                continue
            if at == now:
                start = span[0].astimezone(UTC)
                since = start if since is None else min(since, start)
            end = span[1].astimezone(UTC)
            if until is None or end > until:
                until, extended = end, True
            if window.reason not in reasons:
                reasons.append(window.reason)
        if not extended or until is None:
            break
        at = until  # does another window cover the moment this one ends?
    if until is None:
        return None
    return Hold(until, "; ".join(reasons), since)


class FreezeTimers:
    """One timer per held flow: at the end of its hold, `on_end(flow)` runs (it checks again
    and publishes, or re-arms when another window began meanwhile)."""

    def __init__(
        self,
        config: Config,
        on_end: Callable[[str], Awaitable[None]],
        clock: Clock = utc_now,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        self.config = config
        self.on_end = on_end
        self.clock = clock
        self.sleep = sleep
        self._timers: dict[str, asyncio.Task[None]] = {}

    def hold(self, flow: str) -> Hold | None:
        """`frozen(flow)` now, by this object's clock."""
        return frozen(self.config, flow, self.clock())

    def arm(self, flow: str, hold: Hold) -> None:
        """(Re)arm `flow`'s timer for the end of `hold`."""
        self.cancel(flow)
        self._timers[flow] = asyncio.get_running_loop().create_task(
            self._wait(flow, hold.until), name=f"freeze:{flow}"
        )

    def armed(self) -> dict[str, bool]:
        return {flow: not task.done() for flow, task in self._timers.items()}

    async def _wait(self, flow: str, until: datetime) -> None:
        while True:
            left = (until - self.clock()).total_seconds()
            if left <= 0:
                break
            await self.sleep(min(left, MAX_TIMER_SLEEP))
        if self._timers.get(flow) is asyncio.current_task():
            del self._timers[flow]
        try:
            await self.on_end(flow)
        except Exception:
            log.exception("flow %s: publishing at the end of its freeze failed", flow)

    def cancel(self, flow: str) -> None:
        task = self._timers.pop(flow, None)
        if task is not None and task is not asyncio.current_task():
            task.cancel()

    async def close(self) -> None:
        tasks = list(self._timers.values())
        self._timers.clear()
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
