"""HTTP-fed flows: `POST /flows/{name}/in`, verified before parsed, committed before answered.

Pure: no HTTP framework here. `FlowIntake.handle(name, headers, body)` returns an `Answer`
(status, body bytes, headers); `deployd.api.hooks` serves it. Order of work, so that nothing
unauthenticated is parsed and the answer never says more than the caller may know:

1. refuse while the daemon stops (503, Retry-After);
2. the content type (415) and the raw body, bounded by `daemon.max_webhook_bytes` (413);
3. the credentials over the raw bytes, constant-time (`auth`: "hmac" — X-Deployd-Signature:
   sha256=<hex HMAC-SHA256 of the body> —, "token" — Authorization: Bearer <secret> —, or
   "none"). A request without credentials to a flow that needs them is answered exactly like
   one to a flow that does not exist (404); wrong credentials, and any credentials sent to a
   flow that does not exist, get 401: names do not leak either way;
4. the flow must run (503, Retry-After) and its first queue have room (429, Retry-After);
5. parse (400: malformed JSON, NaN, nested too deeply); the message (body = the JSON, an
   object; headers = content-type, user-agent and x-* minus the signature) is committed to
   the first action's queue by the runtime, and only then answered: 202 {"id": messageId}.
   `reply = "sync"` waits for the first httpReply a step emits (504 after reply_timeout,
   the message still handled).

The intake belongs to the flow, not to a version: the runtime puts a request into the queue
of the version that runs or that a publish is switching to, so a publish refuses nothing.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import AsyncIterable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..config import Config
from ..digests import bearer, hmac_sha256_hex, same_secret, same_signature
from ..errors import FlowError
from ..pipeline.descriptor import MAX_DEPTH, json_depth
from ..runtime.base import InputClosed, InputFull, Runtime
from ..runtime.stepenv import api_uri
from ..sources.webhook import read_body
from . import secrets

if TYPE_CHECKING:
    from ..metrics import Metrics
    from ..store import Store
    from .publish import Publisher

log = logging.getLogger("deployd.intake")
dumps = json.JSONEncoder(separators=(",", ":")).encode

SIGNATURE = "x-deployd-signature"
MAX_HEADER_BYTES = 64 * 1024  # of the request headers kept in the message
NOT_FOUND = "no HTTP-fed flow of that name, or a request without credentials to one that needs them"
BAD_CREDENTIALS = (
    "credentials wrong, or no such flow (send X-Deployd-Signature: sha256=<hex HMAC-SHA256 of "
    "the body with the flow's secret>, or Authorization: Bearer <secret>, as the flow's auth "
    "says)"
)
# Response headers a step's httpReply cannot set: the server owns the framing.
HOP_BY_HOP = {
    "connection",
    "content-length",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
}


# Request headers, looked up in lower case; items() gives every pair (starlette's Headers).
Headers = Mapping[str, str]


@dataclass(frozen=True, slots=True)
class Answer:
    """The HTTP answer to one request: status, body bytes, headers (content-type included)."""

    status: int
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)

    @classmethod
    def json(cls, status: int, value: Any, headers: dict[str, str] | None = None) -> Answer:
        return cls(
            status, dumps(value).encode(), {"content-type": "application/json"} | (headers or {})
        )


class _Refused(Exception):
    def __init__(self, status: int, detail: str, headers: dict[str, str] | None = None) -> None:
        self.answer = Answer.json(status, {"detail": detail}, headers)
        super().__init__(detail)


@dataclass(frozen=True)
class HttpSettings:
    """A flow's intake as its active version says: auth, its secret (expanded), reply."""

    auth: str
    secret: bytes
    reply: str
    reply_timeout: float

    @classmethod
    def of(cls, http: Any) -> HttpSettings:
        secret = http.get("secret") or ""
        return cls(
            str(http.get("auth") or "hmac"),
            str(secret).encode(),
            str(http.get("reply") or "async"),
            float(http.get("reply_timeout") or 30.0),
        )


def flow_url(config: Config, flow: str) -> str:
    """Where a flow's requests go, as `flow show` and `status` print it."""
    return f"{api_uri(config.daemon.host, config.daemon.port)}/flows/{flow}/in"


