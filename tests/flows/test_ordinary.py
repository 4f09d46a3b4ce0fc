"""Ordinary (scheduled) flows end to end (issue 14): a real daemon, real pushes, real steps.

The `batch` trigger emits `count` messages per call, numbered by run (its snapshot) and `i`;
its `shutdown` hook appends a line to `<out>.shutdown`, so a run's shutdown is visible. The
`slow` action sleeps `sleep` seconds, then writes its message like `write` does.
"""

from __future__ import annotations

import copy
import itertools
import json
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import db_rows, dead_letter_rows, wait_until
from tests.flows.conftest import COUNTER_DESC, FlowEnv, counter_files, flow_toml, read_out, writer

pytestmark = pytest.mark.timeout(240)

DESC: dict[str, Any] = copy.deepcopy(COUNTER_DESC)
DESC["triggers"]["batch"] = {"main": "./lib/batch.py", "title": "Batch"}
DESC["actions"]["slow"] = {"main": "./lib/slow.py", "title": "Slow"}

BATCH = """\
def process(msg, cfg, snapshot, ctx):
    run = snapshot.get("run", 0) + 1
    ctx.emit("snapshot", {"run": run})
    return [{"run": run, "i": i, "n": i} for i in range(int(cfg.get("count", 3)))]

def shutdown(cfg, data):
    with open(cfg["out"] + ".shutdown", "a") as fh:
        fh.write("down\\n")
"""

SLOW = writer("slow", "import time").replace(
    "    body = msg[", '    time.sleep(float(cfg.get("sleep", 1)))\n    body = msg[', 1
)


def files(tag: str = "v1", **overrides: Any) -> dict[str, Any]:
    return counter_files(
        tag, **{"component.json": DESC, "lib/batch.py": BATCH, "lib/slow.py": SLOW, **overrides}
    )


def ordinary(
    name: str,
    out: Path,
    *,
    action: str = "write",
    count: int = 3,
    sleep: float = 1.0,
    component: str = "hello",
    **keys: str,
) -> str:
    """An ordinary flow: batch (count messages) → `action` (write or slow) into `out`."""
    steps = [
        {
            "id": "batch",
            "component": component,
            "function": "batch",
            "config": {"out": out, "count": count},
        },
        {
            "id": "sink",
            "component": component,
            "function": action,
            "config": {"out": out, "sleep": sleep},
        },
    ]
    keys.setdefault("every", "1h")
    return flow_toml(name, out, steps=steps, type_="ordinary", keys=keys)


def runs(env: FlowEnv, flow: str) -> list[dict[str, Any]]:
    """`flow runs --json`, newest first."""
    return list(json.loads(env.daemon.cli("flow", "runs", flow, "--json").stdout))


def run_rows(env: FlowEnv, flow: str) -> list[dict[str, Any]]:
    """The runs of `flow` read from the state database, oldest first (cheap, for polls)."""
    rows = db_rows(env.daemon.state_dir, "SELECT * FROM flow_runs WHERE flow = ? ORDER BY id", flow)
    for row in rows:
        row["steps"] = json.loads(row["steps"])
        row["errors"] = json.loads(row["errors"])
    return rows


def wait_runs(
    env: FlowEnv, flow: str, pred: Callable[[list[dict[str, Any]]], Any], timeout: float = 60
) -> Any:
    return wait_until(lambda: pred(run_rows(env, flow)), timeout=timeout, interval=0.1)


def succeeded(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in rows if r["status"] == "succeeded"]


@pytest.fixture
def env(shared_make_env: Callable[..., FlowEnv]) -> FlowEnv:
    """hello v1 on the module's shared daemon: for tests that add flows and leave the daemon
    running (a test that pushes takes a component of its own: shared_make_env(name=...))."""
    return shared_make_env(files())


@pytest.fixture
def own_env(make_env: Callable[..., FlowEnv]) -> FlowEnv:
    """hello v1 on a daemon of the test's own: for tests that stop or kill it."""
    return make_env(files())


