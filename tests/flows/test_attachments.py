"""Attachments and the object store end to end (issue 17): a real daemon, real pushes, real
Node and Python step processes, real HTTP to deployd's object store, real SQLite queues and
a real RabbitMQ.

The flow is tick (Python trigger: {"text": "hi N", "n": N}) → upload (Node: stores
"file N" in the object store with the requests `@elastic.io/maester-client` makes — POST
/objects, the bearer token from ELASTICIO_OBJECT_STORAGE_TOKEN — and emits the message with
the object as attachment "note.txt") → readjs (Node: reads every attachment by its url, writes
what it got, passes the message and its attachments on) → readpy (Python: the same, tagged with
its code version; v1 refuses n in cfg["refuse"] and sleeps cfg["sleep"] seconds per message).
"""

from __future__ import annotations

import json
import textwrap
from collections.abc import Callable
from typing import Any

import httpx

from deployd.objects import flow_token
from tests.conftest import Work, dead_letter_rows, wait_until
from tests.flows.conftest import FlowEnv, counter_files, flow_toml, read_out
from tests.flows.test_rabbitmq import rabbit_toml


def reader_py(tag: str) -> str:
    return textwrap.dedent(
        f"""\
        import json, os, time, urllib.request
        TAG = {tag!r}


        def fetch(url):
            req = urllib.request.Request(url, headers={{
                "Authorization": "Bearer " + os.environ["ELASTICIO_OBJECT_STORAGE_TOKEN"]}})
            with urllib.request.urlopen(req, timeout=10) as res:
                return res.read().decode(), res.headers["content-type"]


        def process(msg, cfg):
            if TAG == "v1":
                time.sleep(float(cfg.get("sleep", "0")))
            n = msg["body"]["n"]
            if TAG == "v1" and str(n) in cfg.get("refuse", "").split(","):
                raise ValueError(f"n={{n}} refused by {{TAG}}")
            got = {{name: fetch(a["url"]) for name, a in msg["attachments"].items()}}
            env = {{k: os.environ.get(k, "") for k in (
                "ELASTICIO_OBJECT_STORAGE_URI", "ELASTICIO_API_URI", "ELASTICIO_FLOW_ID")}}
            token = os.environ.get("ELASTICIO_OBJECT_STORAGE_TOKEN", "")
            env["token_parts"] = len(token.split("."))
            line = {{"n": n, "attachments": msg["attachments"], "got": got, "env": env,
                     "pt": {{k: v.get("attachments") for k, v in msg["passthrough"].items()}},
                     "by": TAG}}
            with open(cfg["out"], "a") as fh:
                fh.write(json.dumps(line) + "\\n")
        """
    )


def hello_files(tag: str = "v1") -> dict[str, Any]:
    files = counter_files(tag, **{"lib/readpy.py": reader_py(tag)})
    desc = json.loads(json.dumps(files["component.json"]))
    desc["actions"]["readpy"] = {
        "main": "./lib/readpy.py",
        "title": "Read attachments",
        "fields": {"out": {"label": "Output file", "required": True}},
    }
    files["component.json"] = desc
    return files


NODE_DESC: dict[str, Any] = {
    "title": "Attachments (Node)",
    "runtime": "node",
    "actions": {
        "upload": {"main": "./lib/upload.js", "title": "Upload"},
        "readjs": {
            "main": "./lib/readjs.js",
            "title": "Read",
            "fields": {"out": {"label": "Output file", "required": True}},
        },
    },
}

# The requests of @elastic.io/maester-client's ObjectStorage.add() (StorageClient.post):
# POST {uri}/objects with the token as bearer, the content type, x-query-* headers; the
# answer's objectId; the url as the platform's components library builds it.
UPLOAD_JS = """\
'use strict';
const { messages } = require('elasticio-node');

exports.process = async function upload(msg) {
  const uri = process.env.ELASTICIO_OBJECT_STORAGE_URI;
  const data = `file ${msg.body.n}`;
  const res = await fetch(`${uri}/objects`, {
    method: 'POST',
    body: data,
    headers: {
      Authorization: `Bearer ${process.env.ELASTICIO_OBJECT_STORAGE_TOKEN}`,
      'content-type': 'text/plain',
      'x-query-n': String(msg.body.n),
      'x-request-id': `f:${process.env.ELASTICIO_FLOW_ID};s:${process.env.ELASTICIO_STEP_ID}`,
    },
  });
  if (res.status !== 201) throw new Error(`upload: ${res.status} ${await res.text()}`);
  const { objectId, contentLength, contentType } = await res.json();
  const out = messages.newMessageWithBody(msg.body);
  out.attachments['note.txt'] = {
    url: `${uri}/objects/${objectId}?storage_type=maester`,
    size: contentLength,
    'content-type': contentType,
  };
  await this.emit('data', out);
};
"""

