"""Credentials end to end (issue 17): [[credentials]] of the config, a step's `credential`,
`deployd credential verify` / `list`, and `emit('updateKeys')` kept encrypted across restarts.

Components of our own, pushed for real: `cnode` (Node, `credentials.fields` with a required
`apiKey`, a callback-style verifyCredentials.js), `cpy` (Python, a verifier named by
component.json `credentials.verifier`) and `plain` (credentials, no verifier). Their `write`
actions append the cfg they got to an out file (the test's own file: the secrets' only way
out) and emit refreshed keys once per process when they have none yet.
"""

from __future__ import annotations

import base64
import json
import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import HTTP, Daemon, Work, db_rows, wait_until
from tests.flows.conftest import flow_toml, read_out
from tests.node.conftest import PACKAGE_JSON, PACKAGE_LOCK

NODE_DESC: dict[str, Any] = {
    "title": "Credential probe (Node)",
    "credentials": {
        "fields": {
            "apiKey": {"label": "API key", "required": True, "viewClass": "PasswordFieldView"},
            "region": {"label": "Region", "viewClass": "TextFieldView"},
        }
    },
    "triggers": {"tick": {"main": "./lib/tick.js"}},
    "actions": {
        "write": {
            "main": "./lib/write.js",
            "fields": {
                "out": {"required": True},
                "account": {"label": "Account", "viewClass": "SelectView", "model": "listAccounts"},
            },
        }
    },
}

TICK_JS = """\
'use strict';
exports.process = async function tick(msg, cfg, snapshot) {
  const n = (snapshot.n || 0) + 1;
  await this.emit('snapshot', { n });
  return { body: { n } };
};
"""

# Refreshes its token once per process when the credential has none yet (an OAuth client).
WRITE_JS = """\
'use strict';
const fs = require('fs');
const crypto = require('crypto');
let refreshed = null;

exports.process = async function write(msg, cfg) {
  let emitted = null;
  if (!cfg.token && !refreshed) {
    refreshed = emitted = 'tok-' + crypto.randomUUID();
    await this.emit('updateKeys', { token: emitted });
  }
  const line = { n: msg.body.n, apiKey: cfg.apiKey, region: cfg.region, account: cfg._account,
    token: cfg.token || null, emitted };
  fs.appendFileSync(cfg.out, JSON.stringify(line) + '\\n');
  return { body: { n: msg.body.n } };
};

exports.listAccounts = async function listAccounts(cfg) {
  if (!String(cfg.apiKey || '').startsWith('k-')) throw new Error('no api key');
  return { [cfg._account]: `Account in ${cfg.region}` };
};
"""

VERIFY_JS = """\
'use strict';
module.exports = function verifyCredentials(cfg, cb) {
  this.logger.info('verifying for region %s', cfg.region);
  if (!String(cfg.apiKey || '').startsWith('k-')) {
    return cb(new Error(`api key refused in ${cfg.region}`));
  }
  return cb(null, { verified: true });
};
"""

PY_DESC: dict[str, Any] = {
    "title": "Credential probe (Python)",
    "runtime": "python",
    "credentials": {"fields": {"token": {"required": True}}, "verifier": "./lib/check.py"},
    "triggers": {"tick": {"main": "./lib/tick.py"}},
    "actions": {"write": {"main": "./lib/write.py", "fields": {"out": {"required": True}}}},
}

PY_TICK = """\
def process(msg, cfg, snapshot, ctx):
    n = snapshot.get("n", 0) + 1
    ctx.emit("snapshot", {"n": n})
    return {"n": n}
"""

PY_WRITE = """\
import json
import uuid

REFRESHED = None


def process(msg, cfg, snapshot, ctx):
    global REFRESHED
    emitted = None
    if cfg.get("session") is None and REFRESHED is None:
        REFRESHED = emitted = "ses-" + uuid.uuid4().hex
        ctx.emit("updateKeys", {"session": emitted})
    line = {
        "n": msg["body"]["n"],
        "token": cfg.get("token"),
        "session": cfg.get("session"),
        "account": cfg.get("_account"),
        "emitted": emitted,
    }
    with open(cfg["out"], "a") as fh:
        fh.write(json.dumps(line) + "\\n")
    return {"n": msg["body"]["n"]}
"""

PY_CHECK = """\
def verify_credentials(cfg, ctx):
    ctx.log.info("checking a token of %d characters", len(cfg["token"]))
    if cfg["token"].startswith("t-"):
        return {"verified": True}
    raise PermissionError("token refused by the server")
"""

