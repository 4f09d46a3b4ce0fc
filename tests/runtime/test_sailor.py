"""The Python component contract, through real step processes.

The trigger's process() is called again and again in one long-lived process, so module
state persists between calls (and so does the listener pitfall the README warns about);
what the code prints goes to the step log and never corrupts the protocol; an exception in
process() is an error for that message, not a crash.
"""

from __future__ import annotations

import copy
from typing import Any

from tests.conftest import wait_until
from tests.flows.conftest import (
    COUNTER_DESC,
    FlowEnv,
    counter_files,
    flow_toml,
    read_out,
)

# Module state, init() and listeners, the way component authors write them.
STATEFUL = """\
import sys

CALLS = 0
INITS = 0
LISTENERS = []


def init(cfg):
    global INITS
    INITS += 1


def on_event(event):
    pass


def process(msg, cfg, snapshot, ctx):
    global CALLS
    CALLS += 1
    if cfg.get("guarded") == "yes":
        if not LISTENERS:  # the right way: register once per process
            LISTENERS.append(on_event)
    else:
        LISTENERS.append(on_event)  # the pitfall: one more listener on every call
    n = snapshot.get("n", 0) + 1
    ctx.emit("snapshot", {"n": n})
    # Prints, even ones that look like protocol lines, go to the step log only.
    print('{"t": "done", "ref": 1}')
    print(f"tick {n} calls={CALLS}")
    print(f"stderr line {n}", file=sys.stderr)
    ctx.log.info("logged %d", n)
    return {"n": n, "calls": CALLS, "inits": INITS, "listeners": len(LISTENERS)}
"""

# An async action with all four parameters: two outputs per message, an error on every third.
FAN = """\
async def process(msg, cfg, snapshot, ctx):
    n = msg["body"]["n"]
    if n % 3 == 0:
        raise ValueError(f"no thirds please ({n})")
    ctx.emit("data", {"n": n, "part": "a"})
    ctx.emit("data", {"body": {"n": n, "part": "b"}, "headers": {"x": "1"}})
"""


def _files() -> dict[str, Any]:
    desc = copy.deepcopy(COUNTER_DESC)
    desc["triggers"]["stateful"] = {"main": "./lib/stateful.py", "title": "Stateful"}
    desc["actions"]["fan"] = {"main": "./lib/fan.py", "title": "Fan"}
    return counter_files(**{"component.json": desc, "lib/stateful.py": STATEFUL, "lib/fan.py": FAN})


def _stateful_flow(env: FlowEnv, name: str, guarded: str) -> str:
    return flow_toml(
        name,
        env.out(name),
        steps=[
            {
                "id": "tick",
                "component": "hello",
                "function": "stateful",
                "interval": "20ms",
                "config": {"guarded": guarded},
            },
            {
                "id": "write",
                "component": "hello",
                "function": "write",
                "config": {"out": env.out(name)},
            },
        ],
    )


def test_trigger_module_state_persists_between_calls_and_the_listener_pitfall(
    make_env: Any,
) -> None:
    env: FlowEnv = make_env(_files())
    env.apply(_stateful_flow(env, "unguarded", "no"))
    env.apply(_stateful_flow(env, "guarded", "yes"))
    for name in ("unguarded", "guarded"):
        wait_until(lambda name=name: len(read_out(env.out(name))) >= 8, timeout=30)

    unguarded = read_out(env.out("unguarded"))
    guarded = read_out(env.out("guarded"))
    for rows in (unguarded, guarded):
        # One process for every call: the module-level counter kept counting, init ran once.
        assert [r["calls"] for r in rows] == [r["n"] for r in rows] == list(range(1, len(rows) + 1))
        assert {r["inits"] for r in rows} == {1}
    # Unguarded: a new listener on every call. Guarded: exactly one.
    assert [r["listeners"] for r in unguarded] == [r["calls"] for r in unguarded]
    assert {r["listeners"] for r in guarded} == {1}

    # What the code printed is in the step log, and it did not disturb the protocol.
    log = env.daemon.cli("logs", "guarded", "--step", "tick", "-n", "1000").stdout
    assert "tick 3 calls=3" in log and "stderr line 3" in log and "logged 3" in log
    assert '{"t": "done", "ref": 1}' in log
    both = env.daemon.cli("logs", "guarded", "-n", "1000").stdout
    assert "[tick] tick 3 calls=3" in both
    missing = env.daemon.cli("logs", "guarded", "--step", "nope", check=False)
    assert missing.returncode == 2 and "no step 'nope'" in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1


def test_errors_in_process_are_per_message_and_many_outputs_flow_on(make_env: Any) -> None:
    env: FlowEnv = make_env(_files())
    out = env.out("fan")
    text = flow_toml(
        "fan",
        out,
        steps=[
            {"id": "tick", "component": "hello", "function": "ticker", "interval": "20ms"},
            {"id": "fan", "component": "hello", "function": "fan"},
            {"id": "write", "component": "hello", "function": "write", "config": {"out": out}},
        ],
    )
    env.apply(text)
    wait_until(lambda: max((r["n"] for r in read_out(out)), default=0) >= 10, timeout=30)
    shown = env.show("fan")
    rows = [r for r in read_out(out) if r["n"] <= 10]
    expected = [(n, p) for n in range(1, 11) if n % 3 for p in ("a", "b")]
    assert [(r["n"], r["part"]) for r in rows] == expected
    stats = shown["stats"]["fan"]
    assert stats["failed"] >= 3 and stats["restarts"] == 0
    assert "ValueError: no thirds please" in stats["last_error"]
    # The same process handled every message: an exception is not a crash.
    pid = next(s["pid"] for s in shown["steps"] if s["id"] == "fan")
    assert pid == next(s["pid"] for s in env.show("fan")["steps"] if s["id"] == "fan")
    assert (
        "ValueError: no thirds please (3)"
        in env.daemon.cli("logs", "fan", "--step", "fan", "-n", "100000").stdout
    )
    assert shown["step_count"] == 3
