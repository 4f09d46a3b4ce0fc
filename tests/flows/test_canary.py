"""Canary publishes (issue 16, section 3), end to end: a real daemon, real step processes, real
pushes.

The counter flow's trigger is pinned to hello v1, so a push changes only its `write` action:
with [canary], the new `write` handles a share of the messages beside the old one. Every
line of the out file is tagged with the code version that wrote it, so the file says which
version handled each message n — and, n being 1..N exactly once over the out file and the
dead letters, that nothing was lost or handled twice.
"""

from __future__ import annotations

import itertools
import json
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from deployd import config as cfgmod
from deployd.errors import FlowError
from deployd.flows import canary, model
from deployd.flows.drafts import Drafts
from deployd.store import Store
from deployd.types import CanaryCount, CanaryTally
from tests.conftest import HTTP, db_rows, dead_letter_rows, wait_until
from tests.flows.conftest import FlowEnv, counter_files, flow_toml, read_out, writer

FAILING = writer("v2").replace(
    "def process(msg, cfg):", "def process(msg, cfg):\n    raise ValueError('v2 is broken')"
)


def canary_flow(
    env: FlowEnv,
    *,
    share: float = 0.25,
    duration: str = "2s",
    min_messages: int = 5,
    max_error_rate: float = 0.1,
    pin_trigger: bool = True,
    interval: str = "40ms",
) -> str:
    """The counter flow (tick → write) with a [canary]; its trigger pinned to hello v1."""
    out = env.out("counter")
    tick: dict[str, Any] = {
        "id": "tick",
        "component": "hello",
        "function": "ticker",
        "interval": interval,
    }
    if pin_trigger:
        tick["version"] = 1
    write = {"id": "write", "component": "hello", "function": "write", "config": {"out": out}}
    return flow_toml("counter", out, steps=[tick, write]) + (
        f'[canary]\nshare = {share}\nduration = "{duration}"\n'
        f"min_messages = {min_messages}\nmax_error_rate = {max_error_rate}\n"
    )


def start(env: FlowEnv, **kw: Any) -> Path:
    out = env.out("counter")
    env.apply(canary_flow(env, **kw))
    wait_until(lambda: read_out(out), timeout=30)
    return out


def deployments(env: FlowEnv) -> list[dict[str, Any]]:
    rows = db_rows(env.daemon.state_dir, "SELECT * FROM deployments ORDER BY id")
    for row in rows:
        row["canary"] = json.loads(row["canary"]) if row["canary"] else None
    return rows


def wait_status(env: FlowEnv, version: int, status: str, timeout: float = 60) -> dict[str, Any]:
    """The deployment to `version` once it has `status` and is finished."""
    return dict(
        wait_until(
            lambda: next(
                (
                    d
                    for d in deployments(env)
                    if d["to_version"] == version and d["status"] == status and d["finished_at"]
                ),
                None,
            ),
            timeout=timeout,
        )
    )


def in_canary(env: FlowEnv, version: int) -> dict[str, Any]:
    """The flow's canary object in the status once v`version` is in canary."""
    return dict(
        wait_until(
            lambda: (c := env.flow("counter")["canary"]) and c["version"] == version and c,
            timeout=60,
        )
    )


def handled_once(out: Path, env: FlowEnv) -> dict[int, str]:
    """n → the version that handled it (a dead letter: "<tag>!"), asserting that no n was
    handled twice and (once what is still queued is handled) that the n are exactly 1..N over
    the out file and the dead letters."""

    def seen() -> dict[int, str]:
        by: dict[int, str] = {}
        for row in read_out(out):
            n = row["n"]
            assert n not in by, f"n={n} handled twice ({by[n]}, {row['by']})"
            by[n] = row["by"]
        for letter in dead_letter_rows(env.daemon.state_dir, "counter"):
            n = letter["body"]["n"]
            assert n not in by, f"n={n} both handled ({by[n]}) and a dead letter"
            by[n] = f"v{letter['component_version']}!"
        return by

    return dict(
        wait_until(lambda: (by := seen()) and sorted(by) == list(range(1, len(by) + 1)) and by)
    )