CREDENTIALS_TOML = """\
[[credentials]]
name = "node-good"
component = "cnode"
fields = { apiKey = "${CRED_NODE_KEY}", region = "eu" }

[[credentials]]
name = "node-bad"
component = "cnode"
fields = { apiKey = "wrong", region = "us" }

[[credentials]]
name = "node-nokey"
component = "cnode"
fields = { region = "eu" }

[[credentials]]
name = "py-good"
component = "cpy"
fields = { token = "${CRED_PY_TOKEN}" }

[[credentials]]
name = "py-bad"
component = "cpy"
fields = { token = "x-nope" }

[[credentials]]
name = "py-empty"
component = "cpy"

[[credentials]]
name = "plain-cred"
component = "plain"
fields = { token = "t-plain" }
"""


def py_files(verifier: bool = True) -> dict[str, Any]:
    desc = json.loads(json.dumps(PY_DESC))
    files: dict[str, Any] = {"lib/tick.py": PY_TICK, "lib/write.py": PY_WRITE}
    if verifier:
        files["lib/check.py"] = PY_CHECK
    else:
        desc["title"] = "Credentials, no verifier"
        del desc["credentials"]["verifier"]
    return {"component.json": desc, **files}


@dataclass
class CredEnv:
    d: Daemon
    tmp: Path
    node_key: str
    py_token: str

    def cli(self, *args: str, check: bool = True) -> Any:
        return self.d.cli(*args, check=check)

    def apply(self, name: str, steps: list[dict[str, Any]], check: bool = True) -> Any:
        path = self.tmp / f"{name}.toml"
        path.write_text(flow_toml(name, self.tmp / "unused", steps=steps))
        return self.cli("flow", "apply", str(path), check=check)

    def step_log(self, flow: str, step: str) -> str:
        path = self.d.state_dir / "logs" / "steps" / flow / f"{step}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def all_logs(self) -> str:
        logs = [self.d.log()]
        for path in (self.d.state_dir / "logs").rglob("*.log"):
            logs.append(path.read_text(errors="replace"))
        return "\n".join(logs)

    def db_bytes(self) -> bytes:
        return b"".join(p.read_bytes() for p in self.d.state_dir.glob("deployd.db*"))


@pytest.fixture
def make_creds(
    daemon_factory: Callable[..., Daemon], component: Callable[..., Work], tmp_path: Path
) -> Callable[..., CredEnv]:
    """make_creds(node=True, secret_key=True) → a daemon with cnode (Node), cpy and plain
    (Python) registered, the credentials above configured."""

    def make(node: bool = True, secret_key: bool = True) -> CredEnv:
        works: dict[str, Work] = {}
        if node:
            works["cnode"] = component("cnode")
            works["cnode"].commit(
                "credential probe",
                {
                    "component.json": NODE_DESC,
                    "package.json": {**PACKAGE_JSON, "scripts": {}},
                    "package-lock.json": PACKAGE_LOCK,
                    "lib/tick.js": TICK_JS,
                    "lib/write.js": WRITE_JS,
                    "verifyCredentials.js": VERIFY_JS,
                    ".gitignore": "node_modules/\n",
                },
            )
        works["cpy"] = component("cpy")
        works["cpy"].commit("python probe", py_files())
        works["plain"] = component("plain")
        works["plain"].commit("no verifier", py_files(verifier=False))
        creds = CREDENTIALS_TOML
        if not node:  # a credential of a component that is not configured is refused
            creds = "\n\n".join(t for t in creds.split("\n\n") if '"cnode"' not in t)
        extra: dict[str, Any] = {"node_pool": 2 if node else 0}
        if secret_key:
            extra["secret_key"] = "${DEPLOYD_SECRET_KEY}"
        d = daemon_factory([{"name": n} for n in works], extra_toml=creds, **extra)
        env = CredEnv(d, tmp_path, f"k-{uuid.uuid4().hex}", f"t-{uuid.uuid4().hex}")
        d.env.update(
            {
                "CRED_NODE_KEY": env.node_key,
                "CRED_PY_TOKEN": env.py_token,
                "DEPLOYD_SECRET_KEY": base64.urlsafe_b64encode(os.urandom(32)).decode(),
            }
        )
        d.start()
        for name, work in works.items():
            d.wait_recent(name, work.push(d.hosted(name)), timeout=90)
        return env

    return make


def flow_steps(comp: str, out: Path, credential: str | None, **config: str) -> list[dict[str, Any]]:
    write: dict[str, Any] = {
        "id": "write",
        "component": comp,
        "function": "write",
        "config": {"out": out, **config},
    }
    if credential is not None:
        write["credential"] = credential
    return [{"id": "tick", "component": comp, "function": "tick", "interval": "100ms"}, write]


