"""The schedule of ordinary flows, without a daemon: cron as cron means it, catch-up decisions.

`Schedule` takes `now`, so the catch-up cases need no waiting: a stored next due time in the
past is a missed run (`catch_up = "one"`: the job's next run is that past time, which
APScheduler's misfire handling runs at once; `"none"`: from now on, and an event).
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from deployd.flows.model import cron_trigger
from deployd.flows.schedule import Schedule, make_trigger
from deployd.store import Store
from deployd.store.runs import RunStore

TUESDAY_NOON = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("expr", "next_at"),
    [
        ("0 9 * * 0", "Sun 06 09:00"),  # cron's 0 is Sunday (APScheduler 3's would be Monday)
        ("0 9 * * 7", "Sun 06 09:00"),
        ("0 9 * * 1-5", "Wed 02 09:00"),
        ("0 9 * * 0-2", "Sun 06 09:00"),
        ("0 9 * * sat,sun", "Sat 05 09:00"),
        ("*/15 * * * *", "Tue 01 12:00"),
        ("30 12 * * *", "Tue 01 12:30"),
    ],
)
def test_cron_weekdays_are_crons(expr: str, next_at: str) -> None:
    fire = cron_trigger(expr, "UTC").get_next_fire_time(None, TUESDAY_NOON)
    assert fire is not None and fire.strftime("%a %d %H:%M") == next_at


def test_cron_reads_the_daemon_time_zone() -> None:
    fire = cron_trigger("0 13 * * *", "Europe/Berlin").get_next_fire_time(None, TUESDAY_NOON)
    assert fire is not None and fire.astimezone(UTC).hour == 12  # 13:00 CET is 12:00 UTC


def test_every_is_an_interval() -> None:
    now = datetime.now(UTC)
    trigger = make_trigger({"every": 30.0}, "UTC")  # its first due time: 30 s after it is made
    fire = trigger.get_next_fire_time(None, now)
    assert fire is not None and 0 < (fire - now).total_seconds() <= 31


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store.open(tmp_path / "deployd.db")


@pytest.mark.parametrize("catch_up", ["one", "none"])
@pytest.mark.timeout(30)
def test_a_missed_due_time_is_one_run_at_start_or_none(store: Store, catch_up: str) -> None:
    now = datetime.now(UTC)
    with store.tx():
        RunStore(store).set_next_run("nightly", (now - timedelta(hours=3)).isoformat())
    fired: list[tuple[str, str]] = []

    async def main() -> None:
        schedule = Schedule(store, "UTC", lambda f, c: fired.append((f, c)), now=lambda: now)
        schedule.start()
        try:
            spec = {"schedule": "0 * * * *", "catch_up": catch_up}
            next_at = schedule.add("nightly", spec, at_start=True)
            assert next_at is not None
            if catch_up == "one":
                for _ in range(500):  # the misfire runs on the loop at once
                    if fired:
                        break
                    await asyncio.sleep(0.01)
        finally:
            schedule.stop()

    asyncio.run(main())
    if catch_up == "one":
        assert fired == [("nightly", "catch_up")]  # three missed hours: one run
        stored = RunStore(store).next_run_at("nightly")
        assert stored is not None and datetime.fromisoformat(stored) > now
    else:
        assert fired == []
        assert store.last_event("run.missed") is not None


@pytest.mark.timeout(30)
def test_a_paused_flow_has_no_next_run(store: Store) -> None:
    async def main() -> None:
        schedule = Schedule(store, "UTC", lambda f, c: None)
        schedule.start()
        try:
            assert schedule.add("sync", {"every": 60.0}) is not None
            assert RunStore(store).next_run_at("sync") is not None
            schedule.remove("sync")
            assert schedule.next_run_at("sync") is None
            assert RunStore(store).next_run_at("sync") is None
        finally:
            schedule.stop()

    asyncio.run(main())
