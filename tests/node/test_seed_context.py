"""The platform sailor's `this` context, logger, environment and flow variables, end to end.

Components of our own (Node and Python) use each feature in a real flow on a real daemon:
`this.getFlowVariables()` / `ctx.flow_variables`, the `ELASTICIO_*` environment and the
step's `env`, `emit()` returning a promise, `on/once/removeListener`, `getConfig()`,
`getApiClient()`'s clear refusal, printf-style logging and `logger.child()`, and `cfg` deep
copied for each message. A `${VAR}` secret reaches the steps and never status, logs or the
database.
"""

from __future__ import annotations

import tomllib
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from deployd.config import parse as parse_config
from deployd.flows import model, secrets
from tests.conftest import Daemon, SharedDaemons, Work, db_rows, wait_until
from tests.flows.conftest import read_out
from tests.node.conftest import PACKAGE_JSON, PACKAGE_LOCK

NODE_DESC: dict[str, Any] = {
    "title": "Context probe",
    "triggers": {"tick": {"main": "./lib/tick.js"}},
    "actions": {"probe": {"main": "./lib/probe.js", "fields": {"out": {"required": True}}}},
}

TICK_JS = """\
'use strict';
// Three messages for each value of the flow variable REGION.
exports.process = async function tick(msg, cfg, snapshot) {
  const region = this.getFlowVariables().REGION;
  const n = (snapshot[region] || 0) + 1;
  if (n > 3) return undefined;
  await this.emit('updateSnapshot', { [region]: n });
  return { body: { n } };
};
"""

# Every feature of the context, written into cfg.out (outside the state dir) for the test;
# the message it emits holds nothing secret.
PROBE_JS = """\
'use strict';
const fs = require('fs');

exports.process = async function probe(msg, cfg) {
  const seen = [];
  const onData = (p) => seen.push(['on', p.body.n]);
  this.on('data', onData);
  this.once('data', (p) => seen.push(['once', p.body.n]));
  const removed = () => seen.push(['removed']);
  this.on('data', removed);
  this.removeListener('data', removed);
  const cfgWasClean = cfg.mutated === undefined && cfg.nested.list.length === 1;
  cfg.mutated = true;
  cfg.nested.list.push(msg.body.n);
  let apiError = null;
  try {
    this.getApiClient();
  } catch (err) {
    apiError = err.message;
  }
  this.logger.info('%s messages into %d parts: %j', 'two', 3, { n: msg.body.n });
  this.logger.child({ threadId: 'thread-' + msg.body.n }).warn('child line %s', 'x');
  const env = {};
  for (const [k, v] of Object.entries(process.env)) {
    if (k.startsWith('ELASTICIO_') || k.startsWith('MY_')) env[k] = v;
  }
  const first = this.emit('data', { body: { n: msg.body.n, from: 'node' } });
  const isPromise = typeof first.then === 'function';
  const resolved = await first;
  await this.emit('data', { body: { n: msg.body.n, from: 'node', second: true } });
  fs.appendFileSync(cfg.out, JSON.stringify({
    n: msg.body.n, vars: this.getFlowVariables(), env, config: this.getConfig(),
    isPromise, resolved, seen, cfgWasClean, apiError,
  }) + '\\n');
  this.emit('end');
};
"""

PY_PROBE = """\
import json
import os


def process(msg, cfg, snapshot, ctx):
    if msg["body"].get("second"):
        return None
    clean = "mutated" not in cfg and cfg["nested"]["list"] == [0]
    cfg["mutated"] = True
    cfg["nested"]["list"].append(1)
    ctx.log.info("%s into %d parts", "py", 2)
    ctx.log_child({"threadId": "py-%d" % msg["body"]["n"]}).warning("py child %s", "y")
    variables = ctx.flow_variables
    variables["REGION"] = "changed"  # a copy: the next call sees the flow's value
    env = {k: v for k, v in os.environ.items() if k.startswith(("ELASTICIO_", "MY_"))}
    line = {"n": msg["body"]["n"], "vars": ctx.flow_variables, "env": env, "clean": clean}
    line["mapped"] = msg["body"].get("mapped_region")
    with open(cfg["out"], "a") as fh:
        fh.write(json.dumps(line) + "\\n")
    return {"n": msg["body"]["n"], "from": "python"}
"""

