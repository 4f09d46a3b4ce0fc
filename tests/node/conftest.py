"""Node.js fixtures: a component written in the integration platform's style, and its flows.

`platform_files(tag)` is a component as such platforms' authors write them: component.json,
package.json + package-lock.json (no dependencies, so `npm ci` needs no network),
lib/triggers/*.js and lib/actions/*.js using `this.emit` and `messages.newMessageWithBody`
from `require('elasticio-node')` — which the component does not install: deployd's helper
answers. The `write` action appends one JSON line per message to `cfg.out`, tagged with
`tag`, so the out file shows which code version handled what, and "the n values are exactly
1..N" proves nothing was lost or doubled.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Daemon, SharedDaemons, Work, db_rows, wait_until
from tests.flows.conftest import flow_toml, read_out

COMPONENT_JSON: dict[str, Any] = {
    "title": "Platform-style component",
    "description": "written for an existing integration platform; runs unchanged on deployd",
    "test": "npm test",
    "triggers": {
        "counter": {
            "main": "./lib/triggers/counter.js",
            "title": "Counter",
            "type": "polling",
            "fields": {"prefix": {"label": "Prefix", "viewClass": "TextFieldView"}},
            "metadata": {"out": {"type": "object", "properties": {"n": {"type": "number"}}}},
        },
        "script": {
            "main": "./lib/triggers/script.js",
            "title": "Script",
            "fields": {"kinds": {"label": "Kinds", "required": True}},
        },
        "unguarded": {"main": "./lib/triggers/unguarded.js", "title": "Listener (wrong)"},
        "guarded": {"main": "./lib/triggers/guarded.js", "title": "Listener (right)"},
    },
    "actions": {
        "write": {
            "main": "./lib/actions/write.js",
            "title": "Write",
            "fields": {"out": {"label": "Output file", "required": True}},
        },
        "events": {"main": "./lib/actions/events.js", "title": "Events"},
    },
}

PACKAGE_JSON: dict[str, Any] = {
    "name": "platform-component",
    "version": "1.0.0",
    "description": "a component in the platform's style",
    "scripts": {"test": "node test/smoke.js"},
    "engines": {"node": ">=18"},
    "dependencies": {},
}

PACKAGE_LOCK: dict[str, Any] = {
    "name": "platform-component",
    "version": "1.0.0",
    "lockfileVersion": 3,
    "requires": True,
    "packages": {
        "": {"name": "platform-component", "version": "1.0.0", "engines": {"node": ">=18"}}
    },
}

# Callback style: this.emit('snapshot'), this.emit('data', message), this.emit('end').
COUNTER_JS = """\
'use strict';
const { messages } = require('elasticio-node');

exports.process = function processTrigger(msg, cfg, snapshot) {
  const n = (snapshot.n || 0) + 1;
  console.log(JSON.stringify({ t: 'done', ref: 1 }) + ' <- console.log goes to the step log');
  this.logger.info('counter', n);
  this.emit('snapshot', { n });
  this.emit('data', messages.newMessageWithBody({ n, text: `${cfg.prefix || 'hi'} ${n}` }));
  this.emit('end');
};
"""

# Emits one message per call, whose `kind` says what the `events` action does with it.
SCRIPT_JS = """\
'use strict';
const { messages } = require('elasticio-node');

exports.process = function processTrigger(msg, cfg, snapshot) {
  const kinds = String(cfg.kinds).split(',');
  const n = (snapshot.n || 0) + 1;
  if (n <= kinds.length) {
    this.emit('updateSnapshot', { n });
    this.emit('data', messages.newMessageWithBody({ n, kind: kinds[n - 1] }));
  }
  this.emit('end');
};
"""

EVENTS_JS = """\
'use strict';
const { messages } = require('elasticio-node');
const rebounded = new Set();

