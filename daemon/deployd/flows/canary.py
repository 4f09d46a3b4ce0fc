"""Canary publishes (issue 16, section 3): what is tried on a share of the messages first, and
how it is judged.

A flow file's `[canary]` table makes a publish that changes only action steps a canary: the
new version of each changed step handles `share` of that step's messages beside the old
version (the runtime splits them by count, `Runtime.canary`), until `duration` has passed
and the new version handled `min_messages`; then it is **promoted** (the switch completes) if
its error rate is at most `max_error_rate` and not above the old version's rate over the same
time by more than `max_error_rate`, else **rolled back**. Error rate: errors ÷ messages of
the changed steps together, an error being a message that became a dead letter (it raised in
`process()`, or failed its mapping into the step).

Any other publish switches at once as before, and says why it was no canary: a changed
trigger (one trigger runs at a time), steps added, removed or reordered, changed flow
variables or runtime (every step sees them), nothing running yet, no action changed.

This module is pure: `plan` and `verdict` decide, `Canary` is the publisher's record of one
in progress; the publish state machine drives them (`publish.py`).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from fractions import Fraction
from typing import Any

from ..config import format_duration
from ..runtime.base import CanaryRun, FlowRun
from ..types import CanaryCount, CanaryTally
from .model import Step

# How a canary ended (`Canary.record`'s "ended"): judged at its end, by crash loops of the new
# version, by a person, by a later publish, by `flow stop`, by a daemon stop.
JUDGED, CRASHED, MANUAL, SUPERSEDED, STOPPED, INTERRUPTED = (
    "judged",
    "crash-looped",
    "by hand",
    "superseded",
    "flow stopped",
    "interrupted",
)
# Endings after which the component versions a failed automatic canary brought in are
# quarantined for the flow (issue 16, section 4): it was found wanting, not merely cut short.
QUARANTINING = (JUDGED, CRASHED, MANUAL)


@dataclass(frozen=True)
class Settings:
    """A flow version's [canary] table (the flow file's keys, durations in seconds)."""

    share: float
    duration: float
    min_messages: int
    max_error_rate: float

    @classmethod
    def of(cls, spec: dict[str, Any]) -> Settings | None:
        """The [canary] of a stored flow spec (None: the flow has none)."""
        table = spec.get("canary")
        if not isinstance(table, dict):
            return None
        return cls(
            float(table["share"]),
            float(table["duration"]),
            int(table["min_messages"]),
            float(table["max_error_rate"]),
        )

    def as_json(self) -> dict[str, Any]:
        return {
            "share": self.share,
            "duration": self.duration,
            "min_messages": self.min_messages,
            "max_error_rate": self.max_error_rate,
        }

    def text(self) -> str:
        return (
            f"{_percent(self.share)} of the messages for {format_duration(self.duration)}"
            f" (at least {self.min_messages} message(s), max error rate"
            f" {_percent(self.max_error_rate)})"
        )


@dataclass(frozen=True)
class Plan:
    """A publish that runs as a canary: its settings and the action steps it changes."""

    settings: Settings
    steps: tuple[str, ...]

    def as_json(self) -> dict[str, Any]:
        return {**self.settings.as_json(), "steps": list(self.steps)}

    def text(self) -> str:
        return f"canary: {', '.join(self.steps)} on {self.settings.text()}"


_NOT_COMPARED = {"pinned"}  # how a step's version was chosen does not change what runs


def _same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two stored steps run the same (read through `Step`, so a step stored before a
    key existed compares equal to one with that key's default)."""
    return Step.model_validate(a).model_dump(exclude=_NOT_COMPARED) == Step.model_validate(
        b
    ).model_dump(exclude=_NOT_COMPARED)


def plan(
    spec: dict[str, Any],
    old_spec: dict[str, Any] | None,
    old_steps: list[dict[str, Any]] | None,
    steps: list[dict[str, Any]],
) -> tuple[Plan | None, str]:
    """Whether publishing `spec`/`steps` over the running `old_spec`/`old_steps` is a canary:
    (its plan, "") or (None, why it switches at once; "" when the flow has no [canary])."""
    settings = Settings.of(spec)
    if settings is None:
        return None, ""
    if old_spec is None or old_steps is None:
        return None, "nothing runs yet to compare it with"
    if [s["id"] for s in old_steps] != [s["id"] for s in steps]:
        return None, "steps were added, removed or reordered"
    if not _same(old_steps[0], steps[0]):
        return None, f"the trigger {steps[0]['id']} changed (one trigger runs at a time)"
    for key, what in (("variables", "flow variables"), ("runtime", "the runtime")):
        if (old_spec.get(key) or None) != (spec.get(key) or None):
            return None, f"{what} changed (every step sees them)"
    changed = tuple(
        new["id"] for old, new in zip(old_steps[1:], steps[1:], strict=True) if not _same(old, new)
    )
    if not changed:
        return None, "no action step changed"
    return Plan(settings, changed), ""


