"""HTTP-fed flows (`builtin = "http"`, `POST /flows/<flow>/in`) against a real daemon.

Real HTTP on loopback, real step processes, real SQLite: every answer of the contract (202,
401, 404, 413, 415, 400, 429, 503, 504 and sync replies from Python and Node steps), the
message a request becomes, its URL in `status` and `flow show`, and 1,000 requests across
10 redeploys with every accepted id handled exactly once.
"""

from __future__ import annotations

import json
import signal
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import db_rows, have, wait_until
from tests.flows.conftest import FlowEnv, flow_toml, read_out
from tests.flows.http_fed import (
    SECRET,
    SECRET_VAR,
    http_flow,
    make_http_env,
    post,
    record,
    web_files,
)

pytestmark = pytest.mark.timeout(240)


@pytest.fixture
def web(shared_make_env: Callable[..., FlowEnv]) -> FlowEnv:
    """The `web` component as hello v1 on the module's shared daemon, the secret in its
    environment: for tests that only add flows (each named apart) and leave it running."""
    return shared_make_env(web_files(), env={SECRET_VAR: SECRET})


@pytest.fixture
def own_web(make_env: Callable[..., FlowEnv], monkeypatch: pytest.MonkeyPatch) -> FlowEnv:
    """`web` on a daemon of the test's own: for tests that stop, restart or reconfigure it,
    or push to hello."""
    return make_http_env(make_env, monkeypatch)


def test_accepted_request_becomes_a_message_committed_before_the_answer(web: FlowEnv) -> None:
    out = web.out("orders")
    web.apply(http_flow("orders", out))
    url = web.daemon.url
    body = {"order": 7, "items": ["a", "ü"]}
    resp = post(
        url,
        "orders",
        body,
        headers={"user-agent": "shop/1.0", "x-shop": "eu", "x-trace": "t1", "accept": "*/*"},
    )
    assert resp.status_code == 202, resp.text
    msg_id = resp.json()["id"]
    # committed before the answer: the message is in the first queue or already handled
    rows = wait_until(lambda: read_out(out), timeout=30)
    assert rows[0]["id"] == msg_id
    assert rows[0]["body"] == body
    # headers: content-type, user-agent and x-*, without the signature (nor accept, ...)
    assert rows[0]["headers"] == {
        "content-type": "application/json",
        "user-agent": "shop/1.0",
        "x-shop": "eu",
        "x-trace": "t1",
    }
    # a JSON value that is not an object is wrapped, as a step's plain emitted value is
    assert post(url, "orders", [1, 2]).status_code == 202
    wait_until(lambda: len(read_out(out)) == 2, timeout=30)
    assert read_out(out)[1]["body"] == {"value": [1, 2]}

    # the URL, in status and flow show
    flow = web.flow("orders")
    assert flow["url"] == f"{url}/flows/orders/in"
    assert flow["http"] == {"auth": "hmac", "reply": "async", "reply_timeout": 30.0}
    assert flow["steps"][0]["kind"] == "trigger" and flow["steps"][0]["function"] == "http"
    assert flow["steps"][0]["state"] == "running"
    assert web.show("orders")["url"] == flow["url"]
    text = web.daemon.cli("flow", "show", "orders").stdout
    assert f"POST {url}/flows/orders/in" in text
    assert f"POST {url}/flows/orders/in" in web.daemon.cli("status").stdout
    # the secret is nowhere in what the daemon shows or stores
    assert SECRET not in json.dumps(web.daemon.status())
    assert SECRET not in (web.daemon.state_dir / "deployd.db").read_bytes().decode("latin-1")
    assert SECRET not in web.daemon.log()


