"""`GET /healthz`: 200 when all is well; 503 with reasons for a lagging loop, an unwritable
database or a nearly full disk. The probes run against a real loop, SQLite file and disk."""

from __future__ import annotations

import asyncio
import shutil
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path

import httpx

from deployd.health import LagMonitor, Limits, check, check_db, check_disk
from deployd.store import Store
from tests.conftest import HTTP, Daemon, wait_until


def test_healthy_daemon_answers_200_with_figures(daemon_factory: Callable[..., Daemon]) -> None:
    d = daemon_factory().start()
    resp = HTTP.get(d.url + "/healthz", timeout=5)
    assert resp.status_code == 200
    body = resp.json()
    assert body["ok"] is True and body["reasons"] == []
    assert body["disk"]["free_bytes"] > 0
    assert 0 <= body["loop_lag_s"] < 1
    assert d.stop() == 0


def test_nearly_full_disk_makes_the_daemon_unhealthy(
    daemon_factory: Callable[..., Daemon],
) -> None:
    free = shutil.disk_usage("/tmp").free
    d = daemon_factory(health_min_free_mb=free // (1024 * 1024) + 1024 * 1024)
    d.start(wait=False)

    def answered() -> httpx.Response | None:
        try:
            return HTTP.get(d.url + "/healthz", timeout=1)
        except httpx.HTTPError:
            return None

    resp = wait_until(answered, timeout=30)
    assert resp.status_code == 503
    body = resp.json()
    assert body["ok"] is False
    assert len(body["reasons"]) == 1 and "nearly full" in body["reasons"][0]
    assert d.stop() == 0


def test_disk_limits(tmp_path: Path) -> None:
    assert check_disk(tmp_path, Limits(min_free_bytes=0, min_free_ratio=0))[0] is None
    problem, figures = check_disk(tmp_path, Limits(min_free_bytes=0, min_free_ratio=1.0))
    assert problem and "nearly full" in problem and figures["total_bytes"] > 0
    assert check_disk(tmp_path / "missing", Limits())[0]


def test_database_held_by_another_writer_is_reported(tmp_path: Path) -> None:
    store = Store.open(tmp_path / "deployd.db")
    try:
        assert check_db(store) is None
        other = sqlite3.connect(tmp_path / "deployd.db", isolation_level=None)
        other.execute("BEGIN IMMEDIATE")  # a writer that never lets go
        try:
            problem = check_db(store)
            assert problem and "not writable" in problem
            body = check(store, tmp_path, None, Limits(min_free_bytes=0, min_free_ratio=0))
            assert body["ok"] is False and body["reasons"] == [problem]
        finally:
            other.execute("ROLLBACK")
            other.close()
        assert check_db(store) is None
        store.conn.execute("SELECT 1")  # the probe left the connection usable
    finally:
        store.close()


def test_a_blocked_loop_shows_as_lag(tmp_path: Path) -> None:
    async def scenario() -> tuple[float, dict[str, object]]:
        monitor = LagMonitor(interval=0.02)
        task = asyncio.get_running_loop().create_task(monitor.run())
        await asyncio.sleep(0.1)
        quiet = monitor.current()
        # The limit is far above what a loaded machine's scheduler delays a timer by, and
        # the block far above the limit: neither side depends on the machine being idle.
        threading.Event().wait(2.0)  # something blocks the event loop
        body = check(None, tmp_path, monitor, Limits(max_loop_lag=1.0, min_free_bytes=0))
        task.cancel()
        return quiet, body

    quiet, body = asyncio.run(scenario())
    assert quiet < 1.0
    assert body["ok"] is False
    assert "event loop lags" in str(body["reasons"])
