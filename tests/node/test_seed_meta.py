"""Dynamic metadata, end to end: `deployd component call` and flow validation by getMetaModel.

A Node component and a Python component of our own, pushed for real, declare
`"dynamicMetadata": true` and select fields with `"model": "<method>"`; the CLI (through the
daemon's HTTP API) runs those verbs in one-off step processes and prints what they return.
A flow whose dynamic step requires an input field nothing provides is refused on apply, and
a push that makes it so leaves the flow needing attention while the old version runs on.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import HTTP, Daemon, SharedDaemons, Work, wait_until
from tests.flows.conftest import read_out
from tests.node.conftest import PACKAGE_JSON, PACKAGE_LOCK

NODE_DESC: dict[str, Any] = {
    "title": "Metadata probe",
    "triggers": {
        "tick": {
            "main": "./lib/tick.js",
            "metadata": {"out": {"type": "object", "properties": {"n": {"type": "number"}}}},
        }
    },
    "actions": {
        "lookup": {
            "main": "./lib/lookup.js",
            "dynamicMetadata": True,
            "fields": {
                "table": {
                    "label": "Table",
                    "required": True,
                    "viewClass": "SelectView",
                    "model": "getTables",
                },
                "out": {"label": "Output file", "required": True},
            },
        }
    },
}

TICK_JS = """\
'use strict';
exports.process = async function tick(msg, cfg, snapshot) {
  const n = (snapshot.n || 0) + 1;
  if (n > 3) return undefined;
  await this.emit('snapshot', { n });
  return { body: { n } };
};
"""

# getMetaModel returns a promise; getTables uses the callback, as platform components do.
LOOKUP_JS = """\
'use strict';
const fs = require('fs');

exports.process = async function lookup(msg, cfg) {
  fs.appendFileSync(cfg.out, JSON.stringify(msg.body) + '\\n');
  return { body: { ...msg.body, found: true } };
};

exports.getMetaModel = async function getMetaModel(cfg) {
  if (cfg.table === 'boom') throw new Error('no such table: boom\\nsecond line');
  if (cfg.table === 'hang') return new Promise(() => {});
  const properties = { n: { type: 'number', required: true } };
  if (cfg.table === 'customers') properties.customerId = { type: 'string', required: true };
  if (cfg.table === 'customers' && process.env.META_V2) properties.region = { type: 'string' };
  return {
    in: {
      type: 'object',
      properties,
      required: Object.keys(properties).filter((k) => k === 'region' || properties[k].required),
    },
    out: { type: 'object', properties: { ...properties, found: { type: 'boolean' } } },
  };
};

exports.getTables = function getTables(cfg, callback) {
  this.logger.info('listing tables in %s', cfg.region);
  if (!String(cfg.apiKey || '').startsWith('k-')) return callback(new Error('bad api key'));
  callback(null, { customers: 'Customers (' + cfg.region + ')', orders: 'Orders' });
};
"""

PY_DESC: dict[str, Any] = {
    "title": "Python metadata probe",
    "runtime": "python",
    "triggers": {"tick": {"main": "./lib/tick.py"}},
    "actions": {
        "weigh": {
            "main": "./lib/weigh.py",
            "dynamicMetadata": True,
            "fields": {
                "unit": {"label": "Unit", "viewClass": "SelectView", "model": "list_units"},
                "size": {"label": "Size", "viewClass": "SelectView", "model": "list_sizes"},
                "shelf": {"label": "Shelf", "viewClass": "SelectView", "model": "listShelves"},
            },
        }
    },
}

PY_WEIGH = """\
def process(msg, cfg):
    return msg["body"]


def get_meta_model(cfg):
    return {
        "in": {"type": "object", "required": ["sku"], "properties": {"sku": {"type": "string"}}},
        "out": {"type": "object", "properties": {"grams": {"type": "number"}}},
    }


def list_shelves(cfg):
    raise LookupError("no shelves in " + cfg.get("market", "?") + "\\nmore")


async def list_units(cfg, ctx):
    ctx.log.info("units for %s", cfg.get("market"))
    return {"kg": "Kilogram", "g": "Gram"}