def _exact(value: float) -> Fraction:
    """A setting as the decimal it was written as (0.01 is one in a hundred exactly)."""
    return Fraction(repr(float(value)))


def verdict(settings: Settings, tally: CanaryTally) -> tuple[bool, str]:
    """(promote?, why) for a canary whose time is up: the new version's error rate at most
    `max_error_rate`, and not above the old version's over the same time by more than it.
    (As the issue words the rule, the second bound follows from the first, a rate being at
    least 0; it is checked all the same, so the code reads as the rule.)"""
    limit = _exact(settings.max_error_rate)
    new = Fraction(tally.new.errors, tally.new.messages or 1)
    old = Fraction(tally.old.errors, tally.old.messages or 1)
    rates = f"new {_rate(tally.new)}, old {_rate(tally.old)}"
    bound = f"max_error_rate {_percent(settings.max_error_rate)}"
    if new > limit:
        return False, f"error rate {_rate(tally.new)} is above {bound} ({rates})"
    if new > old + limit:
        return (
            False,
            f"error rate {_rate(tally.new)} is above the old version's by more than {bound}",
        )
    return True, f"error rate {_rate(tally.new)} within {bound} ({rates})"


def _percent(value: float) -> str:
    return f"{value * 100:.4g}%"


def _rate(count: CanaryCount) -> str:
    return f"{count.errors}/{count.messages} ({_percent(count.rate)})"


def tally_json(tally: CanaryTally) -> dict[str, Any]:
    return {
        "new": tally.new.as_json(),
        "old": tally.old.as_json(),
        "queued": tally.queued,
        "by_step": {
            step: {"new": new.as_json(), "old": old.as_json()}
            for step, (new, old) in tally.steps.items()
        },
    }


@dataclass
class Canary:
    """A canary in progress, as the publisher keeps it (one per flow at most)."""

    name: str
    deployment: int
    version: int
    from_version: int
    spec: dict[str, Any]  # the new version's flow spec
    plan: Plan
    old: FlowRun
    new: FlowRun
    run: CanaryRun
    cause: Any  # publish.Cause (who asked for the publish)
    started: float = field(default_factory=time.monotonic)
    started_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat())
    task: asyncio.Task[Any] | None = None

    @property
    def settings(self) -> Settings:
        return self.plan.settings

    @property
    def deadline(self) -> float:
        return self.started + self.settings.duration

    def time_left(self) -> float:
        return max(0.0, self.deadline - time.monotonic())

    def as_json(self) -> dict[str, Any]:
        """The `canary` object of a flow in `status --json` while it runs."""
        tally = self.run.tally()
        steps = {s.id: s for s in self.new.status()}
        return {
            "deployment": self.deployment,
            "version": self.version,
            "from_version": self.from_version,
            **self.plan.as_json(),
            "running": True,
            "started_at": self.started_at,
            "time_left": round(self.time_left(), 3),
            "messages_left": max(0, self.settings.min_messages - tally.new.messages),
            **tally_json(tally),
            "new_steps": [
                {
                    "id": sid,
                    "version": steps[sid].version,
                    "state": str(steps[sid].state),
                    "pid": steps[sid].pid,
                }
                for sid in self.plan.steps
                if sid in steps
            ],
        }

    def record(self, ended: str, promoted: bool, reason: str) -> dict[str, Any]:
        """What the deployment row keeps of it once it ended (`deployments.canary`)."""
        tally = self.run.tally()
        return {
            **self.plan.as_json(),
            "started_at": self.started_at,
            "seconds": round(time.monotonic() - self.started, 3),
            "ended": ended,
            "outcome": "promoted" if promoted else "rolled_back",
            "reason": reason,
            **tally_json(tally),
        }


def describe(data: dict[str, Any]) -> str:
    """One line about a canary in progress (`status`, `flow show`)."""
    new, old = data.get("new") or {}, data.get("old") or {}
    line = (
        f"canary v{data['version']} (from v{data['from_version']}): "
        f"{_percent(float(data['share']))} of {', '.join(data['steps'])}"
    )
    if not data.get("running"):
        return line + " — the daemon is not running (it is rolled back at the next start)"
    line += (
        f"; new {new.get('messages', 0)} message(s), {new.get('errors', 0)} error(s)"
        f" ({_percent(new.get('error_rate', 0.0))}); old {old.get('messages', 0)} message(s),"
        f" {old.get('errors', 0)} error(s) ({_percent(old.get('error_rate', 0.0))}); "
    )
    left = float(data.get("time_left") or 0.0)
    more = int(data.get("messages_left") or 0)
    if left > 0:
        line += f"{_seconds(left)} left"
        if more:
            line += f", then {more} more message(s)"
    elif more:
        line += f"waiting for {more} more message(s)"
    else:
        line += "being judged"
    return line


def _seconds(value: float) -> str:
    if value >= 120:
        return f"{value / 60:.0f}m"
    return f"{value:.1f}s"
