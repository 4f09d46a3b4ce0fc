"""The flow commands end to end: apply's checks, stop/start with the trigger's hooks,
rollback, history, deploys, the API token, and the CLI with the daemon down."""

from __future__ import annotations

import json
from typing import Any

from tests.conftest import HTTP, wait_until
from tests.flows.conftest import (
    TICKER,
    FlowEnv,
    assert_contiguous,
    counter_files,
    flow_toml,
    read_out,
    writer,
)

HOOKED_TICKER = (
    TICKER
    + """
import json


def startup(cfg):
    with open(cfg["hooks"], "a") as fh:
        fh.write(json.dumps({"hook": "startup"}) + "\\n")
    return {"token": "from-startup"}


def shutdown(cfg, data):
    with open(cfg["hooks"], "a") as fh:
        fh.write(json.dumps({"hook": "shutdown", "data": data}) + "\\n")
"""
)


def _apply_error(env: FlowEnv, text: str) -> str:
    res = env.apply(text, check=False)
    assert res.returncode != 0, res.stdout
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr  # one line, no traceback
    return lines[0]


def test_apply_refuses_bad_flow_files_with_a_clear_error_and_creates_nothing(
    env: FlowEnv,
) -> None:
    out = env.out()
    good = flow_toml("bad", out)
    tick = {"id": "tick", "component": "hello", "function": "ticker"}
    write = {"id": "write", "component": "hello", "function": "write", "config": {"out": out}}
    cases: list[tuple[str, str]] = [
        (
            flow_toml("bad", out, steps=[tick, {**write, "mapping": '{"text": $uppercase(text'}]),
            "steps[1].mapping: mapping is not valid JSONata",
        ),
        (
            flow_toml("bad", out, steps=[tick, {**write, "component": "nope"}]),
            "step write: unknown component 'nope' (known: hello)",
        ),
        (
            flow_toml("bad", out, steps=[tick, {**write, "function": "nosuch"}]),
            'step write: action "nosuch"',
        ),
        (
            flow_toml("bad", out, steps=[tick, {**write, "function": "ticker"}]),
            "step write: 'ticker' is not an action of hello v1 (it is one of its triggers;"
            " only the first step must be a trigger)",
        ),
        (
            flow_toml("bad", out, steps=[tick, {**write, "id": "tick"}]),
            "step id 'tick' is used twice",
        ),
        (flow_toml("bad", out, interval="soon"), "steps[0].interval:"),
        (flow_toml("bad", out, interval="-1s"), "steps[0].interval:"),
        (
            flow_toml("bad", out, steps=[tick, {**write, "config": {}}]),
            "step write: field 'out' is required by hello v1 but has no value in config",
        ),
        (flow_toml("bad", out, steps=[tick]), "a flow needs a trigger step and at least one"),
        (good + "colour = 'red'\n", "colour: unknown key"),
        (good.replace('name = "bad"', 'name = "Bad Name"'), "name: 'Bad Name' is not a valid"),
        (good + "[[steps\n", "is not valid TOML"),
    ]
    for text, expected in cases:
        line = _apply_error(env, text)
        assert line.startswith("deployd: error: ") and expected in line, (expected, line)

    # The daemon makes the same checks when the client does not (the API directly).
    token = (env.daemon.state_dir / "api-token").read_text().strip()
    resp = HTTP.post(
        env.daemon.url + "/api/v1/flows/apply",
        json={"text": cases[0][0]},
        headers={"Authorization": f"Bearer {token}"},
    )
    assert resp.status_code == 400 and "not valid JSONata" in resp.json()["detail"]

    assert env.daemon.status()["flows"] == []
    assert json.loads(env.daemon.cli("flow", "list", "--json").stdout) == []
    assert env.deploys() == []
    assert not out.exists()


