"""Freeze windows (issue 16, section 5).

The window logic and its timers take the clock and the sleep as arguments, so the first tests
drive time (a recurring weekend window in Europe/Berlin, across daylight saving time; one-off
windows that overlap; a timer that fires exactly at the end) without waiting for Friday. The
last one runs a real daemon through real one-off windows a few seconds long: an automatic
publish held (the draft made and shown), kept across a restart, published by itself when the
window ends, and `flow publish --force` inside a window, recorded as forced.
"""

from __future__ import annotations

import asyncio
import json
import signal
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from deployd.config import Config, parse
from deployd.flows.freeze import MAX_TIMER_SLEEP, FreezeTimers, Hold, frozen, iso
from tests.conftest import db_rows, wait_until
from tests.flows.conftest import FlowEnv, counter_files, read_out


def config(tmp_path: Path, *windows: dict[str, Any], tz: str = "UTC") -> Config:
    return parse(
        {"daemon": {"state_dir": str(tmp_path / "var"), "timezone": tz}, "freeze": list(windows)},
        base=tmp_path,
    )


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


WEEKEND = {
    "flows": ["billing-*"],
    "schedule": "0 17 * * FRI",
    "duration": "64h",
    "reason": "weekend freeze",
}


def test_a_recurring_window_follows_the_time_zone_and_the_globs(tmp_path: Path) -> None:
    cfg = config(tmp_path, WEEKEND, tz="Europe/Berlin")
    # Friday 4 December 2026, 17:00 in Berlin is 16:00 UTC (winter time).
    assert frozen(cfg, "billing-eu", utc(2026, 12, 4, 15, 59, 59)) is None
    hold = frozen(cfg, "billing-eu", utc(2026, 12, 4, 16, 0))
    assert hold == Hold(utc(2026, 12, 7, 8, 0), "weekend freeze")  # Monday 09:00 in Berlin
    assert hold.text() == "held by freeze until 2026-12-07T08:00:00Z (weekend freeze)"
    assert frozen(cfg, "billing-eu", utc(2026, 12, 6, 12, 0)) == hold
    assert frozen(cfg, "billing-eu", utc(2026, 12, 7, 8, 0)) is None
    assert frozen(cfg, "crm", utc(2026, 12, 5, 12, 0)) is None  # not matched by billing-*
    # In summer, 17:00 in Berlin is 15:00 UTC.
    assert frozen(cfg, "billing-eu", utc(2026, 7, 3, 14, 59)) is None
    assert frozen(cfg, "billing-eu", utc(2026, 7, 3, 15, 0)) == Hold(
        utc(2026, 7, 6, 7, 0), "weekend freeze"
    )


def test_windows_that_overlap_or_touch_hold_until_the_last_one_ends(tmp_path: Path) -> None:
    cfg = config(
        tmp_path,
        {"from": "2026-12-20T10:00:00Z", "to": "2026-12-20T12:00:00Z", "reason": "release"},
        {"from": "2026-12-20T11:30:00+01:00", "to": "2026-12-20T13:00:00Z", "reason": "audit"},
        {"from": "2026-12-20T13:00:00Z", "to": "2026-12-20T14:00:00Z", "reason": "audit"},
        {"flows": ["other"], "from": "2026-12-20T00:00:00Z", "to": "2026-12-21T00:00:00Z"},
    )
    assert frozen(cfg, "billing", utc(2026, 12, 20, 9, 59)) is None
    assert frozen(cfg, "billing", utc(2026, 12, 20, 10, 0)) == Hold(
        utc(2026, 12, 20, 14, 0), "release; audit"
    )
    assert frozen(cfg, "billing", utc(2026, 12, 20, 13, 30)) == Hold(
        utc(2026, 12, 20, 14, 0), "audit"
    )
    assert frozen(cfg, "billing", utc(2026, 12, 20, 14, 0)) is None
    assert frozen(cfg, "other", utc(2026, 12, 20, 14, 0)) == Hold(
        utc(2026, 12, 21), "freeze window"
    )


class DrivenClock:
    """A clock that moves only when the code under test sleeps."""

    def __init__(self, now: datetime) -> None:
        self.now = now
        self.sleeps: list[float] = []

    def __call__(self) -> datetime:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += timedelta(seconds=seconds)
        await asyncio.sleep(0)