class FlowIntake:
    """The state behind the route: settings lookup, the refusal log's clock."""

    def __init__(
        self,
        config: Callable[[], Config],
        store: Store,
        publisher: Publisher,
        runtime: Runtime,
        metrics: Metrics,
        accepting: Callable[[], bool] = lambda: True,
    ) -> None:
        from ..store import FlowStore

        self.config = config
        self.fs = FlowStore(store)
        self.publisher = publisher
        self.runtime = runtime
        self.accepting = accepting
        self.metrics = metrics
        self._known: set[str] = set()  # names that were HTTP-fed flows (metric labels)
        self._dummy_key = os.urandom(32)
        self._refusals_logged: dict[str, float] = {}

    async def handle(
        self, name: str, headers: Headers, body: bytes | AsyncIterable[bytes]
    ) -> Answer:
        """Answer one request to flow `name` (see the module docstring)."""
        try:
            answer = await self._handle(name, headers, body)
        except _Refused as exc:
            answer = exc.answer
        # labelled by flow only for names that were HTTP-fed flows: no label per guess
        self.metrics.flow_request(name if name in self._known else "-", answer.status)
        return answer

    async def _handle(
        self, name: str, headers: Headers, stream: bytes | AsyncIterable[bytes]
    ) -> Answer:
        if not self.accepting():
            raise _Refused(503, "deployd is stopping; retry", {"Retry-After": "5"})
        if not _is_json(headers.get("content-type")):
            raise _Refused(415, "send Content-Type: application/json")
        config = self.config()
        raw = await _read_body(headers, stream, config.daemon.max_webhook_bytes)
        settings = self.settings(name)
        if settings is None or (settings.auth == "none" and not config.daemon.listen_is_loopback):
            self._verify(self._dummy_key, "hmac", headers, raw)  # the same work either way
            raise self._unauthenticated(headers)
        if settings.auth != "none" and not self._verify(
            settings.secret, settings.auth, headers, raw
        ):
            self._log_refusal(name)
            raise self._unauthenticated(headers)
        body = _parse(raw)
        message_headers = _message_headers(headers)
        try:
            accepted = await self.runtime.accept(
                name, body, message_headers, reply=settings.reply == "sync"
            )
        except InputFull as exc:
            raise _Refused(429, str(exc), {"Retry-After": str(exc.retry_after)}) from None
        except InputClosed as exc:
            raise _Refused(503, str(exc), {"Retry-After": "5"}) from None
        except FlowError as exc:  # the commit failed: nothing was queued
            log.error("flow %s: a request could not be queued: %s", name, exc)
            raise _Refused(
                503, "the request could not be queued; retry", {"Retry-After": "1"}
            ) from None
        if accepted.reply is None:
            return Answer.json(202, {"id": accepted.msg_id})
        try:
            reply = await asyncio.wait_for(asyncio.shield(accepted.reply), settings.reply_timeout)
        except TimeoutError:
            return Answer.json(
                504,
                {
                    "id": accepted.msg_id,
                    "detail": f"no step replied (httpReply) within reply_timeout "
                    f"({settings.reply_timeout:g}s); the message is still handled",
                },
            )
        finally:
            accepted.forget()
        return reply_answer(reply, accepted.msg_id)

    def settings(self, name: str) -> HttpSettings | None:
        """The intake settings of `name` (None: no such HTTP-fed flow): the running
        version's, else the active version's from the state database."""
        run = self.publisher.runs.get(name)
        if run is not None:
            spec = run.spec
            if not spec.http_fed:
                return None
            self._known.add(name)
            return HttpSettings.of(spec.steps[0].http)
        flow = self.fs.flow(name) if len(name) <= 63 else None
        fv = self.fs.flow_version(name, flow["active_version"]) if flow else None
        first = fv["steps"][0] if fv and fv["steps"] else None
        if not first or first.get("builtin") != "http":
            return None
        self._known.add(name)
        http = dict(first.get("http") or {})
        if http.get("secret"):
            try:
                http["secret"] = secrets.expand(
                    {"secret": http["secret"]}, "steps[0]", self.config()
                )["secret"]
            except FlowError:
                return None  # its secret is not set: nothing can authenticate (fail closed)
        return HttpSettings.of(http)

    @staticmethod
    def _verify(secret: bytes, auth: str, headers: Headers, raw: bytes) -> bool:
        if auth == "token":
            return same_secret(bearer(headers.get("authorization")), secret)
        expected = "sha256=" + hmac_sha256_hex(secret, raw)
        return same_signature(headers.get(SIGNATURE), expected) and bool(secret)

    @staticmethod
    def _unauthenticated(headers: Headers) -> _Refused:
        if headers.get(SIGNATURE) is None and headers.get("authorization") is None:
            return _Refused(404, NOT_FOUND)
        return _Refused(401, BAD_CREDENTIALS)

    def _log_refusal(self, flow: str) -> None:
        # At most one line per flow a minute: a flood of forged requests can't flood logs.
        now = time.monotonic()
        if now - self._refusals_logged.get(flow, -60.0) >= 60.0:
            self._refusals_logged[flow] = now
            log.warning("flow %s: a request was refused: credentials missing or wrong", flow)


