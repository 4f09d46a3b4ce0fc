"""Health: is the event loop turning, can the database be written, is there disk left?

`GET /healthz` runs `check()`; each probe is a few syscalls, so the route stays fast. The
event-loop lag comes from `LagMonitor`, a task on the loop that measures how late its own
wake-ups are (the same loop that serves HTTP, runs the pipeline and pings the watchdog).
"""

from __future__ import annotations

import asyncio
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .store import Store


class LagMonitor:
    """Measures how late the event loop runs a timer set `interval` seconds ahead."""

    def __init__(self, interval: float = 0.25) -> None:
        self.interval = interval
        self.lag = 0.0
        self._expected = time.monotonic() + interval

    async def run(self) -> None:
        while True:
            self._expected = time.monotonic() + self.interval
            await asyncio.sleep(self.interval)
            self.lag = max(0.0, time.monotonic() - self._expected)

    def current(self) -> float:
        """The last measured lag, or how overdue the next wake-up already is (if more)."""
        return max(self.lag, time.monotonic() - self._expected)


@dataclass(frozen=True)
class Limits:
    max_loop_lag: float = 2.0
    min_free_bytes: int = 100 * 1024 * 1024
    min_free_ratio: float = 0.01


def check_db(store: Store) -> str | None:
    """None when the state database takes a write lock now; else why not."""
    return store.check_writable()


def check_disk(path: Path, limits: Limits) -> tuple[str | None, dict[str, Any]]:
    """(problem or None, figures) for the file system holding `path`."""
    try:
        usage = shutil.disk_usage(path)
    except OSError as exc:
        return f"cannot read disk usage of {path}: {exc.strerror}", {}
    figures = {"free_bytes": usage.free, "total_bytes": usage.total}
    ratio = usage.free / usage.total if usage.total else 0.0
    if usage.free < limits.min_free_bytes or ratio < limits.min_free_ratio:
        return (
            f"disk under {path} is nearly full: {usage.free // (1024 * 1024)} MB free "
            f"({ratio:.1%}); free some space or raise the disk",
            figures,
        )
    return None, figures


def check(
    store: Store | None, state_dir: Path, lag: LagMonitor | None, limits: Limits
) -> dict[str, Any]:
    """The /healthz body: ``{"ok": bool, "reasons": [...], "loop_lag_s": …, "disk": {…}}``."""
    reasons: list[str] = []
    out: dict[str, Any] = {}
    if lag is not None:
        current = lag.current()
        out["loop_lag_s"] = round(current, 4)
        if current > limits.max_loop_lag:
            reasons.append(
                f"event loop lags {current:.2f}s (limit {limits.max_loop_lag:g}s): something "
                "blocks it"
            )
    if store is not None:
        problem = check_db(store)
        if problem:
            reasons.append(problem)
    problem, out["disk"] = check_disk(state_dir, limits)
    if problem:
        reasons.append(problem)
    return {"ok": not reasons, "reasons": reasons, **out}