READ_JS = """\
'use strict';
const fs = require('fs');

exports.process = async function readjs(msg, cfg) {
  const got = {};
  for (const [name, a] of Object.entries(msg.attachments)) {
    const res = await fetch(a.url, {
      headers: { Authorization: `Bearer ${process.env.ELASTICIO_OBJECT_STORAGE_TOKEN}` },
    });
    const type = res.headers.get('content-type');
    got[name] = { status: res.status, text: await res.text(), type };
  }
  fs.appendFileSync(cfg.out, JSON.stringify({ n: msg.body.n, got }) + '\\n');
  await this.emit('data', { body: msg.body, attachments: msg.attachments });
};
"""


def att_env(
    make_env: Callable[..., FlowEnv], component: Callable[..., Work], **keys: Any
) -> FlowEnv:
    """A daemon hosting `hello` (Python) and `nodeatt` (Node), both registered."""
    env = make_env(hello_files(), components=[{"name": "hello"}, {"name": "nodeatt"}], **keys)
    work = component("nodeatt")
    work.commit(
        "attachments",
        {"component.json": NODE_DESC, "lib/upload.js": UPLOAD_JS, "lib/readjs.js": READ_JS},
    )
    env.daemon.wait_recent("nodeatt", work.push(env.daemon.hosted("nodeatt")), timeout=60)
    return env


def att_flow(env: FlowEnv, *, interval: str = "50ms", readpy: dict[str, Any] | None = None) -> str:
    steps = [
        {"id": "tick", "component": "hello", "function": "ticker", "interval": interval},
        {"id": "upload", "component": "nodeatt", "function": "upload"},
        {
            "id": "readjs",
            "component": "nodeatt",
            "function": "readjs",
            "config": {"out": env.out("readjs")},
        },
        {
            "id": "readpy",
            "component": "hello",
            "function": "readpy",
            "config": {"out": env.out("readpy"), **(readpy or {})},
        },
    ]
    return flow_toml("att", env.out("readpy"), steps=steps)


def check_rows(env: FlowEnv, js: list[dict[str, Any]], py: list[dict[str, Any]]) -> None:
    """Each step read the file uploaded for its own message, through its attachment's url."""
    for row in js:
        assert row["got"] == {
            "note.txt": {"status": 200, "text": f"file {row['n']}", "type": "text/plain"}
        }, row
    for row in py:
        n = row["n"]
        [(name, att)] = row["attachments"].items()
        assert name == "note.txt"
        assert att["size"] == len(f"file {n}") and att["content-type"] == "text/plain"
        assert att["url"].startswith(env.daemon.url + "/objects/")
        assert att["url"].endswith("?storage_type=maester")
        assert row["got"] == {"note.txt": [f"file {n}", "text/plain"]}
        # the passthrough entries carry the attachments their messages had
        assert row["pt"] == {
            "tick": None,
            "upload": row["attachments"],
            "readjs": row["attachments"],
        }
        assert row["env"] == {
            "ELASTICIO_OBJECT_STORAGE_URI": env.daemon.url,
            "ELASTICIO_API_URI": env.daemon.url,
            "ELASTICIO_FLOW_ID": "att",
            "token_parts": 3,
        }


def object_id(url: str) -> str:
    return url.split("/objects/", 1)[1].split("?", 1)[0]


def token(env: FlowEnv, flow: str) -> str:
    key = bytes.fromhex((env.daemon.state_dir / "object-storage-key").read_text().strip())
    return flow_token(key, flow)


def gc(env: FlowEnv) -> dict[str, Any]:
    api_token = (env.daemon.state_dir / "api-token").read_text().strip()
    res = httpx.post(
        env.daemon.url + "/api/v1/gc", headers={"authorization": f"Bearer {api_token}"}, timeout=30
    )
    assert res.status_code == 200, res.text
    return dict(res.json())