def test_every_refusal_with_its_status(web: FlowEnv) -> None:
    out = web.out("refusals")
    web.apply(http_flow("refusals", out))
    web.apply(http_flow("tok", web.out("tok"), auth="token"))
    url = web.daemon.url

    # 404: unknown flow, and a known flow without credentials: the same answer
    unknown = post(url, "nope", {"a": 1}, secret=None)
    unsigned = post(url, "refusals", {"a": 1}, secret=None)
    assert unknown.status_code == unsigned.status_code == 404
    assert unknown.content == unsigned.content
    # 401: wrong credentials, and credentials sent for a flow that does not exist
    wrong = post(url, "refusals", {"a": 1}, secret="not-the-secret")
    unknown_signed = post(url, "nope", {"a": 1})
    assert wrong.status_code == unknown_signed.status_code == 401
    assert wrong.content == unknown_signed.content
    # the signature is over the raw body: another body with the same signature fails
    signed = post(url, "refusals", {"a": 1}).request.headers["x-deployd-signature"]
    forged = post(
        url, "refusals", raw=b'{"a": 2}', secret=None, headers={"x-deployd-signature": signed}
    )
    assert forged.status_code == 401
    # token auth: Authorization: Bearer
    bearer = {"authorization": f"Bearer {SECRET}"}
    assert post(url, "tok", {"t": 1}, secret=None, headers=bearer).status_code == 202
    bad = {"authorization": "Bearer nope"}
    assert post(url, "tok", {"t": 1}, secret=None, headers=bad).status_code == 401
    assert post(url, "tok", {"t": 1}).status_code == 401  # an HMAC is not its token
    assert post(url, "tok", {"t": 1}, secret=None).status_code == 404

    # 415: not JSON
    resp = post(url, "refusals", raw=b"a=1", headers={"content-type": "text/plain"})
    assert resp.status_code == 415 and "application/json" in resp.json()["detail"]
    # 413: over daemon.max_webhook_bytes (default 5 MiB), checked before anything else
    big = b'{"x": "' + b"a" * (5 * 1024 * 1024) + b'"}'
    assert post(url, "refusals", raw=big).status_code == 413
    # 400: malformed JSON, verified first (a valid signature over the bad bytes)
    for raw in (b'{"a": ', b'{"a": NaN}', b"\xff\xfe", b"[" * 5000 + b"]" * 5000):
        resp = post(url, "refusals", raw=raw)
        assert resp.status_code == 400, (raw[:20], resp.text)
        assert "malformed JSON" in resp.json()["detail"]
    # ... and an unverified malformed body is never parsed: 401, not 400
    assert post(url, "refusals", raw=b'{"a": ', secret="wrong").status_code == 401

    # 503 with Retry-After for a stopped flow (after authentication: nothing leaks)
    web.daemon.cli("flow", "stop", "refusals")
    resp = post(url, "refusals", {"a": 1})
    assert resp.status_code == 503 and resp.headers["retry-after"]
    assert "not running" in resp.json()["detail"]
    assert post(url, "refusals", {"a": 1}, secret=None).status_code == 404
    web.daemon.cli("flow", "start", "refusals")
    wait_until(lambda: post(url, "refusals", {"again": 1}).status_code == 202, timeout=30)
    # counted by flow and status (a name that is no HTTP-fed flow: "-")
    metrics = httpx.get(url + "/metrics", timeout=10).text
    assert 'deployd_flow_requests_total{flow="refusals",status="401"}' in metrics
    assert 'deployd_flow_requests_total{flow="-",status="404"}' in metrics
    assert 'flow="nope"' not in metrics
    # nothing refused was queued: only the accepted bodies reached the sink
    wait_until(lambda: any(r["body"] == {"again": 1} for r in read_out(out)), timeout=30)
    assert [r["body"] for r in read_out(out)] == [{"a": 1}, {"again": 1}]


def test_a_full_first_queue_answers_429_then_recovers(web: FlowEnv) -> None:
    out = web.out("busy")
    slow = {
        "id": "slow",
        "component": "hello",
        "function": "slow",
        "config": {"delay": "1.5"},
        "max_queue": 3,
    }
    web.apply(http_flow("busy", out, slow))
    url = web.daemon.url
    accepted: list[Any] = []
    refused: list[httpx.Response] = []
    client = httpx.Client(timeout=30)
    began = time.monotonic()
    for i in range(30):
        resp = post(url, "busy", {"i": i}, client=client)
        if resp.status_code == 202:
            accepted.append(i)
        else:
            refused.append(resp)
            break
    assert refused, "the queue never filled"
    assert refused[0].status_code == 429, refused[0].text
    assert refused[0].headers["retry-after"] == "1"
    assert "max_queue" in refused[0].json()["detail"]
    # the limit, plus the one in hand and what the slow step (1.5 s each) finished meanwhile
    assert 3 <= len(accepted) <= 4 + int((time.monotonic() - began) / 1.5) + 1
    held = web.flow("busy")["steps"][0]
    assert held["backpressure"] is True
    # recovery: once the queue drained below its low-water mark, requests are taken again
    resp = wait_until(
        lambda: (r := post(url, "busy", {"i": "after"}, client=client)).status_code == 202 and r,
        timeout=60,
        interval=0.1,
    )
    client.close()
    accepted.append("after")
    wait_until(lambda: len(read_out(out)) == len(accepted), timeout=60)
    # every accepted request handled once, in order; none of the refused ones
    assert [r["body"]["i"] for r in read_out(out)] == accepted