exports.process = function processAction(msg, cfg, snapshot) {
  const { n, kind } = msg.body;
  const seen = Object.keys(snapshot).sort();
  const out = (extra) => messages.newMessageWithBody(Object.assign({ n, kind, seen }, extra));
  this.emit('updateSnapshot', { [kind]: n });
  switch (kind) {
    case 'callback': // several data events, the end from a later tick
      this.emit('data', out({ part: 1 }));
      setTimeout(() => {
        this.emit('data', out({ part: 2 }));
        this.emit('end');
      }, 10);
      return undefined;
    case 'plain': // a plain object is the body
      this.emit('data', { n, kind, plain: true });
      this.emit('end');
      return undefined;
    case 'promise': // a resolved value: data, then end
      return new Promise((resolve) => setTimeout(() => resolve(out({})), 10));
    case 'async': // an async function that emits itself and resolves empty: end
      return (async () => {
        this.emit('data', out({}));
      })();
    case 'error':
      this.emit('error', new Error(`boom ${n}`));
      this.emit('end');
      return undefined;
    case 'reject':
      return Promise.reject(new Error(`rejected ${n}`));
    case 'throw':
      throw new Error(`thrown ${n}`);
    case 'rebound': // not now: deliver it again later
      if (!rebounded.has(msg.id)) {
        rebounded.add(msg.id);
        this.emit('rebound', new Error('not yet'));
        return undefined;
      }
      this.emit('data', out({ redelivered: true }));
      this.emit('end');
      return undefined;
    case 'noend': // forgets to end: finished anyway after daemon.node_end_timeout
      this.emit('data', out({}));
      return undefined;
    case 'print': // what the code prints never reaches the protocol
      console.log('{"t":"done","ref":12345}');
      process.stdout.write('{"t":"data","body":{"forged":true}}\\n');
      console.error('stderr too');
      this.emit('data', out({}));
      this.emit('end');
      return undefined;
    default:
      this.emit('data', out({}));
      this.emit('end');
      return undefined;
  }
};
"""

# The README's pitfall, in JavaScript. `source` stands for a client library's connection,
# created once per process; process() is called again and again in that same process.
UNGUARDED_JS = """\
'use strict';
const { EventEmitter } = require('events');
const { messages } = require('elasticio-node');
const source = new EventEmitter();
let calls = 0;

exports.process = function processTrigger() {
  calls += 1;
  // WRONG: one more listener on every call
  source.on('event', (e) => this.emit('data', messages.newMessageWithBody(e)));
  source.emit('event', { call: calls, listeners: source.listenerCount('event') });
  this.emit('end');
};
"""

GUARDED_JS = """\
'use strict';
const { EventEmitter } = require('events');
const { messages } = require('elasticio-node');
const source = new EventEmitter();
let calls = 0;
let listener;

exports.process = function processTrigger() {
  calls += 1;
  if (!listener) {
    // RIGHT: created once per process
    listener = (e) => this.emit('data', messages.newMessageWithBody(e));
    source.on('event', listener);
  }
  source.emit('event', { call: calls, listeners: source.listenerCount('event') });
  this.emit('end');
};
"""

SMOKE_JS = """\
'use strict';
// `npm test`: the modules load (elasticio-node resolves through deployd's NODE_PATH).
for (const m of ['triggers/counter', 'actions/write', 'actions/events']) {
  if (typeof require(`../lib/${m}.js`).process !== 'function') {
    console.error(`${m} exports no process()`);
    process.exit(1);
  }
}
console.log('smoke ok');
"""


def write_js(tag: str) -> str:
    """Promise style: an async process() whose returned message is emitted as data."""
    return f"""\
'use strict';
const fs = require('fs');
const {{ messages }} = require('elasticio-node');
const TAG = {json.dumps(tag)};

exports.process = async function processAction(msg, cfg) {{
  const line = Object.assign({{}}, msg.body, {{ by: TAG }});
  fs.appendFileSync(cfg.out, JSON.stringify(line) + '\\n');
  return messages.newMessageWithBody(line);
}};
"""


def platform_files(tag: str = "v1", **overrides: Any) -> dict[str, Any]:
    files: dict[str, Any] = {
        "component.json": COMPONENT_JSON,
        "package.json": PACKAGE_JSON,
        "package-lock.json": PACKAGE_LOCK,
        "lib/triggers/counter.js": COUNTER_JS,
        "lib/triggers/script.js": SCRIPT_JS,
        "lib/triggers/unguarded.js": UNGUARDED_JS,
        "lib/triggers/guarded.js": GUARDED_JS,
        "lib/actions/write.js": write_js(tag),
        "lib/actions/events.js": EVENTS_JS,
        "test/smoke.js": SMOKE_JS,
        ".gitignore": "node_modules/\n",
    }
    files.update(overrides)
    return files


PY_WRITE = """\
import json