def test_every_second_runs_repeatedly_and_a_push_is_the_next_runs_version(
    shared_make_env: Callable[..., FlowEnv],
) -> None:
    env = shared_make_env(files(), name="sync")  # pushed to: a component of its own
    out = env.out("sync")
    res = json.loads(
        env.apply(ordinary("sync", out, every="1s", component="sync"), "--json").stdout
    )
    assert res["type"] == "ordinary" and res["status"] == "scheduled", res
    assert res["next_run_at"], res
    wait_runs(env, "sync", lambda rows: len(succeeded(rows)) >= 3)

    listed = runs(env, "sync")
    last = next(r for r in listed if r["status"] == "succeeded")
    assert set(last) >= {"id", "started_at", "finished_at", "status", "steps", "handled", "errors"}
    assert last["steps"] == [
        {"id": "batch", "component": "sync", "version": 1},
        {"id": "sink", "component": "sync", "version": 1},
    ]
    assert last["handled"] == 3 and last["errors"] == [], last
    # Every run: its three messages, each once; the trigger's shutdown() ran after each.
    rows = read_out(out)
    by_run: dict[int, list[int]] = {}
    for row in rows:
        by_run.setdefault(row["run"], []).append(row["i"])
    finished = {r["run"] for r in rows}
    assert all(sorted(by_run[r]) == [0, 1, 2] for r in finished if r < max(finished)), by_run
    assert len(Path(f"{out}.shutdown").read_text().splitlines()) >= 3

    flow = env.flow("sync")
    assert flow["type"] == "ordinary" and flow["next_run_at"], flow
    assert set(flow["last_run"]) == {"id", "status", "finished_at"}, flow
    assert flow["state"] in ("scheduled", "running") and not flow["stale"], flow
    assert env.show("sync")["next_run_at"]
    assert "next run: " in env.daemon.cli("flow", "show", "sync").stdout
    table = env.daemon.cli("flow", "list").stdout
    assert "next " in table and "run " in table, table

    # A push between two runs: the next run takes v2 by itself.
    env.push(files("v2"), "v2")
    wait_runs(env, "sync", lambda rows: any(r["steps"][1]["version"] == 2 for r in succeeded(rows)))
    env.wait_by(out, "v2", 3)
    assert not db_rows(env.daemon.state_dir, "SELECT id FROM deployments WHERE flow = 'sync'")
    assert not db_rows(env.daemon.state_dir, "SELECT flow FROM drafts WHERE flow = 'sync'")
    versions = db_rows(env.daemon.state_dir, "SELECT version FROM flow_versions WHERE flow='sync'")
    assert len(versions) == 1, versions

    # flow stop pauses the schedule; flow start resumes it.
    env.daemon.cli("flow", "stop", "sync")
    assert env.flow("sync")["next_run_at"] is None
    wait_runs(env, "sync", lambda rows: all(r["status"] != "running" for r in rows))
    stopped_at = len(run_rows(env, "sync"))
    assert env.flow("sync")["state"] == "stopped"
    assert "scheduled" in env.daemon.cli("flow", "start", "sync").stdout
    wait_runs(env, "sync", lambda rows: len(rows) > stopped_at)


def test_a_version_without_the_used_action_leaves_the_run_on_the_older_one(
    shared_make_env: Callable[..., FlowEnv],
) -> None:
    env = shared_make_env(files(), name="nightly")  # pushed to: a component of its own
    out = env.out("nightly")
    env.apply(ordinary("nightly", out, component="nightly"))  # every 1h: runs are `flow run`s
    gone = copy.deepcopy(DESC)
    del gone["actions"]["write"]
    env.push({"component.json": gone}, "drop the write action")

    done = env.daemon.cli("flow", "run", "nightly", "--wait", "--json")
    run = json.loads(done.stdout)
    assert run["status"] == "succeeded", run
    assert [s["version"] for s in run["steps"]] == [1, 1], run
    flow = env.flow("nightly")
    attention = flow["needs_attention"] or ""
    assert "no longer exists in nightly v2" in attention, flow
    assert "runs use nightly v1" in attention, flow
    assert "needs attention" in env.daemon.cli("flow", "list").stdout

    # A run of a flow whose schedule is paused: `flow run` runs it all the same.
    env.daemon.cli("flow", "stop", "nightly")
    again = env.daemon.cli("flow", "run", "nightly", "--wait")
    assert "succeeded" in again.stdout, again.stdout
    assert len(read_out(out)) == 6
    # A real-time flow is not run by `flow run`; an ordinary one is not published.
    bad = env.daemon.cli("flow", "publish", "nightly", check=False)
    assert bad.returncode != 0 and "ordinary (scheduled) flow" in bad.stderr, bad.stderr
    # Refused, nothing changed: a draft of an ordinary flow, a flow changing its type.
    bad = env.apply(ordinary("nightly", out, component="nightly"), "--draft", check=False)
    assert bad.returncode != 0 and "it has no drafts" in bad.stderr, bad.stderr
    bad = env.apply(flow_toml("nightly", out, component="nightly"), check=False)
    assert bad.returncode != 0 and "a flow's type cannot change" in bad.stderr, bad.stderr
    assert env.flow("nightly")["type"] == "ordinary" and env.flow("nightly")["version"] == 1


def test_overlap_skip_records_the_skipped_run(env: FlowEnv) -> None:
    out = env.out("busy")
    env.apply(ordinary("busy", out, action="slow", count=1, sleep=4, every="1s"))
    rows = wait_runs(
        env, "busy", lambda rows: rows if any(r["status"] == "skipped" for r in rows) else None
    )
    skipped = next(r for r in rows if r["status"] == "skipped")
    assert "was still going" in skipped["reason"], skipped
    wait_runs(env, "busy", lambda rows: succeeded(rows))
    listed = runs(env, "busy")
    assert any(r["status"] == "skipped" for r in listed)