def test_the_timer_fires_at_the_end_of_the_window_and_rearms_for_the_next(
    tmp_path: Path,
) -> None:
    cfg = config(tmp_path, WEEKEND, tz="Europe/Berlin")
    clock = DrivenClock(utc(2026, 12, 4, 18, 30))
    ended: list[tuple[str, datetime]] = []

    async def scenario() -> None:
        done = asyncio.Event()

        async def on_end(flow: str) -> None:
            ended.append((flow, clock()))
            hold = timers.hold(flow)
            assert hold is None  # the window is over when the timer fires
            done.set()

        timers = FreezeTimers(cfg, on_end, clock=clock, sleep=clock.sleep)
        hold = timers.hold("billing-eu")
        assert hold is not None
        timers.arm("billing-eu", hold)
        await asyncio.wait_for(done.wait(), 10)
        await timers.close()

    asyncio.run(scenario())
    assert ended == [("billing-eu", utc(2026, 12, 7, 8, 0))]
    # One timer, re-checked at least hourly (a wall-clock step delays it by an hour at most).
    assert max(clock.sleeps) <= MAX_TIMER_SLEEP
    assert sum(clock.sleeps) == pytest.approx(
        (utc(2026, 12, 7, 8) - utc(2026, 12, 4, 18, 30)).total_seconds()
    )


def test_a_rearmed_or_cancelled_timer_does_not_fire(tmp_path: Path) -> None:
    cfg = config(tmp_path, {"from": "2026-12-20T10:00:00Z", "to": "2026-12-20T12:00:00Z"})
    clock = DrivenClock(utc(2026, 12, 20, 11, 0))
    ended: list[str] = []

    async def scenario() -> None:
        async def on_end(flow: str) -> None:
            ended.append(flow)

        async def stuck(seconds: float) -> None:
            await asyncio.Event().wait()  # time stands still

        timers = FreezeTimers(cfg, on_end, clock=clock, sleep=stuck)
        hold = timers.hold("a")
        assert hold is not None
        timers.arm("a", hold)
        timers.arm("a", hold)  # re-armed: one timer
        timers.arm("b", hold)
        timers.cancel("b")
        await asyncio.sleep(0)
        assert timers.armed() == {"a": True}
        await timers.close()

    asyncio.run(scenario())
    assert ended == []


def one_off(start: datetime, end: datetime, reason: str = "release freeze") -> str:
    return (
        '[[freeze]]\nflows = ["bill*"]\n'
        f'from = "{iso(start)}"\nto = "{iso(end)}"\nreason = "{reason}"\n'
    )


def events(env: FlowEnv, kind: str, flow: str) -> list[dict[str, Any]]:
    return db_rows(
        env.daemon.state_dir,
        "SELECT * FROM events WHERE kind = ? AND flow = ? ORDER BY id",
        kind,
        flow,
    )


def reload(env: FlowEnv, extra_toml: str) -> None:
    """Rewrite the daemon's config with `extra_toml` and SIGHUP it; wait for the reload."""
    before = len(
        db_rows(env.daemon.state_dir, "SELECT 1 FROM events WHERE kind = 'config.reloaded'")
    )
    env.daemon.extra_toml = extra_toml
    env.daemon.write_config()
    assert env.daemon.proc is not None
    env.daemon.proc.send_signal(signal.SIGHUP)
    wait_until(
        lambda: (
            len(
                db_rows(env.daemon.state_dir, "SELECT 1 FROM events WHERE kind = 'config.reloaded'")
            )
            > before
        ),
        timeout=30,
    )


