"""The real `@elastic.io/maester-client` against deployd's object store (issue 17).

A Node component that depends on the published client (installed by deployd's default Node
build from the npm registry) stores, reads, queries and deletes objects through its
`ObjectStorageWrapper` and `ObjectStorage` classes, with the environment deployd gives the
step. Skipped when the npm registry cannot be reached (the build needs it).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Callable
from typing import Any

import pytest

from tests.conftest import Work, under_ci, wait_until
from tests.flows.conftest import FlowEnv, flow_toml, read_out


def _registry_reachable() -> bool:
    if shutil.which("npm") is None:
        return False
    try:
        proc = subprocess.run(
            ["npm", "view", "@elastic.io/maester-client@6.0.0", "version"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return proc.returncode == 0 and proc.stdout.strip() == "6.0.0"


DESC: dict[str, Any] = {
    "title": "maester-client",
    "runtime": "node",
    "actions": {
        "store": {
            "main": "./lib/store.js",
            "title": "Store",
            "fields": {"out": {"label": "Output file", "required": True}},
        }
    },
}

PACKAGE = {
    "name": "maester-probe",
    "version": "1.0.0",
    "private": True,
    "dependencies": {"@elastic.io/maester-client": "6.0.0"},
}

STORE_JS = """\
'use strict';
const fs = require('fs');
const { Readable } = require('stream');
const { ObjectStorageWrapper, ObjectStorage } = require('@elastic.io/maester-client');

exports.process = async function store(msg, cfg) {
  const n = String(msg.body.n);
  const wrapper = new ObjectStorageWrapper(this);
  const id = await wrapper.createObject(
    { n: msg.body.n }, [{ key: 'n', value: n }], [{ key: 'by', value: 'wrapper' }]);
  const back = await wrapper.lookupObjectById(id);
  const found = await wrapper.lookupObjectsByQueryParameters([{ key: 'n', value: n }]);
  const headers = await wrapper.getObjectHeaders(id);
  const storage = new ObjectStorage({
    uri: process.env.ELASTICIO_OBJECT_STORAGE_URI,
    jwtSecret: process.env.ELASTICIO_OBJECT_STORAGE_TOKEN,
  });
  const fileId = await storage.add(async () => Readable.from([Buffer.from(`file ${n}`)]),
    { headers: { 'content-type': 'text/plain' } });
  const { data } = await storage.getOne(fileId, { responseType: 'arraybuffer' });
  const signed = new ObjectStorage({
    uri: process.env.ELASTICIO_OBJECT_STORAGE_URI,
    jwtSecret: process.env.ELASTICIO_OBJECT_STORAGE_TOKEN,
  });
  const payload = { flowId: process.env.ELASTICIO_FLOW_ID };
  const viaJwt = await signed.getOne(id, { jwtPayloadOrToken: payload });
  await wrapper.deleteObjectById(id);
  let gone = 'found';
  try { await wrapper.lookupObjectById(id); } catch (err) { gone = err.message; }
  fs.appendFileSync(cfg.out, JSON.stringify({
    n: msg.body.n, id, back, found: found.map((f) => f.objectId), meta: headers['x-meta-by'],
    type: headers['content-type'], text: Buffer.from(data).toString(), viaJwt: viaJwt.data, gone,
  }) + '\\n');
};
"""


@pytest.mark.timeout(300)
def test_the_published_maester_client_stores_reads_queries_and_deletes(
    make_env: Callable[..., FlowEnv], component: Callable[..., Work]
) -> None:
    if not _registry_reachable():
        why = "the npm registry is not reachable (the build installs maester-client)"
        if under_ci():
            pytest.fail(f"CI=true and {why}", pytrace=False)
        pytest.skip(why)
    env = make_env(components=[{"name": "hello"}, {"name": "maester", "build_timeout": "4m"}])
    work = component("maester")
    work.commit(
        "maester probe",
        {"component.json": DESC, "package.json": PACKAGE, "lib/store.js": STORE_JS},
    )
    env.daemon.wait_recent("maester", work.push(env.daemon.hosted("maester")), timeout=240)
    out = env.out("maester")
    steps = [
        {"id": "tick", "component": "hello", "function": "ticker", "interval": "200ms"},
        {"id": "store", "component": "maester", "function": "store", "config": {"out": out}},
    ]
    env.apply(flow_toml("mc", out, steps=steps))
    rows = wait_until(lambda: len(r := read_out(out)) >= 2 and r, timeout=60)
    for row in rows:
        n = row["n"]
        assert row["back"] == {"n": n} and row["found"] == [row["id"]], row
        assert row["meta"] == "wrapper" and row["type"] == "application/json"
        assert row["text"] == f"file {n}"
        assert row["viaJwt"] == {"n": n}
        assert "404" in row["gone"], row
    assert json.dumps(rows)  # what the client saw is plain JSON