def test_attachments_travel_to_node_and_python_steps_and_into_dead_letters(
    make_env: Callable[..., FlowEnv], component: Callable[..., Work]
) -> None:
    """Embedded runtime: a Node step uploads a file and emits it as an attachment; the next
    Node and Python steps read it by its url with their flow's token (from the environment)
    and get the bytes and content type; passthrough entries carry the attachments. A message
    whose handling failed keeps its attachments as a dead letter (`flow errors --id` shows
    them); retried into a fixed version, it carries them again and its object is still
    there."""
    env = att_env(make_env, component)
    env.apply(att_flow(env, readpy={"refuse": "3"}))
    py = env.out("readpy")
    wait_until(lambda: len(read_out(py)) >= 4, timeout=60)
    wait_until(lambda: dead_letter_rows(env.daemon.state_dir, "att"), timeout=30)
    check_rows(env, read_out(env.out("readjs")), read_out(py))

    [letter] = json.loads(env.daemon.cli("flow", "errors", "att", "--json").stdout)
    whole = json.loads(
        env.daemon.cli("flow", "errors", "att", "--id", str(letter["id"]), "--json").stdout
    )
    assert list(whole["attachments"]) == ["note.txt"]
    human = env.daemon.cli("flow", "errors", "att", "--id", str(letter["id"])).stdout
    assert "attachments:" in human and "storage_type=maester" in human
    env.push(hello_files("v2"))
    assert env.wait_deploy("att", 2)["status"] == "done"
    env.daemon.cli("flow", "retry", "att", "--all")
    retried = wait_until(lambda: [r for r in read_out(py) if r["n"] == 3], timeout=30)
    assert [r["by"] for r in retried] == ["v2"]
    check_rows(env, [], retried)


def test_the_object_store_refuses_missing_wrong_and_other_flows_tokens_and_large_objects(
    make_env: Callable[..., FlowEnv], component: Callable[..., Work]
) -> None:
    """Over real HTTP: the maester API answers 401 without a token, with a made-up one and with
    one signed by another key; 403 for an object of another flow; 404 for none; 400 for an id
    that is not one; 413 over daemon.max_object_bytes (nothing kept). The flow's own token
    reads, queries and deletes its objects."""
    env = att_env(make_env, component, max_object_bytes=4096)
    env.apply(att_flow(env))
    rows = wait_until(lambda: len(rows := read_out(env.out("readpy"))) >= 1 and rows, timeout=60)
    # Stopped: its trigger's uploads would otherwise pass through `.uploads` while the refused
    # one is checked for leftovers there (a stop lets the call in hand finish).
    env.daemon.cli("flow", "stop", "att")
    url = rows[0]["attachments"]["note.txt"]["url"]
    oid = object_id(url)
    mine = {"authorization": f"Bearer {token(env, 'att')}"}
    res = httpx.get(url, headers=mine)
    assert (res.status_code, res.text) == (200, f"file {rows[0]['n']}")
    assert res.headers["x-query-n"] == str(rows[0]["n"])
    for headers in (
        {},
        {"authorization": "Bearer not-a-token"},
        {"authorization": f"Bearer {flow_token(b'k' * 32, 'att')}"},  # signed by another key
    ):
        res = httpx.get(url, headers=headers)
        assert res.status_code == 401, res.text
        assert "ELASTICIO_OBJECT_STORAGE_TOKEN" in res.json()["detail"]
    other = {"authorization": f"Bearer {token(env, 'other')}"}
    res = httpx.get(url, headers=other)
    assert res.status_code == 403 and "another flow" in res.json()["detail"]
    assert httpx.delete(url, headers=other).status_code == 403
    missing = "00000000-0000-4000-8000-000000000000"
    assert httpx.get(f"{env.daemon.url}/objects/{missing}", headers=mine).status_code == 404
    assert httpx.get(f"{env.daemon.url}/objects/invalid-id", headers=mine).status_code == 400

    res = httpx.post(env.daemon.url + "/objects", content=b"x" * 5000, headers=mine)
    assert res.status_code == 413, res.text
    assert "daemon.max_object_bytes (4096)" in res.json()["detail"]
    uploads = env.daemon.state_dir / "objects" / ".uploads"
    assert not list(uploads.iterdir())

    # lookup by query (ObjectStorageWrapper.lookupObjectsByQueryParameters), then delete
    query = {"query[n]": str(rows[0]["n"])}
    found = httpx.get(env.daemon.url + "/objects", params=query, headers=mine).json()
    assert [f["objectId"] for f in found] == [oid]
    assert found[0]["contentType"] == "text/plain" and found[0]["queriableFields"]["n"]
    assert httpx.get(env.daemon.url + "/objects", params=query, headers=other).json() == []
    head = httpx.head(url, headers=mine)
    assert head.headers["content-length"] == str(len(f"file {rows[0]['n']}"))
    assert head.headers["content-type"] == "text/plain"
    assert httpx.delete(url, headers=mine).status_code == 204
    assert httpx.get(url, headers=mine).status_code == 404
    assert token(env, "att") not in env.daemon.log()