def idempotent(tag: str) -> str:
    """A writer that skips a message it finds in the out file already (by its id): a message
    redelivered after a kill -9 (handled, not yet committed) is written once."""
    return textwrap.dedent(
        f"""\
        import json, os
        TAG = {tag!r}
        seen = set()


        def init(cfg):
            if os.path.exists(cfg["out"]):
                with open(cfg["out"]) as fh:
                    for line in fh:
                        try:
                            seen.add(json.loads(line)["id"])
                        except (ValueError, KeyError):
                            pass


        def process(msg, cfg):
            if msg["id"] in seen:
                return None
            line = {{**msg["body"], "by": TAG, "id": msg["id"]}}
            with open(cfg["out"], "a") as fh:
                fh.write(json.dumps(line) + "\\n")
            seen.add(msg["id"])
            return line
        """
    )


def token(env: FlowEnv) -> str:
    return (env.daemon.state_dir / "api-token").read_text().strip()


# -- the [canary] table ---------------------------------------------------------------------

BASE: dict[str, Any] = {
    "name": "c",
    "steps": [
        {"id": "t", "component": "hello", "function": "ticker"},
        {"id": "w", "component": "hello", "function": "write"},
    ],
}


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"share": 0}, "canary.share: 0 is not a share: it must be above 0 and below 1"),
        ({"share": 1}, "canary.share: 1 is not a share"),
        ({"share": "0.1"}, "canary.share: must be a number"),
        ({"duration": "5 minutes"}, "canary.duration: '5 minutes' is not a duration"),
        ({"min_messages": -1}, "canary.min_messages: -1 is not a number of messages"),
        ({"min_messages": 2.5}, "canary.min_messages: 2.5 is not a number of messages"),
        ({"max_error_rate": 1.5}, "canary.max_error_rate: 1.5 is not an error rate"),
        ({"max_error_rate": True}, "canary.max_error_rate: must be a number"),
        ({"shares": 0.1}, "canary.shares: unknown key"),
    ],
)
def test_bad_canary_values_are_refused_naming_the_key(table: dict[str, Any], message: str) -> None:
    with pytest.raises(FlowError) as info:
        model.parse({**BASE, "canary": table})
    assert message in str(info.value)


def test_the_canary_table_has_defaults_and_is_for_real_time_flows_on_embedded(
    tmp_path: Path,
) -> None:
    spec = model.parse({**BASE, "canary": {"share": 0.5}})
    assert spec.canary is not None
    assert (spec.canary.share, spec.canary.duration) == (0.5, 300.0)
    assert (spec.canary.min_messages, spec.canary.max_error_rate) == (100, 0.01)
    with pytest.raises(FlowError, match="canary: only for real-time flows"):
        model.parse({**BASE, "type": "ordinary", "every": "30s", "canary": {}})
    raw = {
        "daemon": {"state_dir": str(tmp_path / "var")},
        "runtime": {"default": "rabbitmq", "rabbitmq": {"url": "amqp://localhost/"}},
        "components": [{"name": "hello"}],
    }
    drafts = Drafts(cfgmod.parse(raw, tmp_path), Store.open(tmp_path / "state.db"))
    text = '[canary]\nshare = 0.5\n[[steps]]\nid = "t"\ncomponent = "hello"\nfunction = "a"\n'
    text = 'name = "c"\n' + text + '[[steps]]\nid = "w"\ncomponent = "hello"\nfunction = "b"\n'
    with pytest.raises(FlowError) as info:
        drafts.parse(text)
    assert "canary publishes run on the embedded runtime only" in str(info.value)
    assert "would run on rabbitmq" in str(info.value)
    assert drafts.parse('runtime = "embedded"\n' + text).canary is not None


