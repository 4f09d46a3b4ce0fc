"""Operator commands against a real daemon: pause/resume, redeploy, gc, history, status."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.conftest import HTTP, db_rows, wait_until
from tests.flows.conftest import FlowEnv, counter_files, flow_toml, read_out, writer


def _status(env: FlowEnv) -> dict[str, Any]:
    return dict(json.loads(env.daemon.cli("status", "--json").stdout))


def test_paused_flow_gets_a_draft_only_and_resume_publishes_it(
    make_env: Callable[..., FlowEnv],
) -> None:
    env = make_env()
    out = env.counter("counter")
    assert env.daemon.cli("pause", "counter").stdout.strip() == "paused counter (flow)"
    assert _status(env)["paused"] == {"flow": ["counter"], "component": []}
    env.push(counter_files("v2", **{"lib/write.py": writer("v2")}))
    # The new version is drafted, not published: the flow keeps running v1.
    env.wait_draft("counter")
    env.wait_more(out, 5)
    assert {r["by"] for r in read_out(out)} == {"v1"}
    assert env.flow("counter")["stale"] is True
    resumed = env.daemon.cli("resume", "counter").stdout
    assert "published v2: done" in resumed
    env.wait_by(out, "v2")
    assert _status(env)["paused"]["flow"] == []
    events = json.loads(env.daemon.cli("history", "--flow", "counter", "--json").stdout)
    kinds = [e["kind"] for e in events]
    assert "flow.paused" in kinds and "flow.resumed" in kinds and "deploy.paused" in kinds


def test_paused_component_records_pushes_and_resume_builds_the_head(
    make_env: Callable[..., FlowEnv],
) -> None:
    env = make_env()
    env.daemon.cli("pause", "hello")
    sha = env.work.commit(
        "while paused", {"lib/upper.py": "def process(msg, cfg):\n    return {}\n"}
    )
    env.work.push(env.daemon.hosted("hello"))
    # Waited for on the state database (a CLI call per poll round starves the daemon), then
    # read through the CLI's history, as before.
    sql = "SELECT 1 FROM events WHERE kind = 'push.paused' AND sha = ?"
    wait_until(lambda: db_rows(env.daemon.state_dir, sql, sha), timeout=30)
    history = json.loads(env.daemon.cli("history", "--component", "hello", "--json").stdout)
    assert any(e["kind"] == "push.paused" and e["sha"] == sha for e in history)
    assert env.daemon.recent_sha("hello") != sha
    assert _status(env)["paused"]["component"] == ["hello"]
    line = env.daemon.cli("resume", "hello").stdout
    assert "1 build(s) queued" in line
    env.daemon.wait_recent("hello", sha)


def test_redeploy_rebuilds_a_failed_commit_and_reannounces_a_version(
    make_env: Callable[..., FlowEnv],
) -> None:
    env = make_env()
    # A build that failed for a reason outside the commit (here: a marker file) is retried.
    marker = env.tmp / "allow-build"
    desc = {**counter_files()["component.json"], "build": f"test -e {marker}"}
    sha = env.work.commit("needs marker", {"component.json": desc})
    env.work.push(env.daemon.hosted("hello"))
    build = env.daemon.wait_build("hello", sha)
    assert build["status"] == "failed"
    marker.write_text("ok")
    assert "build queued" in env.daemon.cli("redeploy", "hello", "--sha", sha).stdout
    env.daemon.wait_recent("hello", sha)
    again = env.daemon.cli("redeploy", "hello").stdout
    assert "redeploying to its flows" in again
    bad = env.daemon.cli("redeploy", "hello", "--sha", "nope", check=False)
    assert bad.returncode != 0 and "not a full commit sha" in bad.stderr
    unknown = env.daemon.cli("redeploy", "ghost", check=False)
    assert unknown.returncode != 0 and "unknown component 'ghost'" in unknown.stderr


def test_gc_keeps_what_flows_use_and_prunes_the_rest(make_env: Callable[..., FlowEnv]) -> None:
    env = make_env(keep_versions=1, gc_interval="0")
    out = env.counter("counter", update="manual")  # stays on v1 while newer versions come
    versions = env.daemon.state_dir / "versions" / "hello"
    for tag in ("v2", "v3", "v4"):
        env.push(counter_files(tag, **{"lib/write.py": writer(tag)}))
    assert sorted(p.name for p in versions.iterdir()) == ["1", "2", "3", "4"]
    res = json.loads(env.daemon.cli("gc", "--json").stdout)
    # v1 runs in the flow, v4 is the newest (keep_versions = 1); the draft holds v4.
    assert sorted(res["versions_pruned"]) == ["hello v2", "hello v3"]
    assert sorted(p.name for p in versions.iterdir()) == ["1", "4"]
    assert res["state_dir_bytes"] > 0
    assert _status(env)["disk"]["state_dir_bytes"] == res["state_dir_bytes"]
    env.wait_more(out, 3)  # the flow never noticed
    # A pruned version cannot be run again, and says why.
    pinned = env.write_flow(
        flow_toml(
            "old",
            out,
            steps=[
                {"id": "t", "component": "hello", "function": "ticker", "version": 2},
                {"id": "w", "component": "hello", "function": "write", "config": {"out": out}},
            ],
        ),
        "old",
    )
    refused = env.daemon.cli("flow", "apply", str(pinned), check=False)
    assert refused.returncode != 0
    assert "removed by retention" in refused.stdout + refused.stderr


def test_status_shows_the_last_error_of_each_part(
    make_env: Callable[..., FlowEnv], tmp_path: Path
) -> None:
    env = make_env()
    sha = env.work.commit("broken", {"component.json": "{not json"})
    env.work.push(env.daemon.hosted("hello"))
    env.daemon.wait_build("hello", sha)
    errors = _status(env)["last_errors"]
    assert errors["builds"] is not None and "not valid JSON" in errors["builds"]["message"]
    assert errors["deploys"] is None
    text = env.daemon.cli("status").stdout
    assert "last build error" in text


def test_metrics_count_flow_deployments_messages_and_queues(
    make_env: Callable[..., FlowEnv],
) -> None:

    env = make_env()
    out = env.counter("counter")
    env.push(counter_files("v2", **{"lib/write.py": writer("v2")}))
    env.wait_by(out, "v2")
    # The new version's steps write before the publish that started them has finished
    # recording itself (and counting the deployment): wait for that, not only the output.
    env.wait_deploy("counter", 2)

    def metrics() -> str:
        return HTTP.get(env.daemon.url + "/metrics", timeout=5).text

    text = metrics()
    assert 'deployd_deployments_total{flow="counter",status="done"} 2.0' in text
    assert 'deployd_switch_gap_seconds_count{flow="counter"} 1.0' in text
    assert 'deployd_warmup_seconds_count{flow="counter"} 2.0' in text
    assert 'deployd_flows{state="running"} 1.0' in text
    assert 'deployd_messages_processed_total{flow="counter",step="write"}' in text
