"""One small strategy per hosting service: detect it from the headers, verify, then parse.

Every provider answers the same questions about a request: is it mine (`detect`), does it
carry a signature or token at all (`signed`), is that signature right for the raw body
(`verify`, constant-time, before anything is parsed), and which ref moved to which commit
(`parse`, which raises `WebhookError(400)` for malformed bodies). Nothing here fetches or
follows any url found in a payload.

    GitHub          X-GitHub-Event, X-GitHub-Delivery, X-Hub-Signature-256: sha256=<hex>
    Gitea/Forgejo   X-Gitea-Event/X-Forgejo-Event, …-Delivery, …-Signature: <hex>
    GitLab          X-Gitlab-Event: Push Hook, X-Gitlab-Event-UUID, X-Gitlab-Token: <secret>
    Bitbucket Cloud X-Event-Key: repo:push, X-Request-UUID, X-Hub-Signature: sha256=<hex>
    generic         X-Deployd-Signature: sha256=<hex> over {"ref": …, "after": …}
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs

from ..digests import hmac_sha256_hex, same_secret, same_signature
from ..errors import WebhookError

# Header names are looked up in lower case (Starlette's Headers does so for any case).
Headers = Mapping[str, str]

ZERO_RE = re.compile(r"^0+$")
_DELIVERY_RE = re.compile(r"^[A-Za-z0-9{}._:-]{1,200}$")
JSON_TYPES = ("application/json",)
FORM_TYPE = "application/x-www-form-urlencoded"


@dataclass(frozen=True)
class RefUpdate:
    """One ref that a push moved: `after` is None (or all zeros) when the ref was deleted."""

    ref: str
    after: str | None
    deleted: bool = False


@dataclass(frozen=True)
class Hook:
    """What deployd needs from a verified webhook request."""

    provider: str
    kind: str  # "push", "ping" or "other"
    event: str  # the provider's own name of the event, for messages
    delivery_id: str | None
    updates: tuple[RefUpdate, ...] = ()


def _delivery(value: str | None) -> str | None:
    if value is None or value == "":
        return None
    if not _DELIVERY_RE.match(value):
        raise WebhookError(400, "malformed delivery id header")
    return value


def media_type(headers: Headers) -> str:
    return headers.get("content-type", "").split(";", 1)[0].strip().lower()


def _load_json(body: bytes, form: bool) -> dict[str, Any]:
    """Parse a (verified) body: JSON, or GitHub's form-encoded ``payload=<json>`` variant."""
    try:
        if form:
            fields = parse_qs(body.decode("utf-8"), keep_blank_values=True, max_num_fields=50)
            values = fields.get("payload")
            if not values:
                raise WebhookError(400, "form-encoded body has no payload field")
            text = values[0]
        else:
            text = body.decode("utf-8")
        data = json.loads(text)
    except WebhookError:
        raise
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError too
        raise WebhookError(400, f"body is not valid JSON: {str(exc)[:120]}") from exc
    if not isinstance(data, dict):
        raise WebhookError(400, "body must be a JSON object")
    return data


def _str_field(data: Mapping[str, Any], key: str) -> str:
    value = data.get(key)
    if not isinstance(value, str) or not value:
        raise WebhookError(400, f"missing or malformed field {key!r}")
    return value


def _ref_after(data: Mapping[str, Any], deleted: bool = False) -> RefUpdate:
    ref = _str_field(data, "ref")
    after = _str_field(data, "after")
    return RefUpdate(ref, after, deleted=deleted or bool(ZERO_RE.match(after)))


class Provider:
    """Base strategy; subclasses name their headers and parse their payload shape."""

    name = "generic"
    event_headers: tuple[str, ...] = ()
    delivery_headers: tuple[str, ...] = ()
    signature_headers: tuple[str, ...] = ()
    form_allowed = False

    def detect(self, headers: Headers) -> bool:
        return any(headers.get(h) for h in self.event_headers)

    def event(self, headers: Headers) -> str:
        for h in self.event_headers:
            value = headers.get(h)
            if value:
                return value.strip()[:100]
        return "push"

    def delivery(self, headers: Headers) -> str | None:
        for h in self.delivery_headers:
            value = headers.get(h)
            if value:
                return _delivery(value.strip())
        return None

    def signed(self, headers: Headers) -> bool:
        return any(headers.get(h) for h in self.signature_headers)

    def verify(self, headers: Headers, body: bytes, secret: str) -> bool:
        return same_signature(
            headers.get(self.signature_headers[0]), "sha256=" + hmac_sha256_hex(secret, body)
        )

    def accepts(self, content_type: str) -> tuple[bool, bool]:
        """(acceptable, form-encoded) for a request's media type."""
        if content_type in JSON_TYPES or content_type.endswith("+json"):
            return True, False
        if self.form_allowed and content_type == FORM_TYPE:
            return True, True
        return False, False

    def parse(self, headers: Headers, body: bytes, form: bool) -> Hook:
        raise NotImplementedError