def test_what_is_a_canary_and_how_it_is_judged() -> None:
    step = {"id": "w", "kind": "action", "component": "hello", "function": "write", "version": 1}
    step["pinned"] = False
    trigger = {**step, "id": "t", "kind": "trigger", "function": "ticker"}
    old = [trigger, step]
    spec = {"canary": {"share": 0.1, "duration": 60.0, "min_messages": 10, "max_error_rate": 0.01}}
    plan, why = canary.plan(spec, spec, old, [trigger, {**step, "version": 2}])
    assert plan is not None and plan.steps == ("w",) and why == ""
    assert canary.plan({}, spec, old, old) == (None, "")
    _, why = canary.plan(spec, spec, old, [{**trigger, "version": 2}, {**step, "version": 2}])
    assert why == "the trigger t changed (one trigger runs at a time)"
    assert canary.plan(spec, spec, old, old)[1] == "no action step changed"
    # a step stored before a key existed runs the same as one with its default
    assert canary.plan(spec, spec, old, [{**trigger, "replicas": 1}, step])[1] == (
        "no action step changed"
    )
    assert canary.plan(spec, spec, old, [trigger])[1] == "steps were added, removed or reordered"
    assert canary.plan(spec, None, None, old)[1] == "nothing runs yet to compare it with"
    moved = {**spec, "variables": {"A": "b"}}
    assert canary.plan(moved, spec, old, [trigger, {**step, "version": 2}])[1].startswith(
        "flow variables changed"
    )

    settings = canary.Settings(0.1, 60.0, 10, 0.01)

    def judge(new: tuple[int, int], old: tuple[int, int]) -> bool:
        return canary.verdict(settings, CanaryTally(CanaryCount(*new), CanaryCount(*old)))[0]

    assert judge((100, 1), (900, 0))  # exactly 1%: at most max_error_rate
    assert not judge((100, 2), (900, 9))  # 2% > 1%
    assert judge((0, 0), (0, 0))
    assert not judge((10, 1), (10, 1))  # 10% > 1%, however the old version does
    _, why = canary.verdict(settings, CanaryTally(CanaryCount(50, 3), CanaryCount(150, 1)))
    assert (
        why
        == "error rate 3/50 (6%) is above max_error_rate 1% (new 3/50 (6%), old 1/150 (0.6667%))"
    )


# -- end to end -----------------------------------------------------------------------------


def test_a_canary_takes_its_share_by_count_and_is_promoted(env: FlowEnv) -> None:
    out = start(env, share=0.25, duration="2s", min_messages=8)
    env.push(counter_files("v2"))
    c = in_canary(env, 2)
    assert (c["from_version"], c["share"], c["steps"], c["min_messages"]) == (1, 0.25, ["write"], 8)
    assert c["running"] is True and 0 <= c["time_left"] <= 2
    assert env.flow("counter")["version"] == 1  # the old version stays active meanwhile

    dep = wait_status(env, 2, "promoted")
    env.wait_more(out, 5)
    flow = env.flow("counter")
    assert flow["version"] == 2 and flow["canary"] is None and flow["state"] == "running"
    assert [s["version"] for s in flow["steps"]] == [1, 2]
    record = dep["canary"]
    assert record["outcome"] == "promoted" and record["ended"] == "judged"
    assert record["new"]["messages"] >= 8 and record["new"]["errors"] == 0
    assert dep["reason"].startswith("error rate 0/")

    by = handled_once(out, env)
    last_v1 = max(n for n, tag in by.items() if tag == "v1")
    during = sorted(n for n, tag in by.items() if tag == "v2" and n < last_v1)
    assert len(during) >= 5
    # Deterministic: of the messages queued for `write` during the canary, every 4th went to
    # the new version, the others to the old one.
    assert {b - a for a, b in itertools.pairwise(during)} == {4}
    window = range(during[0], during[-1] + 1)
    assert [by[n] for n in window] == ["v2" if (n - during[0]) % 4 == 0 else "v1" for n in window]
    assert all(tag == "v2" for n, tag in by.items() if n > last_v1)  # then all of them


