"""Push webhooks from hosting services, verified before parsing: request in, decision out.

Pure: no HTTP framework here. `WebhookIntake.handle(component, headers, body)` returns a
`Decision` (status, JSON body, headers, the notice queued); `deployd.api.hooks` serves it as
`POST /hooks/{component}`. Order of work, so that nothing unauthenticated is parsed and
nothing slow happens before the reply (hosting services give up after ~10 s):

1. refuse while the daemon stops or too many hook bodies are being received (503);
2. the provider from the headers; its content type (415); the raw body, bounded (413);
3. the signature over the raw bytes, constant-time (401) — an unknown component is answered
   exactly like a component whose secret the caller does not know, so names do not leak;
4. parse (400); decide: ping / other event / tag / other branch / deletion / duplicate
   delivery / already built are 200 with a reason; a deployable push is 202;
5. record the delivery id (replay protection), hand the notice on, reply.

Notices are coalesced per component for a moment (`SETTLE`, at most `MAX_HOLD`): a burst
of pushes to one component becomes one or two builds of its newest commit.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..config import ComponentConfig, Config
from ..errors import WebhookError
from ..toolchains.git import is_sha
from ..types import PushNotice
from . import providers
from .providers import Headers, Hook, Provider, RefUpdate

if TYPE_CHECKING:
    from ..metrics import Metrics
    from ..store import Store

log = logging.getLogger("deployd.webhook")

SETTLE = 0.1  # seconds without a newer hook before a held notice goes to the pipeline
MAX_HOLD = 1.0  # ... but never held longer than this
MAX_IN_FLIGHT = 64  # bodies being received at once; more is answered 503 (bounds memory)
DELIVERY_KEEP = timedelta(hours=48)  # delivery ids are kept at least 24 h (the contract)
PRUNE_EVERY = 600.0

NOT_FOUND = "unknown component, or an unsigned request to a component that requires one"
BAD_SIGNATURE = (
    "signature or token missing or wrong, or no such component "
    "(the webhook's secret must equal the component's webhook_secret)"
)


@dataclass(frozen=True, slots=True)
class Decision:
    """The answer to one webhook request; `notice` is what it queued (202 only)."""

    status: int
    body: dict[str, Any]
    headers: dict[str, str] | None = None
    notice: PushNotice | None = None


@dataclass
class _Held:
    notice: PushNotice
    first: float
    last: float


class Coalescer:
    """Holds the newest notice per component briefly, then hands it to `notify`."""

    def __init__(
        self,
        notify: Callable[[PushNotice], object],
        settle: float = SETTLE,
        max_hold: float = MAX_HOLD,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.notify = notify
        self.settle = settle
        self.max_hold = max_hold
        self.clock = clock
        self._held: dict[str, _Held] = {}

    def offer(self, notice: PushNotice) -> None:
        now = self.clock()
        held = self._held.get(notice.component)
        if held is not None:
            held.notice, held.last = notice, now
            return
        self._held[notice.component] = _Held(notice, now, now)
        asyncio.get_running_loop().call_later(self.settle, self._fire, notice.component)

    def _fire(self, component: str) -> None:
        held = self._held.get(component)
        if held is None:
            return
        now = self.clock()
        due = min(held.last + self.settle, held.first + self.max_hold)
        if now < due - 0.001:
            asyncio.get_running_loop().call_later(due - now, self._fire, component)
            return
        del self._held[component]
        try:
            self.notify(held.notice)
        except Exception:
            log.exception("handing the webhook of %s to the pipeline failed", component)


class _Secrets:
    """Component secrets, with secret files re-read when they change (rotation)."""

    def __init__(self) -> None:
        self._files: dict[Path, tuple[int, str]] = {}

    def get(self, comp: ComponentConfig) -> str | None:
        if comp.webhook_secret is not None:
            return comp.webhook_secret.get_secret_value()
        path = comp.webhook_secret_file
        if path is None:
            return None
        try:
            mtime = os.stat(path).st_mtime_ns
            cached = self._files.get(path)
            if cached is None or cached[0] != mtime:
                cached = (mtime, path.read_text().strip())
                self._files[path] = cached
        except OSError as exc:
            # Fail closed: with an unreadable secret file no signature can be right.
            log.error("%s: webhook_secret_file unreadable: %s", comp.name, exc.strerror)
            return "\0unreadable"
        return cached[1] or "\0empty"


class DeliveryLog:
    """Delivery ids seen (replay protection), written in one transaction per loop tick.

    A commit per request was ~1/5 of a hook's CPU under load. Ids are checked against the
    ones not yet written as well as the database; a daemon killed within the tick forgets
    at most those ids, and a replayed commit is still never built twice (builds are
    idempotent per commit).
    """

    def __init__(self, store: Store) -> None:
        self.store = store
        self.pending: dict[tuple[str, str], tuple[str, str | None]] = {}

    def record(self, component: str, delivery_id: str, provider: str, sha: str | None) -> bool:
        """False when `delivery_id` was seen before for `component`."""
        key = (component, delivery_id)
        if key in self.pending or self.store.has_delivery(component, delivery_id):
            return False
        if not self.pending:
            asyncio.get_running_loop().call_soon(self.flush)
        self.pending[key] = (provider, sha)
        return True

    def flush(self) -> None:
        rows, self.pending = self.pending, {}
        if rows:
            self.store.record_deliveries(
                [(comp, did, provider, sha) for (comp, did), (provider, sha) in rows.items()]
            )


class WebhookIntake:
    """The state behind the route: in-flight count, secrets, coalescer, pruning clock.

    `config` is called per request (a reload replaces the config; secrets apply at once);
    `accepting` turns False once the daemon stops (503, so the sender retries later).
    """

    def __init__(
        self,
        config: Callable[[], Config],
        store: Store,
        notify: Callable[[PushNotice], object],
        metrics: Metrics,
        accepting: Callable[[], bool] = lambda: True,
    ) -> None:
        self.config = config
        self.store = store
        self.metrics = metrics
        self.accepting = accepting
        self.max_bytes = config().daemon.max_webhook_bytes
        self.coalescer = Coalescer(notify)
        self.deliveries = DeliveryLog(store)
        self.secrets = _Secrets()
        self.in_flight = 0
        self._last_prune = 0.0
        self._refusals_logged: dict[str, float] = {}

    async def handle(
        self, name: str, headers: Headers, body: bytes | AsyncIterable[bytes]
    ) -> Decision:
        """Decide on one request to component `name`.

        `headers` are looked up in lower case; `body` is the raw body, or its chunks as they
        arrive (read only once the headers passed, and never beyond `max_webhook_bytes`).
        """
        if not self.accepting():
            return Decision(503, {"detail": "deployd is stopping; retry"}, {"Retry-After": "5"})
        if self.in_flight >= MAX_IN_FLIGHT:
            return Decision(
                503, {"detail": "too many webhooks at once; retry"}, {"Retry-After": "1"}
            )
        self.in_flight += 1
        detected = providers.detect(headers)
        status = 500
        try:
            decision = await self._handle(name, headers, body, detected)
            status = decision.status
            return decision
        except WebhookError as exc:
            status = exc.status
            return Decision(exc.status, {"detail": str(exc)})
        finally:
            self.in_flight -= 1
            self.metrics.webhook_request(detected.name, status)

    async def _read_body(self, headers: Headers, body: bytes | AsyncIterable[bytes]) -> bytes:
        limit = self.max_bytes
        too_big = WebhookError(413, f"body larger than daemon.max_webhook_bytes ({limit} bytes)")
        return await read_body(headers, body, limit, too_big)

    async def _handle(
        self, name: str, headers: Headers, stream: bytes | AsyncIterable[bytes], provider: Provider
    ) -> Decision:
        ok, form = provider.accepts(providers.media_type(headers))
        if not ok:
            raise WebhookError(
                415,
                "send Content-Type: application/json"
                + (" (or GitHub's form-encoded payload=)" if provider.form_allowed else ""),
            )
        body = await self._read_body(headers, stream)
        comp = self.config().component(name)  # reloads replace the config
        if comp is None:
            # Answer as for a component whose secret the caller does not know.
            raise self._unauthenticated(provider, headers)
        secret = self.secrets.get(comp)
        if secret is not None and not provider.verify(headers, body, secret):
            self._log_refusal(comp.name, provider.name)
            raise self._unauthenticated(provider, headers)
        try:
            hook = provider.parse(headers, body, form)
        except WebhookError:
            raise
        except Exception as exc:  # a payload shape no provider strategy expected
            raise WebhookError(400, f"malformed {provider.name} payload") from exc
        return self._decide(comp, hook)

    def _log_refusal(self, component: str, provider: str) -> None:
        # At most one line per component a minute: a flood of forged requests can't flood logs.
        now = time.monotonic()
        if now - self._refusals_logged.get(component, -60.0) >= 60.0:
            self._refusals_logged[component] = now
            log.warning("%s: %s webhook refused: signature missing or wrong", component, provider)

    @staticmethod
    def _unauthenticated(provider: Provider, headers: Any) -> WebhookError:
        if provider.name == "generic" and not provider.signed(headers):
            return WebhookError(404, NOT_FOUND)
        return WebhookError(401, BAD_SIGNATURE)

    def _decide(self, comp: ComponentConfig, hook: Hook) -> Decision:
        def ignored(reason: str) -> Decision:
            return Decision(200, {"status": "ignored", "component": comp.name, "reason": reason})

        if hook.kind == "ping":
            return Decision(200, {"status": "ok", "component": comp.name, "reason": "ping"})
        if hook.kind != "push":
            return ignored(f"{hook.provider} event {hook.event!r} ignored; deployd acts on pushes")
        branch_ref = f"refs/heads/{comp.branch}"
        update: RefUpdate | None = None
        for candidate in hook.updates:
            if candidate.ref == branch_ref:
                update = candidate
        if update is None:
            first = hook.updates[0].ref if hook.updates else "nothing"
            if first.startswith("refs/tags/"):
                return ignored(f"tag push ({first}) ignored; {comp.name} deploys {branch_ref}")
            return ignored(f"push to {first[:200]} ignored; {comp.name} deploys {branch_ref}")
        if update.deleted or update.after is None:
            return ignored(f"branch {comp.branch!r} was deleted; the recent version stays")
        sha = update.after.lower()
        if not is_sha(sha):
            raise WebhookError(400, f"'after' is not a commit sha: {update.after[:80]!r}")
        store = self.store
        if hook.delivery_id is not None:
            self._prune()
            if not self.deliveries.record(comp.name, hook.delivery_id, hook.provider, sha):
                return ignored(f"duplicate delivery {hook.delivery_id}")
        if store.has_final_build(comp.name, sha):
            return ignored(f"commit {sha[:12]} was already built")
        notice = PushNotice(
            comp.name, branch_ref, sha, f"webhook:{hook.provider}", hook.delivery_id
        )
        self.coalescer.offer(notice)
        body = {"status": "queued", "component": comp.name, "sha": sha}
        if hook.delivery_id:
            body["delivery"] = hook.delivery_id
        return Decision(202, body, notice=notice)

    def _prune(self) -> None:
        now = time.monotonic()
        if now - self._last_prune < PRUNE_EVERY:
            return
        self._last_prune = now
        cutoff = (datetime.now(UTC) - DELIVERY_KEEP).isoformat(timespec="milliseconds")
        self.store.prune_deliveries(cutoff)


async def read_body(
    headers: Headers, body: bytes | AsyncIterable[bytes], limit: int, too_big: Exception
) -> bytes:
    """A request's body, at most `limit` bytes: `too_big` is raised as soon as the declared
    length or what arrived passes it (nothing more is read). For webhooks and HTTP-fed flows."""
    length = str(headers.get("content-length") or "")
    if length.isdigit() and int(length) > limit:
        raise too_big
    if isinstance(body, bytes):
        if len(body) > limit:
            raise too_big
        return body
    chunks: list[bytes] = []
    size = 0
    async for chunk in body:
        size += len(chunk)
        if size > limit:
            raise too_big
        chunks.append(chunk)
    return b"".join(chunks)