def test_stop_start_rollback_history_and_deploys(make_env: Any) -> None:
    env: FlowEnv = make_env(counter_files(**{"lib/ticker.py": HOOKED_TICKER}))
    out, hooks = env.out("counter"), env.tmp / "hooks.jsonl"
    text = flow_toml(
        "counter",
        out,
        steps=[
            {
                "id": "tick",
                "component": "hello",
                "function": "ticker",
                "interval": "30ms",
                "config": {"hooks": hooks},
            },
            {"id": "write", "component": "hello", "function": "write", "config": {"out": out}},
        ],
    )
    env.apply(text)
    env.wait_by(out, "v1", 3)
    assert read_out(hooks) == [{"hook": "startup"}]

    pids = [s["pid"] for s in env.flow("counter")["steps"]]
    res = env.daemon.cli("flow", "stop", "counter")
    assert res.stdout.strip() == "counter: stopped"
    assert read_out(hooks)[-1] == {"hook": "shutdown", "data": {"token": "from-startup"}}
    flow = env.flow("counter")
    assert flow["state"] == "stopped" and all(s["pid"] is None for s in flow["steps"])
    assert {s["state"] for s in flow["steps"]} == {"stopped"}
    stopped_at = len(read_out(out))

    # A stopped flow is left alone by the automatic redeploy.
    env.push(counter_files("v2", **{"lib/ticker.py": HOOKED_TICKER}))
    flow = wait_until(lambda: (f := env.flow("counter"))["stale"] and f, timeout=30)
    assert flow["version"] == 1 and flow["state"] == "stopped"

    res = env.daemon.cli("flow", "start", "counter")
    assert res.stdout.strip() == "counter: running v1"
    env.wait_more(out, 3)
    assert read_out(hooks)[-1] == {"hook": "startup"} and len(read_out(hooks)) == 3
    flow = env.flow("counter")
    assert flow["state"] == "running" and flow["version"] == 1 and flow["stale"]
    assert {s["pid"] for s in flow["steps"]}.isdisjoint(pids)
    rows = read_out(out)
    assert {r["by"] for r in rows} == {"v1"} and len(rows) > stopped_at
    assert_contiguous(rows)  # the snapshot carried the count across stop and start

    # Re-applying the file makes a draft at the recent versions and publishes it.
    env.apply(text)
    env.wait_by(out, "v2", 2)
    assert env.flow("counter")["version"] == 2
    assert len(read_out(hooks)) == 3  # a republish is not a flow start: no startup()

    res = env.daemon.cli("flow", "rollback", "counter")
    assert res.stdout.startswith("counter v3: done")
    wait_until(lambda: read_out(out)[-1]["by"] == "v1", timeout=30)
    flow = env.flow("counter")
    assert flow["version"] == 3 and [s["version"] for s in flow["steps"]] == [1, 1]
    assert_contiguous(read_out(out))

    bad = env.daemon.cli("flow", "rollback", "counter", "--to", "9", check=False)
    assert bad.returncode == 1 and "has no version 9" in bad.stderr
    same = env.daemon.cli("flow", "rollback", "counter", "--to", "3", check=False)
    assert same.returncode == 1 and "already runs version 3" in same.stderr

    history = json.loads(env.daemon.cli("flow", "history", "counter", "--json").stdout)
    assert [v["version"] for v in history["versions"]] == [3, 2, 1]
    assert history["versions"][0]["reason"] == "rollback to v1"
    assert [s["version"] for s in history["versions"][1]["steps"]] == [2, 2]
    deps = env.deploys()
    assert deps == history["deployments"]
    assert [(d["from_version"], d["to_version"], d["trigger"], d["status"]) for d in deps] == [
        (2, 3, "flow rollback", "done"),
        (1, 2, "flow apply", "done"),
        (None, 1, "flow apply", "done"),
    ]
    for d in deps:
        assert d["warmup_ms"] > 0 and d["finished_at"] >= d["started_at"]
    assert deps[0]["gap_ms"] is not None and deps[2]["gap_ms"] is None
    text_out = env.daemon.cli("flow", "history", "counter").stdout
    assert "v3  " in text_out and "rollback to v1  [tick=hello v1, write=hello v1]" in text_out


def test_mutating_api_needs_the_token_and_the_cli_says_when_the_daemon_is_down(
    env: FlowEnv,
) -> None:
    out = env.counter()
    base = env.daemon.url + "/api/v1/flows"
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        for method, path, body in (
            ("POST", "/apply", {"text": flow_toml("x", out)}),
            ("POST", "/counter/stop", None),
            ("POST", "/counter/publish", None),
            ("POST", "/counter/rollback", {"to": 1}),
            ("POST", "/counter/start", None),
        ):
            resp = HTTP.request(method, base + path, json=body, headers=headers)
            assert resp.status_code == 401, (path, resp.text)
            assert resp.headers["www-authenticate"] == "Bearer"
    assert env.flow("counter")["state"] == "running"  # none of that did anything
    unknown = env.daemon.cli("flow", "stop", "nope", check=False)
    assert unknown.returncode == 1 and "unknown flow 'nope'" in unknown.stderr

    assert env.daemon.stop() == 0
    for args in (
        ("flow", "stop", "counter"),
        ("flow", "apply", str(env.write_flow(flow_toml("y", out), "y"))),
    ):
        res = env.daemon.cli(*args, check=False)
        assert res.returncode == 1, res
        [line] = res.stderr.strip().splitlines()
        assert "the daemon is not running" in line
    # Reading works without the daemon.
    shown = env.show("counter")
    assert shown["state"] == "stopped" and shown["version"] == 1
    assert env.deploys()[0]["status"] == "done"
    assert "counter" in env.daemon.cli("flow", "list").stdout


def test_several_flows_using_one_component_redeploy_together(env: FlowEnv) -> None:
    outs = [env.counter(f"flow{i}") for i in range(3)]
    env.push(counter_files("v2", **{"lib/write.py": writer("v2")}))
    for out in outs:
        env.wait_by(out, "v2", 2)
        assert_contiguous(read_out(out))
    deps = [env.wait_deploy(f"flow{i}", 2) for i in range(3)]
    assert {d["status"] for d in deps} == {"done"}
    # Concurrent: every deployment started before the first one finished.
    assert max(d["started_at"] for d in deps) <= min(d["finished_at"] for d in deps)
