"""Automatic redeploy end to end: a real push republishes the flows that use the component.

Every test runs a real daemon, pushes real commits to its hosted repository and reads what
the real step processes wrote. The counter goes through the trigger's snapshot, so its n
values in the out file must be exactly 1..N across every switch: nothing lost or doubled.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest

from tests.conftest import wait_until
from tests.flows.conftest import (
    COUNTER_DESC,
    TICKER,
    FlowEnv,
    assert_contiguous,
    counter_files,
    flow_toml,
    read_out,
    writer,
)

FLOW_KEYS = {
    "name",
    "type",
    "update",
    "state",
    "version",
    "stale",
    "needs_attention",
    "dead_letters",
    "quarantined",
    "freeze",
    "held",
    "canary",  # a canary publish in progress (issue 16), else null
    "runtime",
    "queues",
    "steps",
    "last_deploy",
}
STEP_KEYS = {
    "id",
    "kind",
    "component",
    "function",
    "version",
    "state",
    "pid",
    "backpressure",
    "dead_letters",
}
DEPLOY_KEYS = {"status", "to_version", "warmup_ms", "gap_ms", "finished_at"}


def mapped_flow(env: FlowEnv, name: str = "counter") -> str:
    return flow_toml(
        name,
        env.out(name),
        steps=[
            {"id": "tick", "component": "hello", "function": "ticker", "interval": "50ms"},
            {
                "id": "write",
                "component": "hello",
                "function": "write",
                "mapping": '{"text": $uppercase(text), "n": n}',
                "config": {"out": env.out(name)},
            },
        ],
    )


def test_push_switches_the_output_to_the_new_code_with_nothing_lost(env: FlowEnv) -> None:
    out = env.out("counter")
    env.apply(mapped_flow(env))
    env.wait_by(out, "v1", 5)

    first = env.flow("counter")
    assert set(first) == FLOW_KEYS
    assert first["type"] == "realtime" and first["update"] == "auto"
    assert first["runtime"] == "embedded"
    assert (first["state"], first["version"], first["stale"]) == ("running", 1, False)
    assert first["needs_attention"] is None
    # Two visible steps, three real ones: write has a mapper step in front of it.
    assert [(s["id"], s["kind"]) for s in first["steps"]] == [
        ("tick", "trigger"),
        ("write:mapper", "mapper"),
        ("write", "action"),
    ]
    for s in first["steps"]:
        assert set(s) == STEP_KEYS
        assert s["state"] == "running"
    tick, mapper, write = first["steps"]
    assert (tick["component"], tick["function"], tick["version"]) == ("hello", "ticker", 1)
    assert (write["component"], write["function"], write["version"]) == ("hello", "write", 1)
    assert isinstance(tick["pid"], int) and isinstance(write["pid"], int)
    assert mapper["pid"] is None and mapper["component"] is None
    assert set(first["last_deploy"]) == DEPLOY_KEYS
    assert first["last_deploy"]["status"] == "done" and first["last_deploy"]["to_version"] == 1

    shown = env.show("counter")
    assert shown["step_count"] == 3

    sha = env.push(counter_files("v2"))
    env.wait_by(out, "v2", 5)
    rows = read_out(out)
    assert_contiguous(rows)
    tags = [r["by"] for r in rows]
    switch = tags.index("v2")
    assert set(tags[:switch]) == {"v1"} and set(tags[switch:]) == {"v2"}, tags
    # The mapping is applied to every message, old code and new.
    assert all(r["text"] == f"HI {r['n']}" for r in rows)

    dep = env.wait_deploy("counter", 2)
    assert dep["status"] == "done"
    assert (dep["from_version"], dep["trigger"]) == (1, "component version")
    assert (dep["component"], dep["component_version"], dep["sha"]) == ("hello", 2, sha)
    assert dep["warmup_ms"] > 0 and dep["gap_ms"] is not None and dep["gap_ms"] >= 0

    now = env.flow("counter")
    assert (now["version"], now["state"], now["stale"]) == (2, "running", False)
    assert [s["version"] for s in now["steps"] if s["kind"] != "mapper"] == [2, 2]
    assert now["last_deploy"]["to_version"] == 2
    assert now["last_deploy"]["gap_ms"] == dep["gap_ms"]
    assert {s["pid"] for s in now["steps"]}.isdisjoint({tick["pid"], write["pid"]})
    # The old step processes are gone.
    wait_until(lambda: not any(_alive(p) for p in (tick["pid"], write["pid"])), timeout=30)


def _alive(pid: int) -> bool:
    import os

    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0): it has exited.
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def test_a_push_that_removes_a_used_action_needs_attention_and_the_old_version_runs_on(
    env: FlowEnv,
) -> None:
    out = env.counter()
    desc: dict[str, Any] = copy.deepcopy(COUNTER_DESC)
    del desc["actions"]["write"]
    env.push(counter_files("v2", **{"component.json": desc}))

    reason = 'step write: action "write" no longer exists in hello v2'
    flow = wait_until(lambda: (f := env.flow("counter"))["needs_attention"] and f, timeout=30)
    assert flow["needs_attention"] == reason
    assert (flow["version"], flow["state"], flow["stale"]) == (1, "running", True)
    rows = env.wait_more(out, 3)
    assert {r["by"] for r in rows} == {"v1"}
    assert_contiguous(rows)

    shown = env.show("counter")
    assert shown["draft"] is not None and shown["draft"]["problems"] == [reason]
    assert [s["version"] for s in shown["draft"]["steps"]] == [2, 2]
    assert [d["to_version"] for d in env.deploys()] == [1]  # nothing was published

    # The next good push fixes it: published, attention cleared.
    env.push(counter_files("v3"))
    env.wait_by(out, "v3", 2)
    flow = wait_until(lambda: (f := env.flow("counter"))["version"] == 2 and f, timeout=30)
    assert flow["needs_attention"] is None and flow["stale"] is False
    assert [s["version"] for s in flow["steps"]] == [3, 3]
    assert env.show("counter")["draft"] is None
    assert_contiguous(read_out(out))


def test_a_version_that_fails_at_import_is_not_published(env: FlowEnv) -> None:
    out = env.counter()
    broken = writer("v2", extra='raise RuntimeError("boom at import")')
    env.push(counter_files("v2", **{"lib/write.py": broken}))

    dep = env.wait_deploy("counter", 2)
    assert dep["status"] == "failed"
    assert "step write" in dep["reason"] and "boom at import" in dep["reason"]
    assert "RuntimeError: boom at import" in dep["log_tail"]
    assert dep["gap_ms"] is None
    flow = env.flow("counter")
    assert flow["version"] == 1 and flow["state"] == "running"
    assert "boom at import" in flow["needs_attention"]
    assert flow["last_deploy"]["status"] == "failed"
    rows = env.wait_more(out, 3)
    assert {r["by"] for r in rows} == {"v1"}
    assert_contiguous(rows)


@pytest.mark.parametrize("step", ["write", "tick"])
def test_a_version_that_crash_loops_after_the_switch_is_rolled_back(
    make_env: Any, step: str
) -> None:
    env: FlowEnv = make_env(rollback_window="30s", rollback_exits=2)
    out = env.counter()
    if step == "write":
        crash = "def process(msg, cfg):\n    os._exit(1)"
        files = {"lib/write.py": writer("v2").replace("def process(msg, cfg):", crash)}
    else:
        files = {
            "lib/write.py": writer("v1"),
            "lib/ticker.py": "import os\n"
            + TICKER.replace("n = snap", "os._exit(1)\n    n = snap"),
        }
    env.push(counter_files("v2", **files))

    env.wait_deploys(lambda ds: ds[0]["status"] == "rolled_back", timeout=30)
    dep = env.deploys()[0]
    assert dep["to_version"] == 2 and f"step {step} exited (code 1)" in dep["reason"]
    flow = wait_until(lambda: (f := env.flow("counter"))["state"] == "running" and f, timeout=30)
    assert flow["version"] == 1 and "v2 rolled back" in flow["needs_attention"]
    assert [s["version"] for s in flow["steps"]] == [1, 1]
    rows = env.wait_more(out, 3)
    # The message the new code crashed on was handled again by the old code: nothing lost.
    assert {r["by"] for r in rows} == {"v1"}
    assert_contiguous(rows)


def test_a_manual_flow_gets_a_validated_draft_only(env: FlowEnv) -> None:
    out = env.counter(update="manual")
    env.push(counter_files("v2"))
    flow = wait_until(lambda: (f := env.flow("counter"))["stale"] and f, timeout=30)
    assert flow["version"] == 1 and flow["needs_attention"] is None
    assert flow["update"] == "manual"
    draft = env.wait_draft("counter")
    assert draft["problems"] == [] and [s["version"] for s in draft["steps"]] == [2, 2]
    rows = env.wait_more(out, 3)
    assert {r["by"] for r in rows} == {"v1"}

    res = env.daemon.cli("flow", "publish", "counter")
    assert "counter v2: done" in res.stdout
    env.wait_by(out, "v2", 2)
    flow = env.flow("counter")
    assert (flow["version"], flow["stale"]) == (2, False)
    assert env.show("counter")["draft"] is None
    assert_contiguous(read_out(out))
    res = env.daemon.cli("flow", "publish", "counter", check=False)
    assert res.returncode == 1 and "no draft" in res.stderr


def test_a_pinned_step_is_never_auto_updated(env: FlowEnv) -> None:
    out = env.out("pinned")
    text = flow_toml(
        "pinned",
        out,
        steps=[
            {"id": "tick", "component": "hello", "function": "ticker", "interval": "50ms"},
            {
                "id": "write",
                "component": "hello",
                "function": "write",
                "version": 1,
                "config": {"out": out},
            },
        ],
    )
    env.apply(text)
    env.wait_by(out, "v1", 2)
    env.push(counter_files("v2"))
    dep = env.wait_deploy("pinned", 2)
    assert dep["status"] == "done"
    env.wait_more(out, 5)
    flow = env.flow("pinned")
    assert [(s["id"], s["version"]) for s in flow["steps"]] == [("tick", 2), ("write", 1)]
    rows = read_out(out)
    assert {r["by"] for r in rows} == {"v1"}  # the writer is pinned to v1's code
    assert_contiguous(rows)