def test_a_freeze_window_holds_automatic_publishes_until_it_ends_and_force_publishes(
    make_env: Any,
) -> None:
    now = datetime.now(UTC)
    env: FlowEnv = make_env(
        extra_toml=one_off(now - timedelta(minutes=1), now + timedelta(hours=1))
    )
    # A person's `flow apply` is not held; `other` matches no window.
    billing = env.counter("billing")
    other = env.counter("other")
    assert env.flow("billing")["freeze"]["reason"] == "release freeze"
    assert env.flow("other")["freeze"] is None

    # A push during the window: builds and registers, `other` publishes, `billing` waits.
    env.push(counter_files("v2"), message="v2")
    assert env.wait_deploy("other", 2)["status"] == "done"
    wait_until(lambda: events(env, "deploy.frozen", "billing"), timeout=30)
    flow = env.flow("billing")
    assert flow["version"] == 1 and flow["state"] == "running"
    assert flow["held"].startswith("held by freeze until ") and flow["held"].endswith(
        "(release freeze)"
    )
    assert env.show("billing")["draft"]["problems"] == []
    assert "held by freeze until" in env.daemon.cli("flow", "show", "billing").stdout
    assert "held by freeze until" in env.daemon.cli("status").stdout
    refused = env.daemon.cli("flow", "publish", "billing", check=False)
    assert refused.returncode == 1 and "--force" in refused.stderr
    assert "held by freeze until" in refused.stderr

    # Held across a restart (and the catch-up does not draft it again).
    env.daemon.stop()
    env.daemon.start()
    wait_until(lambda: env.flow("billing")["state"] == "running", timeout=60)
    assert env.flow("billing")["held"] and env.flow("billing")["version"] == 1
    assert len(events(env, "deploy.frozen", "billing")) == 1

    # The window is made to end in a few seconds: the draft is published at its end, by itself.
    end = datetime.now(UTC) + timedelta(seconds=4)
    reload(env, one_off(now - timedelta(minutes=1), end))
    dep = env.wait_deploy("billing", 2, timeout=60)
    assert dep["status"] == "done" and dep["trigger"] == "freeze ended"
    assert datetime.fromisoformat(dep["started_at"]) >= end.replace(microsecond=0)
    env.wait_by(billing, "v2")
    assert env.flow("billing")["freeze"] is None and env.flow("billing")["held"] is None

    # A window that opens a few seconds from now; a push inside it; --force publishes anyway.
    start = datetime.now(UTC) + timedelta(seconds=5)
    reload(env, one_off(start, start + timedelta(hours=1), reason="audit"))
    seen = env.flow("billing")["freeze"]
    assert seen is None or datetime.now(UTC) >= start  # not open before its time
    wait_until(lambda: env.flow("billing")["freeze"], timeout=30)
    frozen_before = len(events(env, "deploy.frozen", "billing"))
    env.push(counter_files("v3"), message="v3")
    assert env.wait_deploy("other", 3)["status"] == "done"
    wait_until(lambda: len(events(env, "deploy.frozen", "billing")) > frozen_before, timeout=30)
    res = json.loads(env.daemon.cli("flow", "publish", "billing", "--force", "--json").stdout)
    assert res["status"] == "done" and res["version"] == 3
    forced = events(env, "deploy.forced", "billing")
    assert len(forced) == 1 and "during a freeze" in forced[0]["message"]
    assert "(audit)" in forced[0]["message"]
    assert env.deploys()[0]["trigger"] == "flow publish --force"
    env.wait_by(billing, "v3")
    assert {r["by"] for r in read_out(other)} >= {"v1", "v2", "v3"}


def test_scheduled_runs_during_a_freeze_keep_the_versions_registered_before_it(
    make_env: Any,
) -> None:
    """An ordinary flow has no publish to hold: its runs take the newest valid version each
    time. During a freeze they take only versions registered before it began — a push during
    a release freeze does not reach a scheduled run either — and after it the newest again."""
    from tests.flows.test_ordinary import files as ordinary_files
    from tests.flows.test_ordinary import ordinary

    env: FlowEnv = make_env(ordinary_files())
    out = env.out("billing-nightly")
    env.apply(ordinary("billing-nightly", out))  # every 1h: the runs here are `flow run`s
    # The window opens at the next whole second (its `from` has seconds), after v1 was built.
    start = (datetime.now(UTC) + timedelta(seconds=1)).replace(microsecond=0)
    reload(env, one_off(start, start + timedelta(hours=1)))
    wait_until(lambda: env.flow("billing-nightly")["freeze"], timeout=30)
    env.push(ordinary_files("v2"), message="v2")  # registered during the freeze

    def run() -> dict[str, Any]:
        done = env.daemon.cli("flow", "run", "billing-nightly", "--wait", "--json")
        return dict(json.loads(done.stdout))

    held = run()
    assert held["status"] == "succeeded", held
    assert [s["version"] for s in held["steps"]] == [1, 1], held
    assert {r["by"] for r in read_out(out)} == {"v1"}
    assert "hello v2 not used by runs (registered during the freeze)" in env.daemon.log()
    assert env.flow("billing-nightly")["needs_attention"] is None  # a freeze is no problem

    reload(env, "")  # the freeze is over: the next run takes v2
    after = run()
    assert [s["version"] for s in after["steps"]] == [2, 2], after
    assert "v2" in {r["by"] for r in read_out(out)}