PY_DESC: dict[str, Any] = {
    "title": "Python context probe",
    "runtime": "python",
    "triggers": {"tick": {"main": "./lib/tick.py"}},
    "actions": {"probe": {"main": "./lib/probe.py", "fields": {"out": {"required": True}}}},
}


def flow_file(
    name: str, node_out: Path, py_out: Path, region: str = "eu", runtime: str = "embedded"
) -> str:
    return f"""\
name = "{name}"
type = "realtime"
runtime = "{runtime}"

[variables]
REGION = "{region}"
TOKEN = "${{SEED_CTX_TOKEN}}"
URL = "https://${{SEED_CTX_TOKEN}}@example.com"

[[steps]]
id = "tick"
component = "ctxnode"
function = "tick"
interval = "50ms"

[[steps]]
id = "probe"
component = "ctxnode"
function = "probe"
config = {{ out = "{node_out}", nested = {{ list = [0] }} }}
env = {{ MY_PLAIN = "hello", MY_SECRET = "${{SEED_CTX_TOKEN}}" }}

[[steps]]
id = "pyprobe"
component = "ctxpy"
function = "probe"
mapping = '$merge([$, {{"mapped_region": $getFlowVariables().REGION}}])'
config = {{ out = "{py_out}", nested = {{ list = [0] }} }}
env = {{ MY_PY = "snake" }}
"""


CtxDaemon = Callable[..., tuple[Daemon, str]]

NODE_FILES: dict[str, Any] = {
    "component.json": NODE_DESC,
    "package.json": {**PACKAGE_JSON, "scripts": {}},
    "package-lock.json": PACKAGE_LOCK,
    "lib/tick.js": TICK_JS,
    "lib/probe.js": PROBE_JS,
    ".gitignore": "node_modules/\n",
}
PY_FILES: dict[str, Any] = {
    "component.json": PY_DESC,
    "lib/tick.py": "def process(msg, cfg):\n    return None\n",
    "lib/probe.py": PY_PROBE,
}
# The secret of the module's shared daemon (in its environment as SEED_CTX_TOKEN)
SHARED_SECRET = f"s3cr3t-{uuid.uuid4().hex}"


@pytest.fixture
def ctx_daemon_factory(
    daemon_factory: Callable[..., Daemon], component: Callable[..., Work]
) -> CtxDaemon:
    """ctx_daemon_factory(extra_toml="") → (a started daemon of the test's own hosting both
    probes, the secret it has in its environment as SEED_CTX_TOKEN)."""
    return lambda extra_toml="": _ctx_daemon(daemon_factory, component, extra_toml)


@pytest.fixture
def ctx_daemon(shared_daemon: SharedDaemons) -> tuple[Daemon, str]:
    """(the module's shared daemon hosting both probes at v1, its SEED_CTX_TOKEN): for tests
    that only add flows, named apart."""
    d = shared_daemon.daemon({"SEED_CTX_TOKEN": SHARED_SECRET})
    shared_daemon.component(d, "ctxnode", NODE_FILES)
    shared_daemon.component(d, "ctxpy", PY_FILES)
    return d, SHARED_SECRET


def _ctx_daemon(
    daemon_factory: Callable[..., Daemon], component: Callable[..., Work], extra_toml: str
) -> tuple[Daemon, str]:
    secret = f"s3cr3t-{uuid.uuid4().hex}"
    node = component("ctxnode")
    node.commit("context probe", NODE_FILES)
    py = component("ctxpy")
    py.commit("python probe", PY_FILES)
    d = daemon_factory([{"name": "ctxnode"}, {"name": "ctxpy"}], extra_toml=extra_toml)
    d.env["SEED_CTX_TOKEN"] = secret
    d.start()
    d.wait_recent("ctxnode", node.push(d.hosted("ctxnode")), timeout=60)
    d.wait_recent("ctxpy", py.push(d.hosted("ctxpy")), timeout=60)
    return d, secret