def test_a_failing_canary_is_rolled_back_and_the_old_version_keeps_running(
    env: FlowEnv,
) -> None:
    out = start(env, share=0.5, duration="2s", min_messages=4, max_error_rate=0.05)
    env.push(counter_files("v2", **{"lib/write.py": FAILING}))
    in_canary(env, 2)
    dep = wait_status(env, 2, "rolled_back")
    assert "error rate" in dep["reason"] and "above max_error_rate 5%" in dep["reason"]
    assert dep["canary"]["new"]["errors"] == dep["canary"]["new"]["messages"] >= 4
    assert dep["canary"]["old"]["errors"] == 0
    env.wait_more(out, 5)
    flow = env.flow("counter")
    assert flow["version"] == 1 and flow["canary"] is None
    assert flow["needs_attention"].startswith("canary v2 rolled back: error rate")
    assert [(q["component"], q["version"]) for q in flow["quarantined"]] == [("hello", 2)]

    by = handled_once(out, env)  # each message: handled by v1, or a dead letter of v2
    assert {tag for tag in by.values()} == {"v1", "v2!"}
    failed = sorted(n for n, tag in by.items() if tag == "v2!")
    assert len(failed) >= 4 and all((n - failed[0]) % 2 == 0 for n in failed)  # every 2nd
    assert all(by[n] == "v1" for n in range(failed[-1] + 1, max(by) + 1))
    history = json.loads(env.daemon.cli("history", "--flow", "counter", "--json").stdout)
    assert any(e["kind"] == "deploy.rolled_back" for e in history)


def test_a_crash_looping_canary_is_rolled_back_before_its_time(
    make_env: Callable[..., FlowEnv],
) -> None:
    env = make_env(rollback_window="30s", rollback_exits=3)
    out = start(env, share=0.5, duration="10m", min_messages=1000)
    crash = "def process(msg, cfg):\n    os._exit(1)"
    env.push(
        counter_files(
            "v2", **{"lib/write.py": writer("v2").replace("def process(msg, cfg):", crash)}
        )
    )
    in_canary(env, 2)
    dep = wait_status(env, 2, "rolled_back")
    assert dep["canary"]["ended"] == "crash-looped"
    assert "3 step exits within 30s" in dep["reason"]
    env.wait_more(out, 5)
    flow = env.flow("counter")
    assert flow["version"] == 1 and flow["needs_attention"].startswith("canary v2 rolled back")
    # What the crashing version never finished went back to the old one: nothing lost.
    by = handled_once(out, env)
    assert set(by.values()) == {"v1"}


def test_a_canary_is_ended_by_hand_and_shown_while_it_runs(env: FlowEnv) -> None:
    out = start(env, share=0.5, duration="10m", min_messages=1000)
    no = env.daemon.cli("flow", "promote", "counter", check=False)
    assert no.returncode == 1 and "Traceback" not in no.stderr
    assert "flow counter has no canary in progress" in no.stderr
    url = env.daemon.url + "/api/v1/flows/counter/canary/promote"
    assert HTTP.post(url, timeout=10).status_code == 401
    auth = {"Authorization": f"Bearer {token(env)}"}
    res = HTTP.post(url, headers=auth, timeout=10)
    assert res.status_code == 409 and "no canary in progress" in res.json()["detail"]

    env.push(counter_files("v2"))
    in_canary(env, 2)
    env.wait_by(out, "v2", 3)
    c = env.flow("counter")["canary"]
    assert c["time_left"] > 500 and c["messages_left"] > 0
    assert c["new"]["messages"] >= 3 and c["new"]["error_rate"] == 0.0
    assert c["old"]["messages"] >= 3
    assert [s["id"] for s in c["new_steps"]] == ["write"] and c["new_steps"][0]["pid"]
    shown = env.daemon.cli("flow", "show", "counter").stdout
    assert "canary v2 (from v1): 50% of write; new " in shown and "m left" in shown
    status = env.daemon.cli("status").stdout
    assert "canary v2 (50%)" in status and "flow counter: canary v2 (from v1)" in status
    assert json.loads(env.daemon.cli("flow", "show", "counter", "--json").stdout)["canary"]
    got = HTTP.get(env.daemon.url + "/api/v1/flows/counter/canary", headers=auth, timeout=10)
    assert got.json()["version"] == 2

    promoted = env.daemon.cli("flow", "promote", "counter")
    assert "counter v2: promoted" in promoted.stdout and "promoted by hand" in promoted.stdout
    env.wait_by(out, "v2", 10)
    dep = wait_status(env, 2, "promoted")
    assert dep["canary"]["ended"] == "by hand"
    assert env.flow("counter")["version"] == 2

    # The next one is rolled back by hand (the API's endpoint): v2 keeps running.
    env.push(counter_files("v3"), message="v3")
    in_canary(env, 3)
    env.wait_by(out, "v3", 2)
    res = HTTP.post(env.daemon.url + "/api/v1/flows/counter/canary/rollback", headers=auth)
    assert res.status_code == 200 and res.json()["status"] == "rolled_back"
    dep = wait_status(env, 3, "rolled_back")
    assert dep["canary"]["ended"] == "by hand" and "rolled back by hand" in dep["reason"]
    env.wait_more(out, 5)
    flow = env.flow("counter")
    assert flow["version"] == 2 and flow["canary"] is None and flow["needs_attention"] is None
    assert flow["quarantined"][0]["version"] == 3  # an automatic publish, found wanting
    by = handled_once(out, env)
    after = [tag for n, tag in sorted(by.items())][-5:]
    assert after == ["v2"] * 5

    # `flow rollback` without a canary keeps its meaning: publish the version before.
    again = env.daemon.cli("flow", "rollback", "counter", "--json")
    assert json.loads(again.stdout)["status"] == "done"


