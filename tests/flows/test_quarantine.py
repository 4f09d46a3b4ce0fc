"""Quarantine of versions that failed (issue 16, section 4), end to end with real pushes.

A component version whose automatic publish failed its warm-up or was rolled back is never
tried again for that flow automatically — not by `deployd redeploy`, not by the catch-up of
a restarted daemon — while a newer version is tried as usual, and `deployd flow publish NAME
--version COMPONENT@N` still publishes it on purpose (which, once live, lifts the quarantine).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tests.conftest import db_rows, wait_until
from tests.flows.conftest import FlowEnv, assert_contiguous, counter_files, read_out, writer


def needs_flag(tag: str, flag: Path) -> str:
    """A writer that fails at import while `flag` does not exist (an outside condition: the
    same code warms up once the condition is met)."""
    extra = f"if not os.path.exists({str(flag)!r}):\n    raise RuntimeError('flag missing')"
    return writer(tag, extra=extra)


def quarantine_rows(env: FlowEnv) -> list[dict[str, Any]]:
    return db_rows(env.daemon.state_dir, "SELECT * FROM quarantine ORDER BY component, version")


def test_a_quarantined_version_is_not_retried_after_restart_and_is_deployable_on_purpose(
    env: FlowEnv, tmp_path: Path
) -> None:
    out = env.counter()
    flag = tmp_path / "flag"
    sha2 = env.push(counter_files("v2", **{"lib/write.py": needs_flag("v2", flag)}))
    dep = env.wait_deploy("counter", 2)
    assert dep["status"] == "failed" and "flag missing" in dep["reason"]

    rows = wait_until(lambda: quarantine_rows(env), timeout=30)
    assert [(r["flow"], r["component"], r["version"]) for r in rows] == [("counter", "hello", 2)]
    assert rows[0]["reason"].startswith("warm-up failed:") and "flag missing" in rows[0]["reason"]
    flow = env.flow("counter")
    assert [(q["component"], q["version"]) for q in flow["quarantined"]] == [("hello", 2)]
    assert "flag missing" in flow["quarantined"][0]["reason"]
    shown = env.daemon.cli("flow", "show", "counter").stdout
    assert "quarantined: hello v2" in shown and "--version hello@2" in shown
    assert "quarantined: hello v2" in env.daemon.cli("status").stdout

    # The condition is met now, but nothing automatic tries v2 again: not `deployd redeploy`…
    flag.write_text("ok")
    deployments = len(env.deploys())
    env.daemon.cli("redeploy", "hello", "--sha", sha2)
    wait_until(
        lambda: db_rows(
            env.daemon.state_dir,
            "SELECT 1 FROM events WHERE kind = 'deploy.skipped' AND flow = 'counter'",
        ),
        timeout=30,
    )
    # …nor the catch-up of a restarted daemon.
    env.daemon.stop()
    assert json.loads(env.daemon.cli("status", "--json").stdout)["flows"][0]["quarantined"]
    env.daemon.start()
    wait_until(lambda: env.flow("counter")["state"] == "running", timeout=60)
    env.wait_more(out, 3)
    assert len(env.deploys()) == deployments
    assert env.flow("counter")["version"] == 1

    # A newer version is tried as usual.
    env.push(counter_files("v3"), message="v3")
    assert env.wait_deploy("counter", 3)["status"] == "done"
    env.wait_by(out, "v3")

    # On purpose: published (the flag exists now), and the quarantine is lifted.
    res = json.loads(
        env.daemon.cli("flow", "publish", "counter", "--version", "hello@2", "--json").stdout
    )
    assert res["status"] == "done" and res["version"] == 4
    env.wait_by(out, "v2")
    assert quarantine_rows(env) == []
    assert env.flow("counter")["quarantined"] == []
    deps = env.deploys()
    assert deps[0]["trigger"] == "flow publish" and deps[0]["component_version"] == 2
    history = json.loads(env.daemon.cli("history", "--flow", "counter", "--json").stdout)
    lifted = [e for e in history if e["kind"] == "quarantine.lifted"]
    assert lifted and "no longer quarantined" in lifted[0]["message"]
    assert_contiguous(read_out(out))


def test_a_rolled_back_version_is_quarantined(make_env: Any) -> None:
    env: FlowEnv = make_env(rollback_window="30s", rollback_exits=2)
    env.counter()
    crash = "def process(msg, cfg):\n    os._exit(1)"
    env.push(
        counter_files(
            "v2", **{"lib/write.py": writer("v2").replace("def process(msg, cfg):", crash)}
        )
    )
    env.wait_deploys(lambda ds: ds[0]["status"] == "rolled_back", timeout=60)
    rows = wait_until(lambda: quarantine_rows(env), timeout=30)
    assert [(r["component"], r["version"]) for r in rows] == [("hello", 2)]
    assert rows[0]["reason"].startswith("rolled back:")


def test_publish_version_refuses_what_it_cannot_publish(env: FlowEnv) -> None:
    env.counter()
    bad = env.daemon.cli("flow", "publish", "counter", "--version", "hello", check=False)
    assert bad.returncode == 2 and "COMPONENT@N" in bad.stderr
    missing = env.daemon.cli("flow", "publish", "counter", "--version", "hello@9", check=False)
    assert missing.returncode == 1 and "hello has no version 9" in missing.stderr
    other = env.daemon.cli("flow", "publish", "counter", "--version", "nope@1", check=False)
    assert other.returncode == 1 and "unknown component 'nope'" in other.stderr