"""


NODE_FILES: dict[str, Any] = {
    "component.json": NODE_DESC,
    "package.json": {**PACKAGE_JSON, "scripts": {}},
    "package-lock.json": PACKAGE_LOCK,
    "lib/tick.js": TICK_JS,
    "lib/lookup.js": LOOKUP_JS,
    ".gitignore": "node_modules/\n",
}
PY_FILES: dict[str, Any] = {
    "component.json": PY_DESC,
    "lib/tick.py": "def process(msg, cfg):\n    return None\n",
    "lib/weigh.py": PY_WEIGH,
}
# The API key of the module's shared daemon (in its environment as META_API_KEY)
SHARED_SECRET = f"k-{uuid.uuid4().hex}"


@pytest.fixture
def meta(shared_daemon: SharedDaemons) -> MetaEnv:
    """Both probes at v1 on the module's shared daemon: for tests that call them, push to
    neither and leave the daemon running."""
    d = shared_daemon.daemon({"META_API_KEY": SHARED_SECRET})
    node = shared_daemon.component(d, "metanode", NODE_FILES)
    shared_daemon.component(d, "metapy", PY_FILES)
    return MetaEnv(d, node, SHARED_SECRET)


@pytest.fixture
def own_meta(daemon_factory: Callable[..., Daemon], component: Callable[..., Work]) -> MetaEnv:
    """Both probes at v1 on a daemon of the test's own: for a test that pushes."""
    node = component("metanode")
    node.commit("metadata probe", NODE_FILES)
    py = component("metapy")
    py.commit("python probe", PY_FILES)
    d = daemon_factory([{"name": "metanode"}, {"name": "metapy"}])
    secret = f"k-{uuid.uuid4().hex}"
    d.env["META_API_KEY"] = secret
    d.start()
    d.wait_recent("metanode", node.push(d.hosted("metanode")), timeout=60)
    d.wait_recent("metapy", py.push(d.hosted("metapy")), timeout=60)
    return MetaEnv(d, node, secret)


class MetaEnv:
    def __init__(self, daemon: Daemon, node: Work, secret: str) -> None:
        self.d, self.node, self.secret = daemon, node, secret

    def cfg(self, tmp: Path, data: Any, name: str = "cfg.json") -> str:
        path = tmp / name
        path.write_text(json.dumps(data))
        return str(path)

    def call(self, *args: str, check: bool = True) -> Any:
        return self.d.cli("component", "call", *args, check=check)

    def calls_started(self) -> int:
        """How many one-off service processes of metanode were started (log headers)."""
        log = self.d.state_dir / "logs" / "steps" / "_calls" / "metanode.log"
        return log.read_text().count("--- deployd: starting step") if log.exists() else 0


def test_component_call_prints_metadata_and_select_models_node_and_python(
    meta: MetaEnv, tmp_path: Path
) -> None:
    cfg = meta.cfg(tmp_path, {"table": "customers", "region": "eu", "apiKey": "${META_API_KEY}"})
    res = meta.call("metanode", "getMetaModel", "--function", "lookup", "--config", cfg)
    model = json.loads(res.stdout)
    assert model["in"]["properties"]["customerId"] == {"type": "string", "required": True}
    assert model["in"]["required"] == ["n", "customerId"]

    data = json.loads(
        meta.call("metanode", "getMetaModel", "-f", "lookup", "--cfg", cfg, "--json").stdout
    )
    assert (data["component"], data["version"], data["function"], data["method"]) == (
        "metanode",
        1,
        "lookup",
        "getMetaModel",
    )
    assert data["result"] == model

    # a select model: by the field's name (selectModel --field) or the method's own name;
    # the callback style; the ${VAR} secret expanded by the daemon (else "bad api key")
    text = meta.call("metanode", "selectModel", "-f", "lookup", "--field", "table", "--cfg", cfg)
    assert text.stdout.splitlines() == ["customers  Customers (eu)", "orders     Orders"]
    same = meta.call("metanode", "getTables", "-f", "lookup", "--cfg", cfg, "--json")
    assert json.loads(same.stdout)["result"] == {"customers": "Customers (eu)", "orders": "Orders"}
    assert (
        "listing tables in eu"
        in (meta.d.state_dir / "logs" / "steps" / "_calls" / "metanode.log").read_text()
    )
    assert meta.secret not in meta.d.log()
    assert (
        meta.secret
        not in (meta.d.state_dir / "logs" / "steps" / "_calls" / "metanode.log").read_text()
    )

    # Python: getMetaModel is get_meta_model(cfg); a model method may be a coroutine taking ctx
    py = json.loads(meta.call("metapy", "getMetaModel", "-f", "weigh", "--json").stdout)
    assert py["result"]["in"]["required"] == ["sku"]
    units = meta.call("metapy", "selectModel", "-f", "weigh", "--field", "unit")
    assert units.stdout.splitlines() == ["kg  Kilogram", "g   Gram"]
    assert json.loads(meta.call("metapy", "list_units", "-f", "weigh", "--json").stdout)[
        "result"
    ] == {"kg": "Kilogram", "g": "Gram"}

    # the route needs the token, like every inspecting or mutating one
    resp = HTTP.post(
        meta.d.url + "/api/v1/components/metanode/call",
        json={"method": "getMetaModel", "function": "lookup"},
    )
    assert resp.status_code == 401


