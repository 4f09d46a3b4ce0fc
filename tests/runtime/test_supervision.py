"""Supervision of step processes and durability of queues, with real processes and signals.

A killed step process is restarted after its back-off and gets its unfinished message again;
a daemon stopped (SIGTERM) or killed (SIGKILL) brings its flows back at their active
versions with their queues and snapshots intact.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from deployd.runtime.embedded.py_pool import POOL_BASE
from tests.conftest import db_rows, wait_until
from tests.flows.conftest import (
    HOLDING_WRITER,
    FlowEnv,
    assert_contiguous,
    counter_files,
    flow_toml,
    read_out,
)


def holding_flow(
    env: FlowEnv, name: str = "counter", prefetch: int | None = None, **config: Any
) -> tuple[str, Path, Path]:
    out, attempts, hold = env.out(name), env.tmp / "attempts", env.tmp / "hold"
    more = {"prefetch": prefetch} if prefetch else {}
    text = flow_toml(
        name,
        out,
        steps=[
            {"id": "tick", "component": "hello", "function": "ticker", "interval": "20ms"},
            {
                "id": "write",
                "component": "hello",
                "function": "write",
                "config": {"out": out, "attempts": attempts, "hold": hold, **config},
                **more,
            },
        ],
    )
    return text, out, attempts


def _pid(env: FlowEnv, step: str) -> int | None:
    for s in env.flow("counter")["steps"]:
        if s["id"] == step:
            return s["pid"] if s["state"] == "running" else None
    raise AssertionError(step)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return False


def _children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[-1].split()[1]) == pid:
                out.append(int(entry.name))
    return out


def _started(pid: int) -> int:
    """The start time of `pid`, in clock ticks since boot."""
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[19])


def test_a_killed_step_process_is_restarted_and_gets_its_message_again(
    make_env: Any,
) -> None:
    env: FlowEnv = make_env(counter_files(**{"lib/write.py": HOLDING_WRITER}))
    text, out, attempts = holding_flow(env)
    (env.tmp / "hold").touch()
    env.apply(text)
    wait_until(lambda: attempts.exists() and attempts.read_text() == "1\n", timeout=30)
    pid = _pid(env, "write")
    assert pid is not None

    os.kill(pid, signal.SIGKILL)  # mid-message: it has seen n=1 but not finished it
    killed = time.monotonic()
    wait_until(lambda: (p := _pid(env, "write")) is not None and p != pid)
    assert time.monotonic() - killed >= 0.9  # the back-off starts at 1 s
    # delivered again to the new process (which may be "running" a moment before it reads)
    wait_until(lambda: attempts.read_text() == "1\n1\n")
    (env.tmp / "hold").unlink()

    rows = env.wait_more(out, 10)
    assert_contiguous(rows)
    shown = env.show("counter")
    assert shown["stats"]["write"]["restarts"] == 1
    assert "step write exited" in shown["stats"]["write"]["last_error"]
    assert shown["state"] == "running"
    assert not _alive(pid)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_a_restarted_daemon_resumes_its_flows_with_queues_and_snapshots_intact(
    make_env: Any, sig: int
) -> None:
    env: FlowEnv = make_env(counter_files(**{"lib/write.py": HOLDING_WRITER}))
    env.push(counter_files(**{"lib/write.py": HOLDING_WRITER.replace('"v1"', '"v2"')}))
    # A slow writer behind a fast ticker: its queue grows. A slow step is handed one message
    # at a time (prefetch adapts to its pace), so a kill repeats at most one side effect.
    text, out, _attempts = holding_flow(env, pause="0.05")
    env.apply(text)
    wait_until(lambda: len(read_out(out)) >= 3, timeout=30)
    flow = env.flow("counter")
    assert flow["version"] == 1 and [s["version"] for s in flow["steps"]] == [2, 2]
    # The HTTP status holds the same "queues" that `flow show` prints (it reads it from there).
    # 8 queued, so that 5 or more are left after the stop: a clean stop finishes the message
    # in hand (it counts in the queue until its commit), and the writer may finish another
    # one or two before the stop (the ticker adds faster than it takes, but not every ms).
    wait_until(lambda: env.flow("counter")["queues"].get("write", 0) >= 8, timeout=30)
    pids = [s["pid"] for s in env.flow("counter")["steps"]]
    assert env.daemon.proc is not None
    # The fork server and everything it forked: step processes and idle pooled sailors.
    family = [p for fs in _children(env.daemon.proc.pid) for p in [fs, *_children(fs)]]
    assert set(pids) < set(family)

    assert env.daemon.stop(sig) == (0 if sig == signal.SIGTERM else -signal.SIGKILL)
    # No step process outlives its daemon, even a killed one.
    wait_until(lambda: not any(_alive(p) for p in family), timeout=30)
    queued = db_rows(env.daemon.state_dir, "SELECT COUNT(*) AS n FROM messages")[0]["n"]
    assert queued >= 5
    [snap] = db_rows(env.daemon.state_dir, "SELECT data FROM snapshots WHERE step = 'tick'")
    stopped = env.daemon.status()["flows"][0]
    assert stopped["state"] == "stopped" and stopped["version"] == 1
    before = read_out(out)

    env.daemon.start()
    flow = wait_until(lambda: (f := env.flow("counter"))["state"] == "running" and f, timeout=30)
    assert flow["version"] == 1 and [s["version"] for s in flow["steps"]] == [2, 2]
    rows = wait_until(lambda: len(r := read_out(out)) >= len(before) + queued + 3 and r, 30)
    ns = [r["n"] for r in rows]
    if sig == signal.SIGTERM:
        assert_contiguous(rows)  # a clean stop finishes the message in hand: exactly once
    else:
        # A kill may hit a message after its side effect and before its commit: that one
        # message may be written twice (at least once), but none is lost.
        assert sorted(set(ns)) == list(range(1, max(ns) + 1))
        assert len(ns) - len(set(ns)) <= 1
    # The counter went on from its saved snapshot (a lost one would restart it at 1).
    assert max(ns) > json.loads(snap["data"])["n"]
    assert all(r["by"] == "v2" for r in rows)
    assert [d["to_version"] for d in env.deploys()] == [1]  # nothing republished


def test_a_redeploy_takes_its_step_processes_from_the_idle_pool(env: FlowEnv) -> None:
    out = env.counter()
    assert env.daemon.proc is not None
    [forkserver] = [
        p
        for p in _children(env.daemon.proc.pid)
        if b"deployd.runtime.embedded.forkserver" in Path(f"/proc/{p}/cmdline").read_bytes()
    ]
    # The pool is filled in the background after a start: wait until idle sailors wait.
    running = {s["pid"] for s in env.flow("counter")["steps"]}
    idle = wait_until(
        lambda: len(i := set(_children(forkserver)) - running) >= POOL_BASE and i, timeout=30
    )
    pushed_at = max(_started(p) for p in idle)
    env.push(counter_files("v2"))
    env.wait_by(out, "v2", 2)
    new = {s["pid"] for s in env.flow("counter")["steps"]}
    assert new <= idle  # forked before the push: no fork during the warm-up
    assert all(_started(p) <= pushed_at for p in new)
    log = env.daemon.cli("logs", "counter", "--step", "write", "-n", "1000").stdout
    assert "--- deployd: starting step write (hello v2 write) ---" in log
    assert_contiguous(read_out(out))