def test_retention_removes_unreferenced_objects_and_keeps_referenced_ones(
    make_env: Callable[..., FlowEnv], component: Callable[..., Work]
) -> None:
    """`gc`: the object of a dead letter stays (and so does one never attached, within
    keep_objects); the objects of messages that were handled go once keep_attachments passed;
    once the letter is discarded, its object goes too; an object whose x-eio-ttl passed goes."""
    env = att_env(make_env, component, keep_attachments="1s", keep_objects="1h")
    env.apply(att_flow(env, readpy={"refuse": "2"}))
    py = env.out("readpy")
    wait_until(lambda: len(read_out(py)) >= 3, timeout=60)
    wait_until(lambda: dead_letter_rows(env.daemon.state_dir, "att"), timeout=30)
    env.daemon.cli("flow", "stop", "att")
    mine = {"authorization": f"Bearer {token(env, 'att')}"}
    kept = httpx.post(env.daemon.url + "/objects", content=b"state", headers=mine).json()
    brief = httpx.post(
        env.daemon.url + "/objects", content=b"brief", headers={**mine, "x-eio-ttl": "1"}
    ).json()
    [letter] = json.loads(env.daemon.cli("flow", "errors", "att", "--json").stdout)
    whole = json.loads(
        env.daemon.cli("flow", "errors", "att", "--id", str(letter["id"]), "--json").stdout
    )
    lettered = whole["attachments"]["note.txt"]["url"]
    handled = [r["attachments"]["note.txt"]["url"] for r in read_out(py)]

    def status(url: str) -> int:
        return httpx.get(url, headers=mine).status_code

    def objects_left() -> bool:
        gc(env)
        return all(status(u) == 404 for u in handled) and status(objects_url(env, brief)) == 404

    wait_until(objects_left, timeout=30, interval=0.5)
    assert status(lettered) == 200  # a dead letter references it
    assert status(objects_url(env, kept)) == 200  # never attached: keep_objects
    env.daemon.cli("flow", "discard", "att", "--all")
    wait_until(
        lambda: gc(env)["objects_removed"] >= 1 and status(lettered) == 404,
        timeout=30,
        interval=0.5,
    )
    assert status(objects_url(env, kept)) == 200


def objects_url(env: FlowEnv, info: dict[str, Any]) -> str:
    return f"{env.daemon.url}/objects/{info['objectId']}"


def test_attachments_survive_the_broker_hop_and_a_switch_over_on_rabbitmq(
    make_env: Callable[..., FlowEnv], component: Callable[..., Work], amqp_url: str
) -> None:
    """RabbitMQ runtime: the attachments travel in the broker's messages; a push of new code
    while messages are queued on the broker switches the flow, and the queued messages reach
    the new version with their attachments, whose objects are all still there; none lost or
    doubled."""
    env = att_env(make_env, component, extra_toml=rabbit_toml(amqp_url))
    env.apply(att_flow(env, interval="20ms", readpy={"sleep": "0.05"}))
    py = env.out("readpy")
    wait_until(lambda: len(read_out(py)) >= 5, timeout=60)
    assert env.flow("att")["runtime"] == "rabbitmq"
    wait_until(lambda: env.queued("readpy") >= 5, timeout=30)
    env.push(hello_files("v2"))
    assert env.wait_deploy("att", 2)["status"] == "done"
    wait_until(lambda: sum(r["by"] == "v2" for r in read_out(py)) >= 5, timeout=60)
    rows = read_out(py)
    check_rows(env, read_out(env.out("readjs")), rows)
    ns = [r["n"] for r in rows]
    assert len(ns) == len(set(ns)), "a message was handled twice"
    assert sorted(ns) == list(range(1, max(ns) + 1)), "a message was lost"
    tags = [r["by"] for r in rows]
    switch = tags.index("v2")
    assert set(tags[:switch]) == {"v1"} and set(tags[switch:]) == {"v2"}, tags