def test_component_call_errors_are_clear_and_exit_non_zero(meta: MetaEnv, tmp_path: Path) -> None:
    good = meta.cfg(tmp_path, {"table": "orders"})
    token = (meta.d.state_dir / "api-token").read_text().strip()

    def http(name: str, **body: Any) -> tuple[int, str]:
        resp = HTTP.post(
            f"{meta.d.url}/api/v1/components/{name}/call",
            json={"method": "getMetaModel", "function": "lookup", **body},
            headers={"Authorization": f"Bearer {token}"},
            timeout=60,
        )
        return resp.status_code, str(resp.json()["detail"])

    cases: list[tuple[tuple[str, ...], str, tuple[int, dict[str, Any], str]]] = [
        (("nope", "getMetaModel", "-f", "lookup"), "unknown component 'nope'", (404, {}, "nope")),
        (
            ("metanode", "getMetaModel", "-f", "lookup", "--version", "7"),
            "metanode has no v7",
            (404, {"version": 7}, "metanode"),
        ),
        (
            ("metanode", "getMetaModel", "-f", "nosuch"),
            "metanode v1 has no function 'nosuch' (triggers: tick; actions: lookup)",
            (422, {"function": "nosuch"}, "metanode"),
        ),
        (
            ("metanode", "process", "-f", "lookup"),
            "unknown method 'process' for metanode v1 lookup (its methods: getMetaModel, getTables",
            (422, {"method": "process"}, "metanode"),
        ),
        (
            ("metanode", "selectModel", "-f", "lookup"),
            "selectModel needs the field whose choices to list: --field NAME (fields of "
            'metanode v1 lookup with a "model" method: table (getTables))',
            (422, {"method": "selectModel"}, "metanode"),
        ),
    ]
    for args, words, (status, body, name) in cases:
        res = meta.call(*args, "--cfg", good, check=False)
        assert res.returncode == 1, res
        assert res.stderr.startswith("deployd: error: ") and words in res.stderr, res.stderr
        code, detail = http(name, **body)
        assert code == status and words in detail, (code, detail)

    # the method throws: its first line, exit 1 (HTTP 502)
    boom = meta.cfg(tmp_path, {"table": "boom"}, "boom.json")
    res = meta.call("metanode", "getMetaModel", "-f", "lookup", "--cfg", boom, check=False)
    assert res.returncode == 1
    assert "getMetaModel of metanode v1 lookup failed: Error: no such table: boom" in res.stderr
    assert "second line" not in res.stderr
    assert http("metanode", config={"table": "boom"})[0] == 502
    # a callback called with an error
    bad_key = meta.cfg(tmp_path, {"region": "eu", "apiKey": "nope"}, "key.json")
    res = meta.call("metanode", "getTables", "-f", "lookup", "--cfg", bad_key, check=False)
    assert res.returncode == 1 and "failed: Error: bad api key" in res.stderr

    # Python: a model method component.json names but the module lacks; one that raises
    res = meta.call("metapy", "selectModel", "-f", "weigh", "--field", "size", check=False)
    assert res.returncode == 1
    assert (
        'list_sizes of metapy v1 weigh failed: AttributeError: Method "list_sizes" is not '
        'found in "weigh" action or trigger (./lib/weigh.py defines no list_sizes)'
    ) in res.stderr
    shelf = meta.cfg(tmp_path, {"market": "de"}, "shelf.json")
    res = meta.call("metapy", "listShelves", "-f", "weigh", "--cfg", shelf, check=False)
    assert res.returncode == 1
    assert "listShelves of metapy v1 weigh failed: LookupError: no shelves in de" in res.stderr
    assert "more" not in res.stderr

    # a method that never answers: stopped after --timeout, a clear message (HTTP 504)
    hang = meta.cfg(tmp_path, {"table": "hang"}, "hang.json")
    res = meta.call(
        "metanode", "getMetaModel", "-f", "lookup", "--cfg", hang, "--timeout", "2", check=False
    )
    assert res.returncode == 1
    assert "getMetaModel of metanode v1 lookup did not answer within 2s" in res.stderr
    assert http("metanode", config={"table": "hang"}, timeout=1)[0] == 504
    # … and the daemon answers the next call at once
    assert json.loads(meta.call("metanode", "getMetaModel", "-f", "lookup", "--cfg", good).stdout)

    # bad cfg files and secrets: named, exit 2 / 1, nothing run
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    res = meta.call("metanode", "getMetaModel", "-f", "lookup", "--cfg", str(broken), check=False)
    assert res.returncode == 2 and "--cfg" in res.stderr and "is not valid JSON" in res.stderr
    arr = meta.cfg(tmp_path, [1, 2], "arr.json")
    res = meta.call("metanode", "getMetaModel", "-f", "lookup", "--cfg", arr, check=False)
    assert res.returncode == 2 and "must hold an object" in res.stderr
    for ref, words in (
        ("${META_UNSET}", "cfg.apiKey: environment variable META_UNSET is not set"),
        ("${DEPLOYD_API_TOKEN}", "cfg.apiKey: ${DEPLOYD_API_TOKEN} is one of deployd's own"),
    ):
        path = meta.cfg(tmp_path, {"apiKey": ref}, "ref.json")
        res = meta.call("metanode", "getTables", "-f", "lookup", "--cfg", path, check=False)
        assert res.returncode == 1 and words in res.stderr, res.stderr