def _state_bytes(state_dir: Path) -> bytes:
    """Every byte deployd keeps: the database (WAL too), logs, everything under state_dir."""
    out = b""
    for path in state_dir.rglob("*"):
        if path.is_file() and "artifacts" not in path.parts:
            out += path.read_bytes()
    return out


def test_context_logger_env_and_flow_variables_node_and_python(
    ctx_daemon: tuple[Daemon, str], tmp_path: Path
) -> None:
    check_context(*ctx_daemon, tmp_path, "embedded")


def test_flow_variables_and_env_on_rabbitmq_through_a_switch_over(
    ctx_daemon_factory: CtxDaemon, amqp_url: str, tmp_path: Path
) -> None:
    extra = f'[runtime.rabbitmq]\nurl = "{amqp_url}"\n'
    check_context(*ctx_daemon_factory(extra), tmp_path, "rabbitmq")


def check_context(d: Daemon, secret: str, tmp_path: Path, runtime: str) -> None:
    node_out, py_out = tmp_path / "node.jsonl", tmp_path / "py.jsonl"
    flow = tmp_path / "ctx.toml"
    flow.write_text(flow_file("ctx", node_out, py_out, runtime=runtime))
    d.cli("flow", "apply", str(flow))
    rows = wait_until(lambda: len(r := read_out(node_out)) >= 3 and r, timeout=60)
    py_rows = wait_until(lambda: len(r := read_out(py_out)) >= 3 and r, timeout=60)

    first = rows[0]
    # flow variables, the ${VAR} secret expanded for the step
    assert first["vars"] == {
        "REGION": "eu",
        "TOKEN": secret,
        "URL": f"https://{secret}@example.com",
    }
    # the platform's environment and the step's env
    env = first["env"]
    assert env["ELASTICIO_FLOW_ID"] == "ctx" and env["ELASTICIO_STEP_ID"] == "probe"
    assert env["ELASTICIO_COMP_ID"] == "ctxnode" and env["ELASTICIO_FUNCTION"] == "probe"
    assert env["ELASTICIO_FLOW_TYPE"] == "long_running"
    assert env["ELASTICIO_API_URI"] == d.url
    # the object storage (attachments): deployd's API, and the flow's token (a JWT)
    assert env["ELASTICIO_OBJECT_STORAGE_URI"] == d.url
    storage_token = env["ELASTICIO_OBJECT_STORAGE_TOKEN"]
    assert storage_token.count(".") == 2
    assert len(env["ELASTICIO_EXEC_ID"]) == 32 and env["ELASTICIO_FLOW_VERSION"] == "1"
    assert env["MY_PLAIN"] == "hello" and env["MY_SECRET"] == secret
    assert "MY_PY" not in env  # another step's env
    # getConfig(): the ELASTICIO_* settings without the prefix
    assert first["config"]["STEP_ID"] == "probe" and first["config"]["API_URI"] == d.url
    # emit() returns a promise; on/once/removeListener as an EventEmitter
    assert first["isPromise"] is True and first["resolved"] is True
    assert first["seen"] == [["on", first["n"]], ["once", first["n"]], ["on", first["n"]]]
    # cfg is a deep copy for each message: what one call changed, the next does not see
    assert all(r["cfgWasClean"] for r in rows)
    assert "not available on deployd" in first["apiError"]
    assert [r["n"] for r in rows[:3]] == [1, 2, 3]

    # Python: the same variables and env of its own step; cfg and flow_variables copies
    firsts = [r for r in py_rows if r["n"] == 1]
    assert firsts, py_rows
    py = firsts[0]
    assert py["vars"]["REGION"] == "eu" and py["vars"]["TOKEN"] == secret
    assert py["mapped"] == "eu"  # the mapping in front of it: $getFlowVariables()
    assert py["env"]["ELASTICIO_STEP_ID"] == "pyprobe" and py["env"]["MY_PY"] == "snake"
    assert py["env"]["ELASTICIO_COMP_ID"] == "ctxpy" and "MY_PLAIN" not in py["env"]
    assert all(r["clean"] for r in py_rows)

    # the logger formats like util.format / %-style, and child() adds its fields
    log = (d.state_dir / "logs" / "steps" / "ctx" / "probe.log").read_text()
    assert 'two messages into 3 parts: {"n":1}' in log
    assert 'child line x {"threadId":"thread-1"}' in log
    py_log = (d.state_dir / "logs" / "steps" / "ctx" / "pyprobe.log").read_text()
    assert "py into 2 parts" in py_log and "py child y [threadId=py-1]" in py_log

    # the secret never in status, the flow's stored versions, the daemon log, the database
    assert secret not in d.cli("status", "--json").stdout
    assert secret not in d.cli("flow", "show", "ctx", "--json").stdout
    stored = db_rows(d.state_dir, "SELECT spec, steps FROM flow_versions WHERE flow = 'ctx'")
    assert "${SEED_CTX_TOKEN}" in stored[0]["spec"] and "${SEED_CTX_TOKEN}" in stored[0]["steps"]
    assert secret not in d.log()
    assert secret.encode() not in _state_bytes(d.state_dir)
    # nor the object storage token (derived from a key, never stored or logged)
    assert storage_token not in d.log()
    assert storage_token.encode() not in _state_bytes(d.state_dir)

    # changing a variable is a flow change: a new version, whose steps see the new value
    flow.write_text(flow_file("ctx", node_out, py_out, region="us", runtime=runtime))
    d.cli("flow", "apply", str(flow))
    wait_until(lambda: any(r["vars"]["REGION"] == "us" for r in read_out(py_out)), timeout=60)
    assert (
        wait_until(
            lambda: [r for r in read_out(node_out) if r["vars"]["REGION"] == "us"], timeout=60
        )[0]["env"]["ELASTICIO_FLOW_VERSION"]
        == "2"
    )