@pytest.mark.timeout(300)  # three builds, two flows and a daemon restart on a small machine
def test_credential_reaches_cfg_and_refreshed_keys_are_kept_encrypted_across_a_restart(
    make_creds: Callable[..., CredEnv], tmp_path: Path
) -> None:
    env = make_creds()
    nout, pout = tmp_path / "node.jsonl", tmp_path / "py.jsonl"
    # the step's own region loses to the credential's: the account is merged over cfg
    env.apply("nflow", flow_steps("cnode", nout, "node-good", region="us"))
    env.apply("pflow", flow_steps("cpy", pout, "py-good"))
    wait_until(lambda: len(read_out(nout)) >= 3 and len(read_out(pout)) >= 3, timeout=60)

    first = read_out(nout)[0]
    assert (first["apiKey"], first["region"], first["account"]) == (
        env.node_key,
        "eu",
        "node-good",
    )
    assert first["token"] is None and first["emitted"].startswith("tok-")
    refreshed_node = first["emitted"]
    pfirst = read_out(pout)[0]
    assert (pfirst["token"], pfirst["account"], pfirst["session"]) == (
        env.py_token,
        "py-good",
        None,
    )
    refreshed_py = pfirst["emitted"]
    assert [r["n"] for r in read_out(nout)][:3] == [1, 2, 3]  # nothing lost to the emit

    rows = wait_until(
        lambda: (
            (r := db_rows(env.d.state_dir, "SELECT * FROM credential_keys ORDER BY name"))
            and len(r) == 2
            and r
        ),
        timeout=30,
    )
    assert [(r["name"], r["component"], json.loads(r["fields"])) for r in rows] == [
        ("node-good", "cnode", ["token"]),
        ("py-good", "cpy", ["session"]),
    ]
    assert "the keys token of credential node-good were stored (encrypted)" in env.step_log(
        "nflow", "write"
    )
    assert "the keys session of credential py-good were stored (encrypted)" in env.step_log(
        "pflow", "write"
    )

    listed = env.cli("credential", "list", "--json").stdout
    by_name = {c["name"]: c for c in json.loads(listed)}
    assert by_name["node-good"]["component"] == "cnode"
    assert by_name["node-good"]["fields"] == ["apiKey", "region"]
    assert by_name["node-good"]["refreshed"]["fields"] == ["token"]
    assert by_name["node-bad"]["refreshed"] is None
    table = env.cli("credential", "list").stdout
    assert "node-good" in table and "REFRESHED KEYS" in table

    secrets = [env.node_key, env.py_token, refreshed_node, refreshed_py]
    shown = "\n".join(
        [
            listed,
            table,
            json.dumps(env.d.status()),
            env.cli("status").stdout,
            env.cli("flow", "show", "nflow", "--json").stdout,
            env.cli("check-config").stdout,
        ]
    )
    logs, db = env.all_logs(), env.db_bytes()
    for value in secrets:
        assert value not in shown
        assert value not in logs
        assert value.encode() not in db

    # the platform re-reads the account when a step starts: so does deployd, after a restart
    env.d.stop()
    env.d.start()
    wait_until(lambda: any(r["token"] == refreshed_node for r in read_out(nout)), timeout=60)
    wait_until(lambda: any(r["session"] == refreshed_py for r in read_out(pout)), timeout=60)
    after = [r for r in read_out(nout) if r["token"] == refreshed_node]
    assert after[0]["apiKey"] == env.node_key and after[0]["emitted"] is None
    for value in secrets:
        assert value not in env.all_logs()
        assert value.encode() not in env.db_bytes()


