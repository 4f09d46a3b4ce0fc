"""Helpers for HTTP-fed flows (`builtin = "http"`): a component whose actions record, reply
or take their time, flow files, and signed requests. Shared by tests/flows/test_http.py,
tests/hostile/test_http_hostile.py and bench/bench_http.py."""

from __future__ import annotations

import hashlib
import hmac
import json
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import Daemon, Work
from tests.flows.conftest import FlowEnv, flow_toml

SECRET_VAR = "ORDERS_IN_SECRET"
SECRET = "s3cret-orders-in-0123456789abcdef"

WEB_DESC: dict[str, Any] = {
    "title": "Web",
    "runtime": "python",
    "triggers": {"idle": {"main": "./lib/idle.py", "title": "Idle"}},
    "actions": {
        "record": {
            "main": "./lib/record.py",
            "title": "Record",
            "fields": {"out": {"label": "Output file", "required": True}},
        },
        "reply": {"main": "./lib/reply.py", "title": "Reply"},
        "slow": {"main": "./lib/slow.py", "title": "Slow"},
    },
}

IDLE = "def process(msg, cfg, snapshot, ctx):\n    return None\n"


def record(tag: str) -> str:
    """An action appending {"id", "body", "headers", "by"} lines to cfg["out"]."""
    return textwrap.dedent(
        f"""\
        import json
        TAG = {tag!r}

        def process(msg, cfg):
            line = {{"id": msg["id"], "body": msg["body"], "headers": msg["headers"], "by": TAG}}
            with open(cfg["out"], "a") as fh:
                fh.write(json.dumps(line) + "\\n")
            return msg["body"]
        """
    )


REPLY = """\
def process(msg, cfg, snapshot, ctx):
    if not msg["body"].get("silent"):
        ctx.emit("httpReply", {"statusCode": 201, "body": {"echo": msg["body"], "by": "py"},
                               "headers": {"X-By": "python", "Content-Length": "1"}})
        ctx.emit("httpReply", {"statusCode": 500, "body": "second reply: ignored"})
    return msg["body"]
"""

SLOW = """\
import time

def process(msg, cfg):
    time.sleep(float(cfg.get("delay", "0.2")))
    return msg["body"]
"""


def web_files(tag: str = "v1") -> dict[str, Any]:
    return {
        "component.json": WEB_DESC,
        "lib/idle.py": IDLE,
        "lib/record.py": record(tag),
        "lib/reply.py": REPLY,
        "lib/slow.py": SLOW,
    }


def http_step(auth: str = "hmac", reply: str = "async", **more: Any) -> dict[str, Any]:
    step: dict[str, Any] = {"id": "in", "builtin": "http", "auth": auth, "reply": reply}
    if auth != "none":
        step["secret"] = "${" + SECRET_VAR + "}"
    step.update(more)
    return step


def http_flow(name: str, out: Path, *middle: dict[str, Any], **http: Any) -> str:
    """in (builtin http) → *middle → rec (record into `out`)."""
    steps = [
        http_step(**http),
        *middle,
        {"id": "rec", "component": "hello", "function": "record", "config": {"out": out}},
    ]
    return flow_toml(name, out, steps=steps)


def sign(body: bytes, secret: str = SECRET) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def post(
    url: str,
    flow: str,
    body: Any = None,
    *,
    raw: bytes | None = None,
    secret: str | None = SECRET,
    headers: dict[str, str] | None = None,
    client: httpx.Client | None = None,
    timeout: float = 30,
) -> httpx.Response:
    """POST /flows/<flow>/in, signed with `secret` (None: unsigned)."""
    data = raw if raw is not None else json.dumps(body if body is not None else {}).encode()
    sent = {"content-type": "application/json"}
    if secret is not None:
        sent["x-deployd-signature"] = sign(data, secret)
    sent.update(headers or {})
    send = client.post if client is not None else httpx.post
    return send(f"{url}/flows/{flow}/in", content=data, headers=sent, timeout=timeout)


def make_http_env(
    make_env: Callable[..., FlowEnv], monkeypatch: pytest.MonkeyPatch, **daemon_keys: Any
) -> FlowEnv:
    """A daemon with the `web` component registered as hello v1 and the secret exported."""
    monkeypatch.setenv(SECRET_VAR, SECRET)
    return make_env(web_files(), **daemon_keys)


__all__ = ["Daemon", "Work"]
