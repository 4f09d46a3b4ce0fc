"""Passthrough end to end: every message carries what each earlier step of its flow execution
emitted, by step id, as the seed platform's sailor does it (issue 17). A real daemon, real
pushes, real Python and Node step processes, real SQLite queues and a real RabbitMQ.

The flow is tick (Python trigger: {"text": "hi N", "n": N}) → stamp (Python: the body with
"stamped", and a header) → peek (Node: writes `msg.passthrough` to its out file, passes the
body on) → record (Python, with a mapping reading `$getPassthrough()`: writes its body and
`msg["passthrough"]`, tagged with its code version; v1 refuses n in cfg["refuse"] and sleeps
cfg["sleep"] seconds per message).
"""

from __future__ import annotations

import json
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.conftest import Work, dead_letter_rows, wait_until
from tests.flows.conftest import FlowEnv, counter_files, flow_toml, read_out
from tests.flows.test_rabbitmq import rabbit_toml

STAMP = """\
def process(msg, cfg, snapshot, ctx):
    ctx.emit("data", {"body": {**msg["body"], "stamped": True}, "headers": {"x-stamp": "s1"}})
"""


def recorder(tag: str) -> str:
    return textwrap.dedent(
        f"""\
        import json, time
        TAG = {tag!r}


        def process(msg, cfg):
            if TAG == "v1":  # the fixed version is fast too: the queue drains
                time.sleep(float(cfg.get("sleep", "0")))
            n = msg["body"]["n"]
            if TAG == "v1" and str(n) in cfg.get("refuse", "").split(","):
                raise ValueError(f"n={{n}} refused by {{TAG}}")
            line = {{"n": n, "body": msg["body"], "pt": msg["passthrough"], "by": TAG}}
            with open(cfg["out"], "a") as fh:
                fh.write(json.dumps(line) + "\\n")
        """
    )


def hello_files(tag: str = "v1") -> dict[str, Any]:
    files = counter_files(tag, **{"lib/stamp.py": STAMP, "lib/record.py": recorder(tag)})
    desc = json.loads(json.dumps(files["component.json"]))
    desc["actions"]["stamp"] = {"main": "./lib/stamp.py", "title": "Stamp"}
    desc["actions"]["record"] = {
        "main": "./lib/record.py",
        "title": "Record",
        "fields": {"out": {"label": "Output file", "required": True}},
    }
    files["component.json"] = desc
    return files


NODE_DESC: dict[str, Any] = {
    "title": "Peek (Node)",
    "runtime": "node",
    "actions": {
        "peek": {
            "main": "./lib/peek.js",
            "title": "Peek",
            "fields": {"out": {"label": "Output file", "required": True}},
        }
    },
}

# Written as the platform's components are: messages.newMessageWithBody, this.emit.
PEEK_JS = """\
'use strict';
const fs = require('fs');
const { messages } = require('elasticio-node');

exports.process = async function peek(msg, cfg) {
  fs.appendFileSync(cfg.out, JSON.stringify({ n: msg.body.n, pt: msg.passthrough }) + '\\n');
  await this.emit('data', messages.newMessageWithBody({ ...msg.body, peeked: true }));
};
"""

MAPPING = (
    '{"n": n, "peeked": peeked, "text": $getPassthrough().tick.body.text,'
    ' "stamp": $getPassthrough().stamp.headers."x-stamp"}'
)


def pt_env(
    make_env: Callable[..., FlowEnv], component: Callable[..., Work], **keys: Any
) -> FlowEnv:
    """A daemon hosting `hello` (Python) and `nodept` (Node), both registered."""
    env = make_env(hello_files(), components=[{"name": "hello"}, {"name": "nodept"}], **keys)
    work = component("nodept")
    work.commit("peek", {"component.json": NODE_DESC, "lib/peek.js": PEEK_JS})
    env.daemon.wait_recent("nodept", work.push(env.daemon.hosted("nodept")), timeout=60)
    return env


def pt_flow(env: FlowEnv, *, interval: str = "50ms", record: dict[str, Any] | None = None) -> str:
    record_step: dict[str, Any] = {
        "id": "record",
        "component": "hello",
        "function": "record",
        "config": {"out": env.out("record"), **(record or {})},
        "mapping": MAPPING,
    }
    steps = [
        {"id": "tick", "component": "hello", "function": "ticker", "interval": interval},
        {"id": "stamp", "component": "hello", "function": "stamp"},
        {
            "id": "peek",
            "component": "nodept",
            "function": "peek",
            "config": {"out": env.out("peek")},
        },
        record_step,
    ]
    return flow_toml("pt", env.out("record"), steps=steps)


def check_passthrough(peeks: list[dict[str, Any]], records: list[dict[str, Any]]) -> None:
    """What the Node step and the Python step saw, for every message."""
    for row in peeks:
        n, pt = row["n"], row["pt"]
        assert list(pt) == ["tick", "stamp"], pt  # the earlier steps, in flow order
        assert {k: pt["tick"][k] for k in ("body", "headers")} == {
            "body": {"text": f"hi {n}", "n": n},
            "headers": {},
        }
        assert pt["stamp"]["body"] == {"text": f"hi {n}", "n": n, "stamped": True}
        assert pt["stamp"]["headers"] == {"x-stamp": "s1"}
        assert isinstance(pt["tick"]["id"], str) and pt["tick"]["id"] != pt["stamp"]["id"]
    for row in records:
        n, pt = row["n"], row["pt"]
        assert list(pt) == ["tick", "stamp", "peek"], pt
        assert pt["peek"]["body"] == {"text": f"hi {n}", "n": n, "stamped": True, "peeked": True}
        # the mapping read the passthrough through $getPassthrough()
        assert row["body"] == {"n": n, "peeked": True, "text": f"hi {n}", "stamp": "s1"}


