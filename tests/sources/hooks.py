"""Building provider-shaped webhook requests (payload files + each provider's headers)."""

from __future__ import annotations

import functools
import hashlib
import hmac
import json
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import httpx

from tests.conftest import HTTP

PAYLOADS = Path(__file__).parent / "payloads"
ZERO = "0" * 40
BEFORE = "0d1a26e67d8f8f1e2b7c4a9e5d3c2b1a09f8e7d6"


def _fill(value: Any, subs: dict[str, str]) -> Any:
    if isinstance(value, str):
        for key, sub in subs.items():
            value = value.replace(f"__{key}__", sub)
        return value
    if isinstance(value, list):
        return [_fill(v, subs) for v in value]
    if isinstance(value, dict):
        return {k: _fill(v, subs) for k, v in value.items()}
    return value


@functools.cache
def _template(name: str) -> str:
    return (PAYLOADS / f"{name}.json").read_text()


def payload(name: str, **subs: str) -> dict[str, Any]:
    """A realistic payload from tests/sources/payloads/<name>.json with __KEY__ filled in."""
    defaults = {"BEFORE": BEFORE, "CLONE_URL": "https://git.example.com/acme/billing.git"}
    data = json.loads(_template(name))
    return dict(_fill(data, {**defaults, **subs}))


def sig(secret: str, body: bytes) -> str:
    return hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def delivery() -> str:
    return str(uuid.uuid4())


Request = tuple[dict[str, str], bytes]


def github(
    secret: str | None,
    body: dict[str, Any] | bytes,
    event: str = "push",
    delivery_id: str | None = None,
    form: bool = False,
) -> Request:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    if form:
        raw = urlencode({"payload": raw.decode()}).encode()
    headers = {
        "User-Agent": "GitHub-Hookshot/5f0ac5e",
        "Accept": "*/*",
        "Content-Type": "application/x-www-form-urlencoded" if form else "application/json",
        "X-GitHub-Event": event,
        "X-GitHub-Delivery": delivery_id or delivery(),
        "X-GitHub-Hook-ID": "471234901",
        "X-GitHub-Hook-Installation-Target-Type": "repository",
        "X-GitHub-Hook-Installation-Target-ID": "715240861",
    }
    if secret is not None:
        headers["X-Hub-Signature"] = "sha1=" + hmac.new(secret.encode(), raw, "sha1").hexdigest()
        headers["X-Hub-Signature-256"] = "sha256=" + sig(secret, raw)
    return headers, raw


def gitea(
    secret: str | None,
    body: dict[str, Any],
    forgejo: bool = False,
    event: str = "push",
    delivery_id: str | None = None,
) -> Request:
    raw = json.dumps(body, indent=2).encode()
    did = delivery_id or delivery()
    headers = {
        "User-Agent": "Go-http-client/1.1",
        "Content-Type": "application/json",
        # Gitea and Forgejo send GitHub's and Gogs' headers too, for compatibility.
        "X-GitHub-Delivery": did,
        "X-GitHub-Event": event,
        "X-GitHub-Event-Type": event,
        "X-Gogs-Delivery": did,
        "X-Gogs-Event": event,
        "X-Gitea-Delivery": did,
        "X-Gitea-Event": event,
        "X-Gitea-Event-Type": event,
    }
    if forgejo:
        headers.update({"X-Forgejo-Delivery": did, "X-Forgejo-Event": event})
    if secret is not None:
        digest = sig(secret, raw)
        headers.update(
            {
                "X-Gitea-Signature": digest,
                "X-Gogs-Signature": digest,
                "X-Hub-Signature-256": "sha256=" + digest,
            }
        )
        if forgejo:
            headers["X-Forgejo-Signature"] = digest
    return headers, raw


def gitlab(
    token: str | None,
    body: dict[str, Any],
    event: str = "Push Hook",
    delivery_id: str | None = None,
) -> Request:
    raw = json.dumps(body).encode()
    headers = {
        "User-Agent": "GitLab/17.9.1",
        "Content-Type": "application/json",
        "X-Gitlab-Event": event,
        "X-Gitlab-Event-UUID": delivery_id or delivery(),
        "X-Gitlab-Webhook-UUID": "3c5c0404-c866-44bc-a5f6-452bb1bfc76e",
        "X-Gitlab-Instance": "https://gitlab.example.com",
    }
    if token is not None:
        headers["X-Gitlab-Token"] = token
    return headers, raw


def bitbucket(
    secret: str | None,
    body: dict[str, Any],
    event: str = "repo:push",
    delivery_id: str | None = None,
) -> Request:
    raw = json.dumps(body).encode()
    headers = {
        "User-Agent": "Bitbucket-Webhooks/2.0",
        "Content-Type": "application/json",
        "X-Event-Key": event,
        "X-Hook-UUID": "{0c8f7d2e-5d3a-4b59-9a34-2c4f1a0b9e77}",
        "X-Request-UUID": delivery_id or delivery(),
        "X-Attempt-Number": "1",
    }
    if secret is not None:
        headers["X-Hub-Signature"] = "sha256=" + sig(secret, raw)
    return headers, raw


def generic(secret: str | None, ref: str, after: str, delivery_id: str | None = None) -> Request:
    raw = json.dumps({"ref": ref, "after": after}).encode()
    headers = {"Content-Type": "application/json"}
    if delivery_id:
        headers["X-Deployd-Delivery"] = delivery_id
    if secret is not None:
        headers["X-Deployd-Signature"] = "sha256=" + sig(secret, raw)
    return headers, raw


def post(base: str, component: str, request: Request, timeout: float = 10) -> httpx.Response:
    headers, body = request
    return HTTP.post(f"{base}/hooks/{component}", headers=headers, content=body, timeout=timeout)