def _is_json(value: Any) -> bool:
    media = str(value or "").split(";", 1)[0].strip().lower()
    return media == "application/json" or (
        media.startswith("application/") and media.endswith("+json")
    )


async def _read_body(headers: Headers, body: bytes | AsyncIterable[bytes], limit: int) -> bytes:
    too_big = _Refused(413, f"body larger than daemon.max_webhook_bytes ({limit} bytes)")
    return await read_body(headers, body, limit, too_big)


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _finite(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise ValueError(f"the number {text[:40]} is too large")
    return value


def _parse(raw: bytes) -> str:
    """The body as the message's: JSON text of an object (another JSON value is wrapped as
    {"value": …}, as a step's plain emitted value is). The text is kept as sent when it can
    be spliced into the steps' JSON lines (no line breaks), else encoded again, compactly."""
    try:
        text = raw.decode("utf-8")
        value = json.loads(text, parse_constant=_no_constants, parse_float=_finite)
    except RecursionError:
        raise _Refused(400, "malformed JSON: nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise _Refused(400, f"malformed JSON: {str(exc)[:200]}") from None
    if raw.count(b"[") + raw.count(b"{") > MAX_DEPTH and json_depth(value) > MAX_DEPTH:
        raise _Refused(400, f"malformed JSON: nested more than {MAX_DEPTH} levels deep")
    if not isinstance(value, dict):
        return str(dumps({"value": value}))
    if "\n" in text or "\r" in text:
        return str(dumps(value))
    return text.strip(" \t")


def _message_headers(headers: Headers) -> dict[str, str]:
    """content-type, user-agent and x-* request headers (the signature left out)."""
    out: dict[str, str] = {}
    size = 0
    for key, value in headers.items():
        name = str(key).lower()
        if name == SIGNATURE or not (
            name.startswith("x-") or name in ("content-type", "user-agent")
        ):
            continue
        size += len(name) + len(value)
        if size > MAX_HEADER_BYTES:
            raise _Refused(431, f"the x-* headers are larger than {MAX_HEADER_BYTES} bytes")
        out[name] = f"{out[name]}, {value}" if name in out else str(value)
    return out


def reply_answer(reply: Any, msg_id: str) -> Answer:
    """A step's httpReply `{statusCode, body, headers}` as the HTTP answer (the platform's
    shape). A body that is a string is sent as is (text/plain unless its headers say), any
    other value as JSON; a bad statusCode is the step's fault: 502."""
    if not isinstance(reply, dict):
        reply = {"body": reply}
    status = reply.get("statusCode", 200)
    if isinstance(status, str) and status.isdigit():
        status = int(status)
    if not isinstance(status, int) or isinstance(status, bool) or not 200 <= status <= 599:
        return Answer.json(
            502,
            {
                "id": msg_id,
                "detail": f"the step's httpReply has statusCode {status!r}, not 200-599",
            },
        )
    headers: dict[str, str] = {}
    given = reply.get("headers")
    for key, value in given.items() if isinstance(given, dict) else ():
        name, text = str(key).lower(), str(value)
        if name in HOP_BY_HOP or not _token(name) or any(c in text for c in "\r\n\0"):
            continue
        headers[name] = text
    body = reply.get("body")
    if status in (204, 304):
        body = None  # no body is allowed with these
    if isinstance(body, str):
        data = body.encode()
        headers.setdefault("content-type", "text/plain; charset=utf-8")
    elif body is None:
        data = b""
    else:
        data = json.dumps(body).encode()
        headers.setdefault("content-type", "application/json")
    return Answer(status, data, headers)


_TOKEN = set("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyz")


def _token(name: str) -> bool:
    return bool(name) and all(c in _TOKEN for c in name)