def test_node_python_and_mapper_steps_see_the_earlier_steps_outputs_by_step_id(
    make_env: Callable[..., FlowEnv], component: Callable[..., Work]
) -> None:
    """Embedded runtime: the Node step gets `msg.passthrough` with tick's and stamp's output
    (body and headers, each with its message id), the Python step `msg["passthrough"]` with
    peek's too, and the mapping before it `$getPassthrough()`. A message whose handling failed
    keeps its passthrough as a dead letter; retried into a fixed version, it carries it again."""
    env = pt_env(make_env, component)
    env.apply(pt_flow(env, record={"refuse": "3"}))
    records = env.out("record")
    wait_until(lambda: len(read_out(records)) >= 5, timeout=60)
    wait_until(lambda: dead_letter_rows(env.daemon.state_dir, "pt"), timeout=30)
    check_passthrough(read_out(env.out("peek")), read_out(records))
    [letter] = json.loads(env.daemon.cli("flow", "errors", "pt", "--json").stdout)
    whole = json.loads(
        env.daemon.cli("flow", "errors", "pt", "--id", str(letter["id"]), "--json").stdout
    )
    assert list(whole["passthrough"]) == ["tick", "stamp", "peek"]
    assert whole["passthrough"]["tick"]["body"]["n"] == 3
    human = env.daemon.cli("flow", "errors", "pt", "--id", str(letter["id"])).stdout
    assert "passthrough (earlier steps' outputs):" in human and '"x-stamp": "s1"' in human
    env.push(hello_files("v2"))
    assert env.wait_deploy("pt", 2)["status"] == "done"
    env.daemon.cli("flow", "retry", "pt", "--all")
    retried = wait_until(lambda: [r for r in read_out(records) if r["n"] == 3], timeout=30)
    assert [r["by"] for r in retried] == ["v2"]
    check_passthrough([], retried)
    check_passthrough([], read_out(records))


def test_a_passthrough_over_the_bound_leaves_out_the_oldest_steps_and_says_so(
    make_env: Callable[..., FlowEnv], component: Callable[..., Work]
) -> None:
    """daemon.max_passthrough_bytes: over it, the oldest steps' entries are left out (the
    message is delivered all the same) and the step log of the step whose output it is
    says so, naming the key."""
    env = pt_env(make_env, component, max_passthrough_bytes=1024)
    steps = [
        {
            "id": "tick",
            "component": "hello",
            "function": "ticker",
            "interval": "50ms",
            "config": {"prefix": "x" * 480},
        },
        {"id": "stamp", "component": "hello", "function": "stamp"},
        {
            "id": "peek",
            "component": "nodept",
            "function": "peek",
            "config": {"out": env.out("peek")},
        },
    ]
    env.apply(flow_toml("pt", env.out("peek"), steps=steps))
    peeks = wait_until(lambda: len(rows := read_out(env.out("peek"))) >= 3 and rows, timeout=60)
    for row in peeks:
        assert list(row["pt"]) == ["stamp"], row  # tick's entry left out: both are over 1024
        assert row["pt"]["stamp"]["body"]["n"] == row["n"]
        assert len(json.dumps(row["pt"], separators=(",", ":"))) <= 1024
    log = Path(env.daemon.state_dir, "logs", "steps", "pt", "stamp.log").read_text()
    assert "over daemon.max_passthrough_bytes (1024)" in log, log
    assert "entries of step(s) tick were left out" in log
    # once a minute at most, not once per message
    assert log.count("WARNING deployd: the passthrough") == 1


def test_passthrough_survives_the_broker_hop_and_a_switch_over_on_rabbitmq(
    make_env: Callable[..., FlowEnv], component: Callable[..., Work], amqp_url: str
) -> None:
    """RabbitMQ runtime: the passthrough travels in the broker's messages; a push of new
    code while messages are queued on the broker switches the flow, and the queued messages
    reach the new version with their passthrough whole, none lost or doubled; a dead letter
    retried on the broker carries it too."""
    env = pt_env(make_env, component, extra_toml=rabbit_toml(amqp_url))
    env.apply(pt_flow(env, interval="10ms", record={"sleep": "0.03", "refuse": "2"}))
    records = env.out("record")
    wait_until(lambda: len(read_out(records)) >= 10, timeout=60)
    assert env.flow("pt")["runtime"] == "rabbitmq"

    wait_until(lambda: env.queued("record") >= 10, timeout=30)
    env.push(hello_files("v2"))
    assert env.wait_deploy("pt", 2)["status"] == "done"
    wait_until(lambda: sum(r["by"] == "v2" for r in read_out(records)) >= 10, timeout=60)
    env.daemon.cli("flow", "retry", "pt", "--all")
    wait_until(lambda: any(r["n"] == 2 for r in read_out(records)), timeout=30)
    rows = read_out(records)
    check_passthrough(read_out(env.out("peek")), rows)
    ns = [r["n"] for r in rows]
    assert len(ns) == len(set(ns)), "a message was handled twice"
    assert sorted(ns) == list(range(1, max(ns) + 1)), "a message was lost"
    tags = [r["by"] for r in rows if r["n"] != 2]
    switch = tags.index("v2")
    assert set(tags[:switch]) == {"v1"} and set(tags[switch:]) == {"v2"}, tags
    assert [r["by"] for r in rows if r["n"] == 2] == ["v2"]