def test_overlap_queue_runs_one_after_the_other(env: FlowEnv) -> None:
    out = env.out("queued")
    env.apply(
        ordinary("queued", out, action="slow", count=1, sleep=2.5, every="1s", overlap="queue")
    )
    rows = wait_runs(
        env,
        "queued",
        lambda rows: (
            rows if any(r["cause"] == "queued" and r["finished_at"] for r in rows) else None
        ),
    )
    # Runs never overlap: each starts after the one before finished.
    done = [r for r in rows if r["status"] != "skipped" and r["finished_at"]]
    for before, after in itertools.pairwise(done):
        assert after["started_at"] >= before["finished_at"], (before, after)


@pytest.mark.parametrize("catch_up", ["one", "none"])
def test_catch_up_after_the_daemon_was_stopped_across_a_due_time(
    own_env: FlowEnv, catch_up: str
) -> None:
    env = own_env
    out = env.out("catch")
    # every 2s (the least is 1s): the stop below spans a due time whatever the interval,
    # the test waits for it to pass; a longer one only made each wait longer
    env.apply(ordinary("catch", out, every="2s", catch_up=catch_up))
    wait_runs(env, "catch", succeeded)
    env.daemon.stop()
    due = db_rows(env.daemon.state_dir, "SELECT next_run_at FROM flow_schedules")[0]
    due_at = datetime.fromisoformat(due["next_run_at"])
    before = len(run_rows(env, "catch"))
    wait_until(lambda: datetime.now(UTC) > due_at, timeout=30, interval=0.1)  # missed it
    env.daemon.start()
    rows = wait_runs(env, "catch", lambda rows: rows if len(rows) > before else None)
    first = rows[before]
    if catch_up == "one":
        assert first["cause"] == "catch_up", first
    else:
        assert first["cause"] == "schedule", first
        events = db_rows(env.daemon.state_dir, "SELECT kind FROM events WHERE kind='run.missed'")
        assert events, "no run.missed event"


def test_a_run_past_its_run_timeout_is_stopped_and_keeps_the_rest_as_dead_letters(
    env: FlowEnv,
) -> None:
    out = env.out("slowpoke")
    env.apply(ordinary("slowpoke", out, action="slow", count=5, sleep=1.5, run_timeout="2s"))
    done = env.daemon.cli("flow", "run", "slowpoke", "--wait", "--json", check=False)
    assert done.returncode == 1, done.stdout + done.stderr
    run = json.loads(done.stdout)
    assert run["status"] == "timed_out", run
    assert "run_timeout" in run["errors"][0], run
    letters = dead_letter_rows(env.daemon.state_dir, "slowpoke")
    assert letters and all("run_timeout" in letter["error"] for letter in letters), letters
    written = {r["i"] for r in read_out(out)}
    lettered = {letter["body"]["i"] for letter in letters}
    assert written | lettered == {0, 1, 2, 3, 4}, (written, lettered)  # none lost
    assert not db_rows(env.daemon.state_dir, "SELECT id FROM messages WHERE flow = 'slowpoke'")
    # The daemon runs on: the next run succeeds (one message, fast enough).
    env.apply(ordinary("slowpoke", out, action="slow", count=1, sleep=0.1, run_timeout="30s"))
    assert "succeeded" in env.daemon.cli("flow", "run", "slowpoke", "--wait").stdout


def test_kill_9_mid_run_records_it_failed_and_loses_no_message(own_env: FlowEnv) -> None:
    env = own_env
    out = env.out("crash")
    env.apply(ordinary("crash", out, action="slow", count=4, sleep=1.0))
    env.daemon.cli("flow", "run", "crash")
    wait_until(lambda: read_out(out), timeout=60)  # mid-run: one handled, three to go
    env.daemon.kill()
    env.daemon.start()
    rows = wait_runs(env, "crash", lambda rows: rows if rows[0]["status"] != "running" else None)
    assert rows[0]["status"] == "failed" and "interrupted" in rows[0]["reason"], rows[0]
    assert db_rows(env.daemon.state_dir, "SELECT id FROM messages WHERE flow = 'crash'")
    # The next run's actions take what the killed one left first: every message arrives.
    done = env.daemon.cli("flow", "run", "crash", "--wait", "--json")
    assert json.loads(done.stdout)["status"] == "succeeded"
    assert {0, 1, 2, 3} <= {r["i"] for r in read_out(out) if r["run"] == 1}, read_out(out)
    assert not db_rows(env.daemon.state_dir, "SELECT id FROM messages WHERE flow = 'crash'")