@pytest.mark.timeout(300)
def test_credential_verify_runs_the_components_verifier(
    make_creds: Callable[..., CredEnv],
) -> None:
    env = make_creds()

    def verify(*args: str) -> Any:
        return env.cli("credential", "verify", *args, check=False)

    ok = verify("node-good")
    assert (ok.returncode, ok.stdout.strip()) == (0, "verified"), ok.stderr
    bad = verify("node-bad")
    assert (bad.returncode, bad.stdout.strip()) == (1, "not verified: api key refused in us")
    assert verify("py-good").returncode == 0
    pbad = verify("py-bad")
    assert (pbad.returncode, pbad.stdout.strip()) == (
        1,
        "not verified: token refused by the server",
    )
    nokey = verify("node-nokey")
    assert nokey.returncode == 1
    assert "not verified: field 'apiKey' is required by cnode v1" in nokey.stdout
    plain = verify("plain-cred")
    assert plain.returncode == 3
    assert plain.stdout.startswith("no verifier: plain v1 has no verifier")

    data = json.loads(verify("node-good", "--json").stdout)
    assert data == {
        "credential": "node-good",
        "component": "cnode",
        "version": 1,
        "verifier": "verifyCredentials.js",
        "verified": True,
    }
    assert json.loads(verify("py-bad", "--json").stdout)["verifier"] == "lib/check.py"

    unknown = verify("nope")
    assert unknown.returncode == 2
    assert "unknown credential 'nope'" in unknown.stderr and "node-good" in unknown.stderr
    gone = verify("node-good", "--version", "9")
    assert gone.returncode == 2 and "cnode has no v9" in gone.stderr

    url = f"{env.d.url}/api/v1/credentials/node-good/verify"
    assert HTTP.post(url, json={}).status_code == 401
    token = (env.d.state_dir / "api-token").read_text().strip()
    auth = {"Authorization": f"Bearer {token}"}
    resp = HTTP.post(url, json={}, headers=auth, timeout=60)
    assert resp.status_code == 200 and resp.json()["verified"] is True
    resp = HTTP.post(f"{env.d.url}/api/v1/credentials/nope/verify", headers=auth, timeout=30)
    assert resp.status_code == 404 and "unknown credential" in resp.json()["detail"]
    assert HTTP.get(f"{env.d.url}/api/v1/credentials", headers=auth).json()[0]["name"]

    # a service verb with the credential merged into its cfg, as for a step
    listed = env.cli(
        "component", "call", "cnode", "listAccounts", "-f", "write", "--credential", "node-good"
    )
    assert listed.stdout.splitlines() == ["node-good  Account in eu"]
    wrong = env.cli(
        "component",
        "call",
        "cnode",
        "listAccounts",
        "-f",
        "write",
        "--credential",
        "py-good",
        check=False,
    )
    assert wrong.returncode != 0
    assert "credential 'py-good' belongs to component 'cpy', not 'cnode'" in wrong.stderr

    calls = env.d.state_dir / "logs" / "steps" / "_calls"
    assert "verifying for region eu" in (calls / "cnode.log").read_text()
    assert "checking a token of" in (calls / "cpy.log").read_text()
    for value in (env.node_key, env.py_token):
        assert value not in env.all_logs()


@pytest.mark.timeout(240)
def test_flow_validation_refuses_unusable_credentials_and_update_keys_needs_a_key(
    make_creds: Callable[..., CredEnv], tmp_path: Path
) -> None:
    env = make_creds(node=False, secret_key=False)
    out = tmp_path / "out.jsonl"
    refusals = {
        "nope": "step write: credential 'nope' is not defined in the daemon config",
        "plain-cred": "step write: credential 'plain-cred' belongs to component 'plain', not 'cpy'",
        "py-empty": "step write: field 'token' is required by cpy v1 (component.json "
        "credentials.fields) but credential 'py-empty' has no value for it",
    }
    for name, message in refusals.items():
        res = env.apply("refused", flow_steps("cpy", out, name), check=False)
        assert res.returncode != 0
        assert message in res.stderr, res.stderr
    assert not out.exists()

    # no daemon.secret_key: the refreshed keys are refused (said in the step log), never
    # stored in clear; the message itself goes on
    env.apply("keyless", flow_steps("cpy", out, "py-good"))
    wait_until(lambda: len(read_out(out)) >= 3, timeout=60)
    assert [r["n"] for r in read_out(out)][:3] == [1, 2, 3]
    assert read_out(out)[0]["token"] == env.py_token
    wait_until(lambda: "were not stored" in env.step_log("keyless", "write"), timeout=30)
    assert "daemon.secret_key is not set" in env.step_log("keyless", "write")
    assert db_rows(env.d.state_dir, "SELECT name FROM credential_keys") == []
    refreshed = read_out(out)[0]["emitted"]
    assert refreshed not in env.all_logs() and refreshed.encode() not in env.db_bytes()

    # a step with no credential: updateKeys has no account to go to (a warning, not lost)
    bare = tmp_path / "bare.jsonl"
    env.apply("bare", flow_steps("cpy", bare, None))
    wait_until(lambda: len(read_out(bare)) >= 2, timeout=60)
    wait_until(lambda: "this step names no credential" in env.step_log("bare", "write"))
    assert read_out(bare)[0]["token"] is None and read_out(bare)[0]["account"] is None