def _flow(tmp: Path, name: str, table: str, out: Path, mapping: str | None = None) -> Path:
    text = f"""\
name = "{name}"

[[steps]]
id = "tick"
component = "metanode"
function = "tick"
interval = "50ms"

[[steps]]
id = "lookup"
component = "metanode"
function = "lookup"
config = {{ table = "{table}", out = "{out}" }}
"""
    if mapping is not None:
        text += f"mapping = '{mapping}'\n"
    path = tmp / f"{name}.toml"
    path.write_text(text)
    return path


def test_flow_validation_uses_get_meta_model_for_required_input_fields(
    own_meta: MetaEnv, tmp_path: Path
) -> None:
    meta = own_meta  # it pushes metanode v2, and counts the calls' processes from the start
    d, out = meta.d, tmp_path / "out.jsonl"
    # the trigger's out schema has only n; getMetaModel(customers) requires customerId too
    res = d.cli("flow", "apply", str(_flow(tmp_path, "crm", "customers", out)), check=False)
    assert res.returncode != 0
    assert (
        "step lookup: input field 'customerId' is required by the dynamic metadata of "
        "metanode v1 lookup (getMetaModel) but step tick (metanode tick) does not provide it"
    ) in res.stderr
    assert "'n'" not in res.stderr  # n is provided
    # a getMetaModel that fails: the reason, not a blind publish
    res = d.cli("flow", "apply", str(_flow(tmp_path, "crm", "boom", out)), check=False)
    assert res.returncode != 0
    assert "step lookup: the dynamic metadata of metanode v1 is unknown: getMetaModel" in res.stderr
    assert "no such table: boom" in res.stderr
    assert d.status()["flows"] == []  # nothing half-written
    started = meta.calls_started()
    assert started == 2  # customers (answered, cached) and boom (failed, not cached)

    # a mapping that provides it: valid, published and running; getMetaModel's answer for
    # this (version, function, cfg) was cached: no process started for it again
    mapping = '{"n": n, "customerId": "c-" & $string(n)}'
    d.cli("flow", "apply", str(_flow(tmp_path, "crm", "customers", out, mapping)))
    rows = wait_until(lambda: len(r := read_out(out)) >= 3 and r, timeout=60)
    assert rows[0] == {"n": 1, "customerId": "c-1"}
    d.cli("flow", "apply", "--draft", str(_flow(tmp_path, "crm", "customers", out, mapping)))
    assert meta.calls_started() == started

    # a new version whose getMetaModel also requires region: the flow needs attention with
    # the reason, and v1 runs on
    js = LOOKUP_JS.replace("process.env.META_V2", "true")
    sha = meta.node.commit("region is required", {"lib/lookup.js": js})
    meta.node.push(d.hosted("metanode"))
    d.wait_recent("metanode", sha, timeout=60)

    def attention() -> Any:
        for f in d.status()["flows"]:
            if f["name"] == "crm" and f.get("needs_attention"):
                return f
        return None

    flow = wait_until(attention, timeout=60)
    assert flow["needs_attention"] == (
        "step lookup: input field 'region' is required by the dynamic metadata of metanode v2 "
        "lookup (getMetaModel) but its mapping does not provide it; map it in the step's mapping"
    )
    assert flow["version"] == 1
