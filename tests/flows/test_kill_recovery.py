"""Recovery from `kill -9`, found by the soak (tests/soak): a killed step, a killed publish.

A step killed with SIGKILL is restarted without the daemon spinning on its dead socket, and a
daemon killed while publishing a good version, after a newer one that cannot start was
registered, comes back running the good one.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable

from tests.conftest import db_rows, wait_until
from tests.flows.conftest import FlowEnv, counter_files, writer


def _pid(env: FlowEnv, step: str) -> int | None:
    return next((s["pid"] for s in env.flow("counter")["steps"] if s["id"] == step), None)


def test_a_killed_step_is_restarted_without_spinning_on_its_socket(env: FlowEnv) -> None:
    out = env.counter(interval="20ms")
    for step in ("write", "tick", "write"):
        pid = wait_until(lambda step=step: _pid(env, step), timeout=30)
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda step=step, pid=pid: _pid(env, step) not in (None, pid), timeout=30)
        env.wait_more(out, 3)
    log = env.daemon.log()
    # Before the fix each kill made the loops retry hundreds of times in the half second
    # between the socket closing and the exit being handled, and left a failed future behind.
    assert "socket.send() raised exception" not in log
    assert "never retrieved" not in log


def test_a_publish_cut_by_a_kill_is_finished_even_when_a_newer_version_cannot_start(
    make_env: Callable[..., FlowEnv],
) -> None:
    env = make_env()
    out = env.counter()
    slow = writer("v2", extra="import time\n\ndef init(cfg):\n    time.sleep(3)\n")
    env.work.commit("v2: good, slow to warm up", counter_files("v2", **{"lib/write.py": slow}))
    env.work.push(env.daemon.hosted("hello"))
    state = env.daemon.state_dir
    wait_until(
        lambda: db_rows(state, "SELECT 1 FROM deployments WHERE status = 'starting_new'"),
        timeout=30,
    )
    # v3 is registered while v2 is still warming up; its own deploy would fail.
    broken = writer("v3", extra='raise RuntimeError("boom at import")')
    env.push(counter_files("v3", **{"lib/write.py": broken}), message="v3: import error")
    env.daemon.kill()
    env.daemon.start()

    env.wait_by(out, "v2", 3, timeout=60)
    flow = wait_until(lambda: (f := env.flow("counter"))["state"] == "running" and f, timeout=30)
    assert [s["version"] for s in flow["steps"]] == [2, 2]
    deps = env.wait_deploys(
        lambda ds: [d for d in ds if "boom at import" in (d["reason"] or "")], timeout=30
    )
    assert deps[0]["status"] == "failed"
    assert env.flow("counter")["version"] == flow["version"]  # v3 never replaced it