def process(msg, cfg):
    line = {**msg["body"], "by": "python"}
    with open(cfg["out"], "a") as fh:
        fh.write(json.dumps(line) + "\\n")
    return line
"""

PY_COMPONENT: dict[str, Any] = {
    "component.json": {
        "title": "Python helper",
        "runtime": "python",
        "triggers": {"tick": {"main": "./lib/tick.py"}},
        "actions": {"write": {"main": "./lib/write.py", "fields": {"out": {"required": True}}}},
    },
    "lib/tick.py": "def process(msg, cfg, snapshot, ctx):\n    return {}\n",
    "lib/write.py": PY_WRITE,
}


def flow_text(name: str, steps: list[dict[str, Any]]) -> str:
    """A flow file (update = "auto") with these steps."""
    return flow_toml(name, Path(os.devnull), steps=steps)


@dataclass
class NodeEnv:
    """A running daemon hosting the platform-style component `platform` (and `pyhelp`)."""

    daemon: Daemon
    work: Work
    tmp: Path

    def push(self, files: dict[str, Any] | None = None, message: str = "change") -> str:
        sha = self.work.commit(message, files)
        self.work.push(self.daemon.hosted("platform"))
        self.daemon.wait_recent("platform", sha, timeout=40)
        return sha

    def out(self, name: str) -> Path:
        return self.tmp / f"{name}.jsonl"

    def apply(self, name: str, steps: list[dict[str, Any]], check: bool = True) -> Any:
        path = self.tmp / f"{name}.toml"
        path.write_text(flow_text(name, steps))
        return self.daemon.cli("flow", "apply", str(path), check=check)

    def flow(self, name: str) -> dict[str, Any]:
        for f in self.daemon.status()["flows"]:
            if f["name"] == name:
                return dict(f)
        raise AssertionError(f"flow {name} not in status")

    def stats(self, flow: str, step: str) -> dict[str, Any]:
        rows = db_rows(
            self.daemon.state_dir,
            "SELECT * FROM step_stats WHERE flow = ? AND step = ?",
            flow,
            step,
        )
        return rows[0] if rows else {}

    def snapshot(self, flow: str, step: str) -> dict[str, Any]:
        rows = db_rows(
            self.daemon.state_dir,
            "SELECT data FROM snapshots WHERE flow = ? AND step = ?",
            flow,
            step,
        )
        return dict(json.loads(rows[0]["data"])) if rows else {}

    def step_log(self, flow: str, step: str) -> str:
        path = self.daemon.state_dir / "logs" / "steps" / flow / f"{step}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def wait_rows(
        self, out: Path, cond: Callable[[list[dict[str, Any]]], Any], timeout: float = 30
    ):
        return wait_until(lambda: cond(read_out(out)), timeout=timeout, interval=0.05)


@pytest.fixture
def shared_node_env(shared_daemon: SharedDaemons, tmp_path: Path) -> Callable[..., NodeEnv]:
    """shared_node_env(**daemon_keys) → node_env's NodeEnv on the test module's shared daemon
    (tests/conftest.py's SharedDaemons): for tests that leave the daemon running as it is and
    push to neither component. The test's flows are stopped at its end."""

    def make(**daemon_keys: Any) -> NodeEnv:
        d = shared_daemon.daemon(**daemon_keys)
        work = shared_daemon.component(d, "platform", platform_files())
        shared_daemon.component(d, "pyhelp", PY_COMPONENT)
        return NodeEnv(d, work, tmp_path)

    return make


@pytest.fixture
def node_env(
    daemon_factory: Callable[..., Daemon],
    component: Callable[..., Work],
    tmp_path: Path,
) -> Callable[..., NodeEnv]:
    """node_env(**daemon_keys) → a started daemon with `platform` v1 built by npm."""

    def make(**daemon_keys: Any) -> NodeEnv:
        work = component("platform")
        work.commit("platform-style component", platform_files())
        py = component("pyhelp")
        py.commit("python helper", PY_COMPONENT)
        d = daemon_factory([{"name": "platform"}, {"name": "pyhelp"}], **daemon_keys).start()
        env = NodeEnv(d, work, tmp_path)
        sha = work.push(d.hosted("platform"))
        py_sha = py.push(d.hosted("pyhelp"))
        d.wait_recent("platform", sha, timeout=40)
        d.wait_recent("pyhelp", py_sha, timeout=40)
        return env

    return make
