"""Notification bodies: Slack incoming-webhook JSON, and deployd's own signed JSON.

Slack (https://api.slack.com/messaging/webhooks): ``POST`` of ``{"text": …, "blocks": […]}``
with ``Content-Type: application/json``; ``text`` is the fallback shown in notifications when
there are ``blocks``; ``&``, ``<`` and ``>`` in mrkdwn text are written ``&amp;``, ``&lt;``,
``&gt;`` (Slack's "escaping text" rule), so a commit message cannot inject a link or mention.

json (deployd's own, documented in README "Notifications"): the body is one JSON object ::

    {"id": "<delivery id>", "event": "deploy.failed", "ts": "<event time, ISO 8601 UTC>",
     "timestamp": <send time, unix seconds>, "component": "hello" | null,
     "flow": "counter" | null, "sha": "<40 hex>" | null, "message": "<one line>",
     "detail": {…}, "url": "<dashboard page>" | null}

with the headers ``X-Deployd-Event``, ``X-Deployd-Delivery`` (the id, the same for every
retry: receivers drop repeats), ``X-Deployd-Timestamp`` (= ``timestamp``) and
``X-Deployd-Signature: sha256=<hex HMAC-SHA256 of the exact body bytes, keyed by secret>``.
"""

from __future__ import annotations

import json
import time
from typing import Any

from ..config import NotifyConfig
from ..digests import hmac_sha256_hex, same_signature
from .providers import Request

EMOJI = {
    "build.failed": ":x:",
    "deploy.failed": ":x:",
    "deploy.rolled_back": ":leftwards_arrow_with_hook:",
    "flow.needs_attention": ":warning:",
    "dead_letters.added": ":envelope:",
    "build.succeeded": ":white_check_mark:",
    "deploy.done": ":rocket:",
}


def slack_escape(text: str) -> str:
    """Slack's three control characters, escaped as its docs ask."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def notify_request(
    target: NotifyConfig, payload: dict[str, Any], now: float | None = None
) -> Request:
    """The request delivering the event `payload` (what `writer` stored) to `target`."""
    url = target.url.get_secret_value()
    secrets = [url]
    headers = {"Content-Type": "application/json", "User-Agent": "deployd"}
    if target.format == "slack":
        line = slack_escape(payload["message"])
        emoji = EMOJI.get(payload["event"], ":information_source:")
        text = f"{emoji} deployd {payload['event']}: {line}"
        if payload.get("url"):
            text += f" <{slack_escape(payload['url'])}|open in deployd>"
        body = json.dumps(
            {
                "text": text,
                "blocks": [{"type": "section", "text": {"type": "mrkdwn", "text": text}}],
            }
        ).encode()
        return Request("POST", url, headers, body, tuple(secrets))
    stamp = int(time.time() if now is None else now)
    doc = {
        "id": payload["id"],
        "event": payload["event"],
        "ts": payload["ts"],
        "timestamp": stamp,
        "component": payload.get("component"),
        "flow": payload.get("flow"),
        "sha": payload.get("sha"),
        "message": payload["message"],
        "detail": payload.get("detail") or {},
        "url": payload.get("url"),
    }
    body = json.dumps(doc, separators=(",", ":")).encode()
    headers |= {
        "X-Deployd-Event": payload["event"],
        "X-Deployd-Delivery": payload["id"],
        "X-Deployd-Timestamp": str(stamp),
    }
    if target.secret is not None:
        key = target.secret.get_secret_value()
        secrets.append(key)
        headers["X-Deployd-Signature"] = f"sha256={hmac_sha256_hex(key, body)}"
    return Request("POST", url, headers, body, tuple(secrets))


def verify(secret: str, body: bytes, signature: str) -> bool:
    """Whether `signature` (``sha256=<hex>``) is `body`'s HMAC under `secret` (constant time):
    what a receiver of the json format does; tests use it."""
    return same_signature(signature, f"sha256={hmac_sha256_hex(secret, body)}")
