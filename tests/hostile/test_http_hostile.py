"""Hostile requests to an HTTP-fed flow (`POST /flows/<flow>/in`) against a real daemon.

Each gets its specific answer, the daemon keeps serving, and nothing a refused request
carried reaches the flow: the sink holds exactly the bodies that were answered 202. Plus
the flow-file rule that needs a daemon config: `auth = "none"` off loopback is refused.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import HTTP, wait_until
from tests.flows.conftest import FlowEnv, read_out
from tests.flows.http_fed import http_flow, make_http_env, post, sign
from tests.hostile.test_webhook_hostile import _read_response

pytestmark = pytest.mark.timeout(240)


def _raw(port: int, head: str, body: bytes = b"") -> str:
    with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
        sock.sendall(head.encode("latin-1") + body)
        return _read_response(sock)


def test_hostile_bodies_and_headers(
    make_env: Callable[..., FlowEnv], monkeypatch: pytest.MonkeyPatch
) -> None:
    web = make_http_env(make_env, monkeypatch, max_webhook_bytes=65536)
    out = web.out("orders")
    web.apply(http_flow("orders", out))
    url, port = web.daemon.url, web.daemon.port
    accepted: list[object] = []

    def ok(body: bytes, expect: object, **kw: object) -> None:
        resp = post(url, "orders", raw=body, **kw)  # type: ignore[arg-type]
        assert resp.status_code == 202, (body[:40], resp.text)
        accepted.append(expect)

    def refused(status: int, words: str, body: bytes = b"{}", **kw: object) -> None:
        resp = post(url, "orders", raw=body, **kw)  # type: ignore[arg-type]
        assert resp.status_code == status, (body[:40], resp.status_code, resp.text[:300])
        assert words in resp.text, resp.text[:300]

    # bodies: malformed, non-JSON constants, too deep, too long a number, not UTF-8
    refused(400, "malformed JSON", b"")
    refused(400, "malformed JSON", b'{"a": 1} trailing')
    refused(400, "malformed JSON", b'{"a": Infinity}')
    refused(400, "malformed JSON", b'{"a": -NaN}')
    refused(400, "too large", b'{"a": 1e400}')  # no float: it would travel as Infinity
    refused(400, "nested", b'{"a": ' + b"[" * 150 + b"]" * 150 + b"}")
    refused(400, "malformed JSON", b'{"a": ' + b"9" * 5000 + b"}")
    refused(400, "malformed JSON", b'{"a": "\x00"}')  # a raw control character
    refused(400, "malformed JSON", b'{"a": "\xc3\x28"}')  # invalid UTF-8
    refused(413, "max_webhook_bytes", b'{"a": "' + b"x" * 70000 + b'"}')
    # ... which are still JSON, and taken as they are
    ok(b'{"a": "\\u0000 \\ud800 \\u2028"}', {"a": "\x00 \ud800 \u2028"})
    ok(b'{"a": 1, "a": 2}', {"a": 2})
    ok(
        b'{\n  "pretty": [1,\r\n 2]\n}\n', {"pretty": [1, 2]}
    )  # line breaks never reach a line  # a duplicate key: the last one, as JSON.parse does
    ok(b"null", {"value": None})
    ok(b'"just a string"', {"value": "just a string"})
    ok(b'{"k": ' + b"[" * 90 + b"]" * 90 + b"}", {"k": json.loads(b"[" * 90 + b"]" * 90)})

    # content types
    refused(415, "application/json", headers={"content-type": "application/jsonx"})
    refused(415, "application/json", headers={"content-type": "text/json"})
    refused(415, "application/json", headers={"content-type": ""})
    ok(b'{"ct": 1}', {"ct": 1}, headers={"content-type": "Application/JSON; charset=utf-8"})
    ok(b'{"ct": 2}', {"ct": 2}, headers={"content-type": "application/vnd.shop+json"})

    # credentials: odd signatures and tokens are refused, never a crash
    body = b'{"sig": 1}'
    for bad in ("sha256=", "sha1=" + "0" * 40, "sha256=" + "z" * 64, "x" * 20000):
        refused(401, "credentials", body, secret=None, headers={"x-deployd-signature": bad})
    refused(401, "credentials", body, secret=None, headers={"authorization": "Bearer"})
    ok(body, {"sig": 1}, secret=None, headers={"x-deployd-signature": sign(body).upper()})

    # headers: many x-* headers are kept; too many bytes of them are refused whole
    many = {f"x-h{i}": str(i) for i in range(150)}
    ok(b'{"many": 1}', {"many": 1}, headers=many)
    huge = {f"x-big{i}": "v" * 4000 for i in range(20)}
    refused(431, "x-* headers", b'{"huge": 1}', headers=huge)

    # a chunked body over the limit: cut off while it streams
    chunk = b"x" * 30000
    payload = b'{"a": "' + chunk * 3 + b'"}'
    parts = b"".join(
        b"%x\r\n%s\r\n" % (len(payload[i : i + 20000]), payload[i : i + 20000])
        for i in range(0, len(payload), 20000)
    )
    answer = _raw(
        port,
        "POST /flows/orders/in HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"X-Deployd-Signature: {sign(payload)}\r\nTransfer-Encoding: chunked\r\n\r\n",
        parts + b"0\r\n\r\n",
    )
    assert answer.startswith("HTTP/1.1 413"), answer[:200]
    # a Content-Length far above the limit: refused at once, not after a read that never ends
    answer = _raw(
        port,
        "POST /flows/orders/in HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        "Content-Length: 999999999\r\n\r\n",
        b"{}",
    )
    assert answer.startswith("HTTP/1.1 413"), answer[:200]
    # header bytes that are not ASCII are kept as text, never a crash
    body = b'{"latin": 1}'
    answer = _raw(
        port,
        "POST /flows/orders/in HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"X-Deployd-Signature: {sign(body)}\r\nX-Name: caf\xe9\r\n"
        f"Content-Length: {len(body)}\r\n\r\n",
        body,
    )
    assert answer.startswith("HTTP/1.1 202"), answer[:300]
    accepted.append({"latin": 1})

    # paths and methods: nothing but POST /flows/<name>/in reaches the intake
    for path in ("/flows/orders/in/x", "/flows//in", "/flows/orders%2Fx/in", "/flows/../in"):
        resp = HTTP.post(url + path, content=b"{}", headers={"content-type": "application/json"})
        assert resp.status_code in (404, 405), (path, resp.status_code)
    assert post(url, "ORDERS", {"a": 1}, secret=None).status_code == 404
    assert post(url, "o" * 5000, {"a": 1}, secret=None).status_code == 404
    assert HTTP.get(url + "/flows/orders/in").status_code in (404, 405)

    # the daemon still serves, and exactly the accepted bodies reached the flow, in order
    assert HTTP.get(url + "/healthz", timeout=5).status_code == 200
    wait_until(lambda: len(read_out(out)) >= len(accepted), timeout=60)
    rows = read_out(out)
    assert [r["body"] for r in rows] == accepted
    assert rows[-1]["headers"]["x-name"] == "caf\xe9"
    assert "x-deployd-signature" not in rows[-1]["headers"]


def test_auth_none_is_refused_off_loopback(tmp_path: Path) -> None:
    from deployd.config import load
    from deployd.errors import FlowError
    from deployd.flows.drafts import Drafts

    path = tmp_path / "config.toml"
    path.write_text(
        f'[daemon]\nstate_dir = "{tmp_path}/var"\nlisten = "0.0.0.0:8787"\n'
        'api_token = "a-long-api-token-for-this-test-0123456789"\n'
        '[[components]]\nname = "hello"\nwebhook_secret = "a-webhook-secret-0123456789"\n'
    )
    drafts = Drafts(load(path), None)  # type: ignore[arg-type]
    text = (
        'name = "open"\n[[steps]]\nid = "in"\nbuiltin = "http"\nauth = "none"\n'
        '[[steps]]\nid = "rec"\ncomponent = "hello"\nfunction = "record"\n'
    )
    with pytest.raises(FlowError, match=r'auth = "none" is allowed only while daemon\.listen'):
        drafts.parse(text)
    secret = text.replace('auth = "none"', 'auth = "token"\nsecret = "${SOME_SECRET}"')
    with pytest.raises(FlowError, match="SOME_SECRET is not set"):
        drafts.parse(secret)
