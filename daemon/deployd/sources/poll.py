"""Polling, the safety net under webhooks: `git ls-remote` every `poll_interval` per component.

One APScheduler (3.x, `AsyncIOScheduler` on the daemon's loop) date job per polled
component, rescheduled after each run: the interval ±10 % jitter, so many components do not
poll in lockstep, times 2, 4, 8… (at most 10) after consecutive failures. A poll only asks
for the branch head (cheap); when it names a commit without a build, a notice goes to the
pipeline, whose resolver fetches the mirror — so fetches happen only when the head changed.
The outcome of every poll is recorded for `status` (`"poll": {"last_ok", "last_error",
"next_at", …}`). The first poll runs at start: it reconciles remote components.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from apscheduler.schedulers.asyncio import AsyncIOScheduler

from ..config import ComponentConfig, Config
from ..errors import GitError
from ..metrics import Metrics
from ..store import Store
from ..toolchains import git as gitops
from ..types import BuildState, PushNotice

log = logging.getLogger("deployd.poll")

JITTER = 0.10
MAX_BACKOFF = 10.0


def next_delay(interval: float, failures: int, rng: Callable[[float, float], float]) -> float:
    """Seconds until the next poll: ±10 % jitter, doubled per consecutive failure, at most 10x."""
    factor = min(2.0**failures, MAX_BACKOFF) if failures else 1.0
    return interval * factor * rng(1 - JITTER, 1 + JITTER)


def _iso(ts: datetime | None) -> str | None:
    return ts.isoformat(timespec="milliseconds") if ts else None


@dataclass
class PollState:
    interval: float
    last_ok: datetime | None = None
    last_error: str | None = None
    last_error_at: datetime | None = None
    failures: int = 0
    head: str | None = None
    next_at: datetime | None = None


class Poller:
    """Polls every component whose url is not otherwise watched; a service of the daemon."""

    def __init__(
        self,
        config: Config,
        store: Store,
        pending: Callable[[str], PushNotice | None],
        notify: Callable[[PushNotice], bool],
        metrics: Metrics,
        *,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
        rng: Callable[[float, float], float] = random.uniform,
    ) -> None:
        self.config = config
        self.store = store
        self.pending = pending  # the pipeline's waiting notice for a component, if any
        self.notify = notify
        self.metrics = metrics
        self.now = now
        self.rng = rng
        self.targets: dict[str, ComponentConfig] = {}
        self.state: dict[str, PollState] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self.scheduler: AsyncIOScheduler | None = None
        self._set_targets(config)

    def _set_targets(self, config: Config) -> list[str]:
        """Poll what `config` says; returns the components whose polling is new or changed."""
        self.config = config
        default = config.daemon.poll_interval
        targets: dict[str, ComponentConfig] = {}
        for comp in config.components:
            # Remote components are checked once at start even with polling off (reconcile).
            if comp.poll_every(default) > 0 or comp.mirrored:
                targets[comp.name] = comp
        changed = []
        for name, comp in targets.items():
            interval = comp.poll_every(default)
            old = self.targets.get(name)
            state = self.state.get(name)
            if old is None or old.url != comp.url or old.branch != comp.branch or state is None:
                self.state[name] = PollState(interval)
                changed.append(name)
            elif state.interval != interval:
                state.interval = interval
                changed.append(name)
            self._locks.setdefault(name, asyncio.Lock())
        for name in set(self.targets) - set(targets):
            self.state.pop(name, None)
            if self.scheduler is not None and self.scheduler.get_job(f"poll:{name}"):
                self.scheduler.remove_job(f"poll:{name}")
        self.targets = targets
        return changed

    def __repr__(self) -> str:
        return f"Poller({len(self.targets)} component(s))"

    # -- service ---------------------------------------------------------------------------

    async def start(self) -> None:
        if not self.targets:
            return
        self.scheduler = AsyncIOScheduler(event_loop=asyncio.get_running_loop(), timezone=UTC)
        self.scheduler.start()
        for name in self.targets:
            self._schedule(name, 0.0)

    async def reload(self, config: Config) -> None:
        """Apply a reloaded config: new, moved or re-timed components are polled at once."""
        for name in self._set_targets(config):
            if self.scheduler is None and self.targets:
                await self.start()
                return
            self._schedule(name, 0.0)

    async def stop(self) -> None:
        if self.scheduler is not None and self.scheduler.running:
            self.scheduler.shutdown(wait=False)
        self.scheduler = None

    def _schedule(self, name: str, delay: float) -> None:
        state = self.state[name]
        state.next_at = self.now() + timedelta(seconds=delay)
        if self.scheduler is None:
            return
        self.scheduler.add_job(
            self.check,
            "date",
            run_date=state.next_at,
            args=[name],
            id=f"poll:{name}",
            replace_existing=True,
            misfire_grace_time=None,
            coalesce=True,
            max_instances=3,  # a late run waits on the lock instead of being dropped
        )

    # -- one poll --------------------------------------------------------------------------

    async def check(self, name: str) -> dict[str, Any]:
        """Poll one component now; reschedule it; return what happened."""
        comp = self.targets[name]
        state = self.state[name]
        result: dict[str, Any] = {"component": name, "ok": False, "head": None, "queued": False}
        async with self._locks[name]:
            assert comp.url is not None
            try:
                head = await gitops.ls_remote(comp.url, comp.branch)
            except GitError as exc:
                self.metrics.poll_error(name)
                state.failures += 1
                state.last_error = str(exc)
                state.last_error_at = self.now()
                result["error"] = state.last_error
                log.warning("poll of %s failed (%d in a row): %s", name, state.failures, exc)
            else:
                state.failures = 0
                state.last_ok = self.now()
                state.last_error = state.last_error_at = None
                state.head = head
                result.update(ok=True, head=head, queued=self._offer(comp, head))
                if head is None:
                    result["note"] = f"branch {comp.branch!r} does not exist at the url"
            if self.state.get(name) is not state:
                return result  # a reload removed or replaced the component during ls-remote
            if state.interval > 0:
                self._schedule(name, next_delay(state.interval, state.failures, self.rng))
            else:
                state.next_at = None
            self._persist(name)
        result["next_at"] = _iso(state.next_at)
        return result

    def _offer(self, comp: ComponentConfig, head: str | None) -> bool:
        """Queue `head` unless it is built, or already pending or building."""
        if head is None or self.store.has_final_build(comp.name, head):
            return False
        pending = self.pending(comp.name)
        if pending is not None and pending.sha == head:
            return False
        last = self.store.last_build(comp.name)
        if last and last["status"] == BuildState.BUILDING and last["sha"] == head:
            return False
        return self.notify(PushNotice(comp.name, f"refs/heads/{comp.branch}", head, "poll"))

    def _persist(self, name: str) -> None:
        s = self.state[name]
        try:
            self.store.set_poll_state(
                name,
                interval=s.interval,
                last_ok=_iso(s.last_ok),
                last_error=s.last_error,
                last_error_at=_iso(s.last_error_at),
                failures=s.failures,
                head=s.head,
                next_at=_iso(s.next_at),
            )
        except Exception:
            log.exception("cannot record the poll state of %s", name)

    async def poll_now(self, name: str | None = None) -> list[dict[str, Any]]:
        """`deployd poll [COMPONENT]`: check now (all polled components, or one)."""
        names = [name] if name else list(self.targets)
        return list(await asyncio.gather(*(self.check(n) for n in names)))
