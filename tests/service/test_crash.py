"""Crash-only: SIGKILL the daemon at many points of push → build → publish, restart, check.

After every kill and restart: the state database passes `PRAGMA integrity_check`, no step
process of the killed daemon is left, exactly one flow version is active, and the newest
commit ends up running. At the end the flow's output holds every counter value exactly once
(the sink is idempotent by message id, which deployd keeps stable across redeliveries).
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Daemon, Work, wait_until

DESC: dict[str, Any] = {
    "title": "Crashy",
    "build": "sleep 0.3",
    "triggers": {"ticker": {"main": "./lib/ticker.py"}},
    "actions": {"sink": {"main": "./lib/sink.py", "fields": {"out": {"required": True}}}},
}
TICKER = """\
def process(msg, cfg, snapshot, ctx):
    n = snapshot.get("n", 0) + 1
    ctx.emit("snapshot", {"n": n})
    return {"n": n}
"""
SINK = """\
import json, os, time
TAG = {tag!r}
seen = set()

def init(cfg):
    time.sleep(0.3)  # a slow warm-up widens the window in which the daemon is killed
    if os.path.exists(cfg["out"]):
        with open(cfg["out"]) as fh:
            seen.update(json.loads(line)["id"] for line in fh if line.strip())

def process(msg, cfg):
    if msg["id"] in seen:  # a redelivery after a crash: the effect already happened
        return None
    with open(cfg["out"], "a") as fh:
        fh.write(json.dumps({{"id": msg["id"], "n": msg["body"]["n"], "by": TAG}}) + "\\n")
        fh.flush()
        os.fsync(fh.fileno())
    seen.add(msg["id"])
"""


def _db(daemon: Daemon) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{daemon.state_dir / 'deployd.db'}?mode=ro", uri=True)


def _query(daemon: Daemon, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    try:
        with _db(daemon) as conn:
            return conn.execute(sql, params).fetchall()
    except sqlite3.Error:
        return []


def _descendants(pid: int) -> set[int]:
    out: set[int] = set()
    stack = [pid]
    while stack:
        p = stack.pop()
        try:
            children = Path(f"/proc/{p}/task/{p}/children").read_text().split()
        except OSError:
            continue
        for c in map(int, children):
            out.add(c)
            stack.append(c)
    return out


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _read_out(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


KILL_POINTS: list[tuple[str, str]] = [
    ("build running", "SELECT 1 FROM builds WHERE sha = ? AND status = 'building'"),
    ("version registered", "SELECT 1 FROM versions WHERE sha = ?"),
    (
        "warm-up of the new steps",
        "SELECT 1 FROM deployments WHERE sha = ? AND status = 'starting_new'",
    ),
    ("publish finished", "SELECT 1 FROM deployments WHERE sha = ? AND status = 'done'"),
    ("just after the push", ""),
]


@pytest.mark.timeout(240)
def test_kill_anywhere_restarts_consistent(
    daemon_factory: Callable[..., Daemon], component: Callable[..., Work], tmp_path: Path
) -> None:
    out = tmp_path / "out.jsonl"
    daemon = daemon_factory([{"name": "crashy"}], warmup_timeout="20s").start()
    work = component("crashy", DESC)
    work.commit("v0", {"lib/ticker.py": TICKER, "lib/sink.py": SINK.format(tag="v0")})
    sha = work.push(daemon.hosted("crashy"))
    daemon.wait_recent("crashy", sha, timeout=30)
    flow = tmp_path / "flow.toml"
    flow.write_text(
        'name = "crashy"\n[[steps]]\nid = "tick"\ncomponent = "crashy"\nfunction = "ticker"\n'
        'interval = "20ms"\n[[steps]]\nid = "sink"\ncomponent = "crashy"\nfunction = "sink"\n'
        f'config = {{ out = "{out}" }}\n'
    )
    daemon.cli("flow", "apply", str(flow))
    wait_until(lambda: len(_read_out(out)) >= 5, timeout=30)

    for i, (point, sql) in enumerate(KILL_POINTS * 2, start=1):
        tag = f"v{i}"
        work.commit(tag, {"lib/sink.py": SINK.format(tag=tag)})
        assert daemon.proc is not None
        victims = _descendants(daemon.proc.pid)
        sha = work.push(daemon.hosted("crashy"))
        if sql:
            wait_until(
                lambda sql=sql, sha=sha: _query(daemon, sql, (sha,)), timeout=30, interval=0.002
            )
        daemon.kill()
        # Every process of the killed daemon (fork server, step processes) goes away by itself.
        wait_until(lambda victims=victims: not any(_alive(p) for p in victims), timeout=30)
        assert _query(daemon, "PRAGMA integrity_check") == [("ok",)], point
        daemon.start()
        # The newest commit ends up running: registered once, and the flow publishes it.
        daemon.wait_recent("crashy", sha, timeout=40)

        def runs_latest(tag: str = tag) -> bool:
            rows = _read_out(out)
            return bool(rows) and rows[-1]["by"] == tag

        wait_until(runs_latest, timeout=40)
        active = _query(daemon, "SELECT active_version FROM flows WHERE name = 'crashy'")
        assert len(active) == 1 and active[0][0] is not None
        unfinished = _query(
            daemon, "SELECT id FROM deployments WHERE status IN ('starting_new', 'switching')"
        )
        assert unfinished == [] or len(unfinished) <= 1  # at most the one running now

    rows = _read_out(out)
    ns = [r["n"] for r in rows]
    assert ns == list(range(1, len(ns) + 1)), "a counter value was lost or handled twice"
    shas = _query(daemon, "SELECT sha, COUNT(*) FROM versions GROUP BY sha HAVING COUNT(*) > 1")
    assert shas == [], "a commit was registered twice"
    failed = _query(
        daemon, "SELECT id, error FROM builds WHERE status = 'failed' AND error IS NULL"
    )
    assert failed == [], "a failed build has no reason"
    daemon.stop()
    assert _query(daemon, "PRAGMA integrity_check") == [("ok",)]
    assert time.time() > 0 and os.path.exists(daemon.state_dir / "deployd.db")