def test_sync_replies_from_python_and_the_504_path(web: FlowEnv) -> None:
    out = web.out("ask")
    step = {"id": "answer", "component": "hello", "function": "reply"}
    web.apply(http_flow("ask", out, step, reply="sync", reply_timeout="5s"))
    url = web.daemon.url
    resp = post(url, "ask", {"q": 1})
    assert resp.status_code == 201, resp.text
    assert resp.json() == {"echo": {"q": 1}, "by": "py"}  # the first reply answers
    assert resp.headers["x-by"] == "python"
    assert resp.headers["content-type"] == "application/json"
    # no reply within reply_timeout: 504 with the id; the message is still handled
    resp = post(url, "ask", {"q": 2, "silent": True})
    assert resp.status_code == 504, resp.text
    late = resp.json()["id"]
    assert "reply_timeout" in resp.json()["detail"]
    wait_until(lambda: any(r["id"] != late and r["body"].get("q") == 2 for r in read_out(out)))
    # concurrent sync requests each get their own answer
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda i: post(url, "ask", {"q": i}), range(100, 116)))
    assert [a.json()["echo"]["q"] for a in answers] == list(range(100, 116))


NODE_REPLY = """\
exports.process = async function (msg) {
  await this.emit('httpReply', {
    statusCode: 200,
    body: `hello ${msg.body.name}`,
    headers: { 'x-by': 'node', 'content-type': 'text/plain' },
  });
  return { body: msg.body };
};
"""