class GitHub(Provider):
    name = "github"
    event_headers: tuple[str, ...] = ("x-github-event",)
    delivery_headers: tuple[str, ...] = ("x-github-delivery",)
    signature_headers: tuple[str, ...] = ("x-hub-signature-256",)
    form_allowed = True

    def parse(self, headers: Headers, body: bytes, form: bool) -> Hook:
        event = self.event(headers)
        delivery = self.delivery(headers)
        if event == "ping":
            return Hook(self.name, "ping", event, delivery)
        if event != "push":
            return Hook(self.name, "other", event, delivery)
        data = _load_json(body, form)
        return Hook(
            self.name, "push", event, delivery, (_ref_after(data, data.get("deleted") is True),)
        )


class Gitea(GitHub):
    """Gitea and Forgejo: GitHub's push shape, their own headers (bare hex signature)."""

    name = "gitea"
    event_headers = ("x-forgejo-event", "x-gitea-event")
    delivery_headers = ("x-forgejo-delivery", "x-gitea-delivery")
    signature_headers = ("x-forgejo-signature", "x-gitea-signature", "x-hub-signature-256")

    def verify(self, headers: Headers, body: bytes, secret: str) -> bool:
        digest = hmac_sha256_hex(secret, body)
        for h in self.signature_headers:
            value = headers.get(h)
            if value:
                return same_signature(
                    value, ("sha256=" if h == "x-hub-signature-256" else "") + digest
                )
        return False


class GitLab(Provider):
    name = "gitlab"
    event_headers = ("x-gitlab-event",)
    # Idempotency-Key (GitLab 17.4+) stays the same when GitLab retries a delivery.
    delivery_headers = ("idempotency-key", "x-gitlab-event-uuid")
    signature_headers = ("x-gitlab-token",)

    def verify(self, headers: Headers, body: bytes, secret: str) -> bool:
        return same_secret(headers.get("x-gitlab-token"), secret)

    def parse(self, headers: Headers, body: bytes, form: bool) -> Hook:
        event = self.event(headers)
        delivery = self.delivery(headers)
        if event not in ("Push Hook", "Tag Push Hook", "System Hook"):
            return Hook(self.name, "other", event, delivery)
        data = _load_json(body, form)
        kind = data.get("object_kind", data.get("event_name"))
        if kind not in ("push", "tag_push"):
            return Hook(self.name, "other", f"{event} ({str(kind)[:40]})", delivery)
        return Hook(self.name, "push", event, delivery, (_ref_after(data),))


class Bitbucket(Provider):
    """Bitbucket Cloud: one `repo:push` may carry several ref changes in push.changes[]."""

    name = "bitbucket"
    event_headers = ("x-event-key",)
    delivery_headers = ("x-request-uuid",)
    signature_headers = ("x-hub-signature",)

    def parse(self, headers: Headers, body: bytes, form: bool) -> Hook:
        event = self.event(headers)
        delivery = self.delivery(headers)
        if event == "diagnostics:ping":
            return Hook(self.name, "ping", event, delivery)
        if event != "repo:push":
            return Hook(self.name, "other", event, delivery)
        data = _load_json(body, form)
        push = data.get("push")
        changes = push.get("changes") if isinstance(push, dict) else None
        if not isinstance(changes, list) or not changes:
            raise WebhookError(400, "missing or malformed field 'push.changes'")
        return Hook(
            self.name, "push", event, delivery, tuple(self._change(c) for c in changes[:100])
        )

    @staticmethod
    def _ref(state: Any) -> str:
        if not isinstance(state, dict) or not isinstance(state.get("name"), str):
            raise WebhookError(400, "malformed ref in 'push.changes'")
        kind = state.get("type")
        prefix = "refs/tags/" if kind in ("tag", "annotated_tag") else "refs/heads/"
        return prefix + state["name"]

    def _change(self, change: Any) -> RefUpdate:
        if not isinstance(change, dict):
            raise WebhookError(400, "malformed entry in 'push.changes'")
        new, old = change.get("new"), change.get("old")
        if new is None:  # the ref was deleted ("closed": true)
            return RefUpdate(self._ref(old), None, deleted=True)
        target = new.get("target") if isinstance(new, dict) else None
        sha = target.get("hash") if isinstance(target, dict) else None
        if not isinstance(sha, str) or not sha:
            raise WebhookError(400, "missing field 'push.changes[].new.target.hash'")
        return RefUpdate(self._ref(new), sha)


class Generic(Provider):
    """Scripts and CI systems: ``{"ref": "refs/heads/main", "after": "<sha>"}``."""

    name = "generic"
    event_headers = ("x-deployd-event",)
    delivery_headers = ("x-deployd-delivery",)
    signature_headers = ("x-deployd-signature",)

    def detect(self, headers: Headers) -> bool:
        return True

    def parse(self, headers: Headers, body: bytes, form: bool) -> Hook:
        event = self.event(headers)
        delivery = self.delivery(headers)
        if event == "ping":
            return Hook(self.name, "ping", event, delivery)
        data = _load_json(body, form)
        return Hook(self.name, "push", "push", delivery, (_ref_after(data),))


# Gitea and Forgejo also send X-GitHub-Event for compatibility, so they are tried first.
PROVIDERS: tuple[Provider, ...] = (Gitea(), GitLab(), GitHub(), Bitbucket(), Generic())


def detect(headers: Headers) -> Provider:
    """The provider that sent a request, from its headers alone (never from the body)."""
    for provider in PROVIDERS:
        if provider.detect(headers):
            return provider
    return PROVIDERS[-1]