def test_a_changed_trigger_publishes_at_once(env: FlowEnv) -> None:
    out = start(env, pin_trigger=False, duration="10m")
    env.push(counter_files("v2"))
    dep = env.wait_deploy("counter", 2)
    assert dep["status"] == "done" and dep["canary"] is None
    env.wait_by(out, "v2", 3)
    assert env.flow("counter")["canary"] is None
    history = json.loads(env.daemon.cli("history", "--flow", "counter", "--json").stdout)
    started = [e["message"] for e in history if e["kind"] == "deploy.started"]
    assert (
        "at once, no canary: the trigger tick changed (one trigger runs at a time)" in (started[0])
    )
    handled_once(out, env)


def test_a_kill_during_a_canary_converges_on_the_old_version_then_tries_again(
    make_env: Callable[..., FlowEnv],
) -> None:
    env = make_env(counter_files("v1", **{"lib/write.py": idempotent("v1")}))
    out = start(env, share=0.5, duration="10m", min_messages=1000, interval="20ms")
    env.push(counter_files("v2", **{"lib/write.py": idempotent("v2")}))
    in_canary(env, 2)
    env.wait_by(out, "v2", 5)
    env.daemon.kill()
    env.daemon.start()

    first = wait_status(env, 2, "rolled_back")
    assert first["interrupted"] == 1 and first["reason"].startswith("interrupted: the daemon")
    assert first["canary"]["ended"] == "interrupted"
    # The catch-up at start tries the automatic publish again: a new canary, from the start.
    c = in_canary(env, 3)
    assert c["from_version"] == 1 and c["time_left"] > 500
    assert env.flow("counter")["version"] == 1
    env.wait_by(out, "v2", 8)
    # A daemon stopped (SIGTERM) during a canary keeps the old version the same way.
    env.daemon.stop()
    second = wait_status(env, 3, "rolled_back")
    assert second["interrupted"] == 1 and second["canary"]["ended"] == "interrupted"
    assert second["canary"]["new"]["messages"] >= 3
    env.daemon.start()
    in_canary(env, 4)
    env.daemon.cli("flow", "promote", "counter")
    wait_status(env, 4, "promoted")
    rows = env.wait_more(out, 5)
    assert [r["by"] for r in rows[-3:]] == ["v2"] * 3
    assert env.flow("counter")["version"] == 4
    statuses = [(d["to_version"], d["status"]) for d in deployments(env)]
    assert statuses == [(1, "done"), (2, "rolled_back"), (3, "rolled_back"), (4, "promoted")]
    assert not db_rows(env.daemon.state_dir, "SELECT 1 FROM messages WHERE step LIKE '%:canary'")
    handled_once(out, env)  # across the kill: nothing lost, nothing handled twice