@pytest.mark.skipif(not have("node"), reason="node is not installed")
def test_sync_reply_from_a_node_step(
    own_web: FlowEnv, component: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    # a Node component beside the Python one (no npm: component.json names a build)
    js = component("js")
    js.commit(
        "node",
        {
            "component.json": {
                "title": "JS",
                "runtime": "node",
                "build": "true",
                "triggers": {"idle": {"main": "./lib/idle.js", "title": "Idle"}},
                "actions": {"reply": {"main": "./lib/reply.js", "title": "Reply"}},
            },
            "lib/idle.js": "exports.process = async function () {};\n",
            "lib/reply.js": NODE_REPLY,
        },
    )
    own_web.daemon.stop()
    own_web.daemon.components.append({"name": "js"})
    own_web.daemon.start()
    sha = js.push(own_web.daemon.hosted("js"))
    own_web.daemon.wait_recent("js", sha, timeout=60)
    out = own_web.out("hi")
    step = {"id": "greet", "component": "js", "function": "reply"}
    own_web.apply(http_flow("hi", out, step, reply="sync"))
    resp = post(own_web.daemon.url, "hi", {"name": "ada"})
    assert resp.status_code == 200, resp.text
    assert resp.text == "hello ada"
    assert resp.headers["x-by"] == "node"
    assert resp.headers["content-type"].startswith("text/plain")
    wait_until(lambda: read_out(out), timeout=30)


def test_1000_requests_under_10_redeploys_each_accepted_id_handled_once(own_web: FlowEnv) -> None:
    out = own_web.out("load")
    own_web.apply(http_flow("load", out))
    url = own_web.daemon.url
    accepted: list[str] = []
    codes: Counter[int] = Counter()
    sent = 0

    def deployed(version: int) -> bool:
        return bool(
            db_rows(
                own_web.daemon.state_dir,
                "SELECT 1 FROM deployments WHERE flow = 'load' AND to_version = ?"
                " AND finished_at IS NOT NULL",
                version,
            )
        )

    limits = httpx.Limits(max_connections=16, max_keepalive_connections=16)
    with httpx.Client(timeout=30, limits=limits) as client, ThreadPoolExecutor(16) as pool:
        for k in range(10):
            tag = f"v{k + 2}"
            own_web.work.commit(tag, web_files(tag) | {"lib/record.py": record(tag)})
            own_web.work.push(own_web.daemon.hosted("hello"))
            # 100 requests per redeploy at least, and more until that publish has finished:
            # requests keep arriving through every build, warm-up and switch
            started, mine = time.monotonic(), 0
            while mine < 100 or not deployed(k + 2):
                assert time.monotonic() - started < 120, f"redeploy to {tag} did not finish"
                batch = range(sent, sent + 16)
                for resp in pool.map(lambda i: post(url, "load", {"i": i}, client=client), batch):
                    codes[resp.status_code] += 1
                    if resp.status_code == 202:
                        accepted.append(resp.json()["id"])
                sent, mine = sent + 16, mine + 16
    assert sent >= 1000
    assert codes == {202: sent}, codes  # a publish refuses nothing
    wait_until(lambda: len(read_out(out)) >= sent, timeout=120, interval=0.2)
    seen = Counter(r["id"] for r in read_out(out))
    assert set(seen) == set(accepted)
    assert max(seen.values()) == 1, [k for k, v in seen.items() if v > 1][:5]
    assert {r["by"] for r in read_out(out)} >= {"v2", "v11"}  # every version took some
    finished = [d for d in own_web.deploys() if d["flow"] == "load" and d["status"] == "done"]
    assert len(finished) == 11  # the first publish and the 10 redeploys
    # gap_ms of an HTTP-fed flow: the time no action step was consuming
    gaps = [d["gap_ms"] for d in finished if d["from_version"] is not None]
    assert len(gaps) == 10 and all(g is not None and g >= 0 for g in gaps)


def test_daemon_stopping_answers_503(own_web: FlowEnv) -> None:
    out = own_web.out("drain")
    slow = {"id": "slow", "component": "hello", "function": "slow", "config": {"delay": "3"}}
    own_web.apply(http_flow("drain", out, slow))
    url = own_web.daemon.url
    assert post(url, "drain", {"first": 1}).status_code == 202
    wait_until(lambda: own_web.flow("drain")["queues"].get("slow", 0) >= 1, timeout=30)
    assert own_web.daemon.proc is not None
    own_web.daemon.proc.send_signal(signal.SIGTERM)  # stops once the slow step finished

    def refused() -> httpx.Response | None:
        try:
            resp = post(url, "drain", {"late": 1}, timeout=5)
        except httpx.HTTPError:
            return None
        return resp if resp.status_code == 503 else None

    resp = wait_until(refused, timeout=20)
    assert resp.headers["retry-after"] == "5"
    assert "stopping" in resp.json()["detail"]
    assert own_web.daemon.stop() == 0
    # the request taken before the stop is still queued or handled, never lost
    own_web.daemon.start()
    wait_until(lambda: [r["body"] for r in read_out(out)] == [{"first": 1}], timeout=60)


def test_flow_file_rules(web: FlowEnv, tmp_path: Path) -> None:
    def refused(text: str) -> str:
        proc = web.apply(text, check=False)
        assert proc.returncode != 0, proc.stdout
        return proc.stderr

    out = web.out("x")
    rec = {"id": "rec", "component": "hello", "function": "record", "config": {"out": out}}
    literal = {"id": "in", "builtin": "http", "auth": "hmac", "secret": "hunter2"}
    assert "reference to deployd's environment" in refused(
        flow_toml("x", out, steps=[literal, rec])
    )
    missing = {"id": "in", "builtin": "http", "auth": "token"}
    assert "needs secret" in refused(flow_toml("x", out, steps=[missing, rec]))
    unset = {"id": "in", "builtin": "http", "secret": "${NOT_SET_ANYWHERE}"}
    assert "NOT_SET_ANYWHERE is not set" in refused(flow_toml("x", out, steps=[unset, rec]))
    later = [
        {"id": "a", "component": "hello", "function": "idle"},
        {"id": "in", "builtin": "http", "auth": "none"},
    ]
    assert "only the first step" in refused(flow_toml("x", out, steps=later))
    extra = {"id": "in", "builtin": "http", "auth": "none", "component": "hello"}
    assert "takes no component" in refused(flow_toml("x", out, steps=[extra, rec]))
    timeout = {"id": "in", "builtin": "http", "auth": "none", "reply_timeout": "10m"}
    assert "reply_timeout" in refused(flow_toml("x", out, steps=[timeout, rec]))
    rabbit = flow_toml("x", out, steps=[{"id": "in", "builtin": "http", "auth": "none"}, rec])
    rabbit += 'runtime = "rabbitmq"\n'
    # (a top-level key after the tables would be a step's: write it first)
    rabbit = 'runtime = "rabbitmq"\n' + rabbit.replace('runtime = "rabbitmq"\n', "")
    assert "embedded runtime only" in refused(rabbit)
    # auth = "none" is fine on loopback (this daemon listens on 127.0.0.1)
    web.apply(flow_toml("x", out, steps=[{"id": "in", "builtin": "http", "auth": "none"}, rec]))
    assert post(web.daemon.url, "x", {"open": 1}, secret=None).status_code == 202