def test_secret_references_refused_with_a_clear_message(
    ctx_daemon: tuple[Daemon, str], tmp_path: Path
) -> None:
    d, _secret = ctx_daemon
    out = tmp_path / "x.jsonl"
    for ref, words in (
        ("${SEED_CTX_UNSET}", "environment variable SEED_CTX_UNSET is not set"),
        ("${DEPLOYD_API_TOKEN}", "one of deployd's own settings"),
        ("${not a name}", "is not an environment variable reference"),
    ):
        text = flow_file("bad", out, out).replace("${SEED_CTX_TOKEN}@", ref + "@")
        path = tmp_path / "bad.toml"
        path.write_text(text)
        res = d.cli("flow", "apply", str(path), check=False)
        assert res.returncode != 0
        err = res.stderr + res.stdout
        assert "variables.URL" in err and words in err, err
    flows = d.cli("flow", "list", "--json").stdout
    assert '"bad"' not in flows  # nothing half-written


def test_names_the_daemon_config_uses_are_deployds_own(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SEED_HOOK_SECRET", "hook-secret")
    config = parse_config(
        {"components": [{"name": "c", "webhook_secret": "${SEED_HOOK_SECRET}"}]}, base=tmp_path
    )
    assert config.own_env == {"SEED_HOOK_SECRET"}
    spec = model.parse(
        tomllib.loads(
            'name = "f"\n[variables]\nA = "${SEED_HOOK_SECRET}"\n'
            '[[steps]]\nid = "t"\ncomponent = "c"\nfunction = "t"\n'
            '[[steps]]\nid = "a"\ncomponent = "c"\nfunction = "a"\nenv = { X = "${HOME}" }\n'
        )
    )
    problems = secrets.problems(spec, config)
    assert problems == [
        "variables.A: ${SEED_HOOK_SECRET} is one of deployd's own settings (its config file "
        "uses it, or it starts with DEPLOYD_), which steps never get; export the step's secret "
        "under another name"
    ]  # ${HOME} is set and not deployd's: allowed
