"""Node.js components written for an existing integration platform, end to end.

Real daemon, real pushes, real `npm ci`, real node step processes.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable

from tests.conftest import wait_until
from tests.node.conftest import NodeEnv, platform_files, read_out

IN_PROGRESS = ("starting_new", "switching")  # a deployment's states before done or failed

# The daemon the module's tests share (all but the one that pushes): long enough for an end
# emitted on a later tick on a loaded machine; "noend" of test_events waits it out.
SHARED = {"node_end_timeout": "3s"}


def test_platform_component_builds_with_npm_and_runs_in_a_realtime_flow(
    shared_node_env: Callable[..., NodeEnv],
) -> None:
    env = shared_node_env(**SHARED)
    build = env.daemon.builds("platform")[0]
    assert build["status"] == "succeeded"
    log = env.daemon.cli("build-log", str(build["id"])).stdout
    assert "$ npm ci --include=dev" in log and "smoke ok" in log
    assert log.index("smoke ok") < log.index("$ npm prune --omit=dev")
    out = env.out("counter")
    env.apply(
        "counter",
        [
            {"id": "tick", "component": "platform", "function": "counter", "interval": "50ms"},
            {
                "id": "write",
                "component": "platform",
                "function": "write",
                "config": {"out": str(out)},
            },
        ],
    )
    rows = env.wait_rows(out, lambda r: len(r) >= 5 and r)
    assert [r["n"] for r in rows] == list(range(1, len(rows) + 1))
    assert rows[0] == {"n": 1, "text": "hi 1", "by": "v1"}


KINDS = "callback,plain,promise,async,error,reject,throw,rebound,noend,print,last"


def test_events_promise_and_callback_styles(shared_node_env: Callable[..., NodeEnv]) -> None:
    env = shared_node_env(**SHARED)  # node_end_timeout 3s: "noend" waits it out
    out = env.out("events")
    env.apply(
        "events",
        [
            {
                "id": "script",
                "component": "platform",
                "function": "script",
                "interval": "20ms",
                "config": {"kinds": KINDS},
            },
            {"id": "events", "component": "platform", "function": "events"},
            {
                "id": "write",
                "component": "platform",
                "function": "write",
                "config": {"out": str(out)},
            },
        ],
    )
    kinds = KINDS.split(",")
    wanted = {"callback", "plain", "promise", "async", "rebound", "noend", "print", "last"}
    rows = env.wait_rows(out, lambda r: wanted <= {x["kind"] for x in r} and r, timeout=30)
    by_kind: dict[str, list[dict]] = {}
    for row in rows:
        by_kind.setdefault(row["kind"], []).append(row)
    # callback style: two data events, the end emitted from a later tick
    assert sorted(r["part"] for r in by_kind["callback"]) == [1, 2]
    # a plain object is the body; a message's body is taken as is
    assert by_kind["plain"] == [{"n": 2, "kind": "plain", "plain": True, "by": "v1"}]
    # promise resolved with a message: data then end; async resolving empty: just end
    assert len(by_kind["promise"]) == 1 and len(by_kind["async"]) == 1
    # error, rejection and a throw: no data, an error each
    assert not {"error", "reject", "throw"} & set(by_kind)
    # rebound: delivered again later (same message id), handled once
    assert by_kind["rebound"][0]["redelivered"] is True and len(by_kind["rebound"]) == 1
    # no end: its data counts, the message is finished after node_end_timeout
    assert len(by_kind["noend"]) == 1
    # what the code printed is in the step log, not in the protocol
    assert len(by_kind["print"]) == 1 and "forged" not in by_kind["print"][0]
    log = env.step_log("events", "events")
    assert '{"t":"done","ref":12345}' in log and "stderr too" in log
    # updateSnapshot merges: every kind handled so far is in the step snapshot
    snap = wait_until(lambda: (s := env.snapshot("events", "events")) and "last" in s and s)
    assert set(kinds) - {"reject", "throw"} <= set(snap), snap
    assert env.snapshot("events", "script") == {"n": len(kinds)}
    # the errors are recorded: error, reject, throw, and the missing end
    stats = wait_until(lambda: (s := env.stats("events", "events")) and s["failed"] >= 4 and s)
    assert stats["failed"] == 4
    daemon_log = env.daemon.log()
    for text in ("boom 5", "rejected 6", "thrown 7", "did not emit 'end' within 3s"):
        assert text in daemon_log, text


def test_listener_pitfall_unguarded_adds_one_per_call_guarded_keeps_one(
    shared_node_env: Callable[..., NodeEnv],
) -> None:
    env = shared_node_env(**SHARED)
    for name in ("unguarded", "guarded"):
        env.apply(
            name,
            [
                {"id": "tick", "component": "platform", "function": name, "interval": "20ms"},
                {
                    "id": "write",
                    "component": "platform",
                    "function": "write",
                    "config": {"out": str(env.out(name))},
                },
            ],
        )
    calls = 6
    # The trigger's process() runs again and again in one process: module state persists.
    wrong = env.wait_rows(
        env.out("unguarded"), lambda r: sum(x["call"] == calls for x in r) >= calls and r
    )
    right = env.wait_rows(env.out("guarded"), lambda r: any(x["call"] >= calls for x in r) and r)
    for call in range(1, calls + 1):
        # unguarded: `call` listeners by call number `call`, each emitting the event once
        mine = [x for x in wrong if x["call"] == call]
        assert len(mine) == call and {x["listeners"] for x in mine} == {call}
    assert [x["call"] for x in right] == list(range(1, len(right) + 1))
    assert {x["listeners"] for x in right} == {1}


def test_mixed_flow_node_trigger_mapper_python_action(
    shared_node_env: Callable[..., NodeEnv],
) -> None:
    env = shared_node_env(**SHARED)
    out = env.out("mixed")
    env.apply(
        "mixed",
        [
            {"id": "tick", "component": "platform", "function": "counter", "interval": "50ms"},
            {
                "id": "write",
                "component": "pyhelp",
                "function": "write",
                "mapping": '{"text": $uppercase(text), "n": n}',
                "config": {"out": str(out)},
            },
        ],
    )
    rows = env.wait_rows(out, lambda r: len(r) >= 3 and r)
    assert rows[:3] == [{"text": f"HI {n}", "n": n, "by": "python"} for n in (1, 2, 3)]
    steps = env.flow("mixed")["steps"]
    assert [(s["id"], s["kind"], s["state"]) for s in steps] == [
        ("tick", "trigger", "running"),
        ("write:mapper", "mapper", "running"),
        ("write", "action", "running"),
    ]
    # console.log of the Node trigger went to its step log, never into the protocol
    assert '{"t":"done","ref":1} <- console.log goes to the step log' in env.step_log(
        "mixed", "tick"
    )


def test_redeploy_under_load_loses_nothing(node_env: Callable[..., NodeEnv]) -> None:
    env = node_env()  # pushes to platform and kills a step: a daemon of its own
    out = env.out("load")
    env.apply(
        "load",
        [
            {"id": "tick", "component": "platform", "function": "counter", "interval": "10ms"},
            {
                "id": "write",
                "component": "platform",
                "function": "write",
                "config": {"out": str(out)},
            },
        ],
    )
    env.wait_rows(out, lambda r: len(r) >= 10)
    for version, tag in ((2, "v2"), (3, "v3")):
        env.push(platform_files(tag), f"write tagged {tag}")
        env.wait_rows(out, lambda r, tag=tag: sum(x["by"] == tag for x in r) >= 10)
        # the new steps write before the switch is recorded as finished: wait for the record
        dep = wait_until(
            lambda: (d := env.flow("load")["last_deploy"])["status"] not in IN_PROGRESS and d
        )
        assert dep["status"] == "done" and dep["to_version"] == version, dep
    # A killed Node step is restarted; its unfinished message is delivered again.
    write = next(s for s in env.flow("load")["steps"] if s["id"] == "write")
    os.kill(write["pid"], signal.SIGKILL)
    wait_until(
        lambda: (
            (w := env.flow("load")["steps"][1])["pid"] not in (None, write["pid"])
            and w["state"] == "running"
        ),
        timeout=30,
    )
    have = len(read_out(out))
    env.wait_rows(out, lambda r: len(r) >= have + 10)
    rows = read_out(out)
    # The counter goes through the trigger's snapshot: 1..N exactly, across both switches and
    # the restart (a message the killed process had written but not finished is written again).
    ns = [r["n"] for r in rows]
    assert sorted(set(ns)) == list(range(1, max(ns) + 1)), "a message was lost"
    assert len(ns) - len(set(ns)) <= 1, "more than the in-flight message was repeated"
    tags = [r["by"] for r in rows]
    assert tags == sorted(tags), "an old version wrote after a newer one"
    assert {s["version"] for s in env.flow("load")["steps"]} == {3}
