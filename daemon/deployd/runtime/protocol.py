"""The wire protocol between the daemon and step processes ("sailors"), in one place.

JSON lines over a Unix stream socket under state_dir, one connection per step process. The
step's stdout and stderr go to its log file, never to this socket, so nothing the component
prints can corrupt the protocol.

sailor → daemon
    {"t": "hello", "token": str, "pid": int}     first line: which step process this is
    {"t": "ready"}                               module imported and init(cfg) done
    {"t": "failed", "error": str}                import or init failed (the process then exits)
    {"t": "data", "headers": dict, "attachments": dict?, "body": dict}
                                                 an output message of the current call/message
                                                 (attachments, only when it has any: {"<name>":
                                                 {"url", "size", "content-type"}}; before the
                                                 body, so a line that starts with empty headers
                                                 and the body is one without attachments)
    {"t": "snapshot", "data": dict}              replace the step snapshot
    {"t": "updateSnapshot", "data": dict}        merge into the step snapshot
    {"t": "error", "error": str, "stack": str?}  an error for the current call/message (first
                                                 line; the whole traceback or stack)
    {"t": "rebound", "error": str}               deliver the current message again later
    {"t": "updateKeys", "data": dict}            refreshed keys of the step's credential
                                                 (stored encrypted; any time, not tied to a
                                                 call; never logged)
    {"t": "httpReply", "data": dict}             {statusCode, body, headers}: the answer to
                                                 the sync HTTP request the current message
                                                 came from (HTTP-fed flows; first one wins)
    {"t": "done", "ref": int, "took": float}     the call/message `ref` is finished (took:
                                                 seconds of work, for the prefetch pace)
    {"t": "result", "ref": int, "data": any}     answer to startup/shutdown/method (after an
                                                 "error" line when it failed: data null)
daemon → sailor
    {"t": "call", "ref": int, "snapshot": dict?}            trigger: run process() once
    {"t": "msg", "ref": int, "msg": dict, "snapshot": dict?} action: process one message
        (msg: {"id", "body", "headers", "passthrough", "attachments"}; passthrough is what
        each earlier step of the flow execution emitted, by step id: {"<step>": {"id", "body",
        "headers", "attachments"?}}; attachments: {"<name>": {"url", "size", "content-type"}})
        Requests are pipelined: the daemon sends up to a step's `prefetch` messages before
        the first is done; the sailor handles them one at a time, in order, and answers in
        that order. Only a process's first call or message carries "snapshot"; after that
        the sailor keeps its own copy, changed by what it emits (snapshot/updateSnapshot),
        exactly as the daemon does. A sailor may buffer what it sends until it would block
        reading (or a large buffer), so one write carries many lines.
    {"t": "startup", "ref": int} / {"t": "shutdown", "ref": int, "data": any}
    {"t": "method", "ref": int, "name": str, "cfg": dict}
                                                 a one-off call of a function's module-level
                                                 method (getMetaModel, a select model method:
                                                 the platform's "service" verbs), answered by
                                                 "result" with what it returned; name
                                                 "verifyCredentials": the spec's `main` is a
                                                 verifier module, answered {verified, reason?}
    {"t": "stop"}                                finish the current work, then exit 0
    {"t": "spec", "spec": dict}                  to an idle pooled sailor (first line only):
                                                 become this step, its output going to
                                                 spec["log"]; then "ready" or "failed"
        Every step's spec (pooled or not) carries "env" (ELASTICIO_* and the flow file's
        env, set by the sailor before the component loads) and "variables" (the flow's).
        A spec with "service": true is a one-off process for "method" requests: the module
        is loaded without init(cfg) and needs no process(), as the platform's service does.
        "credential" names the step's credential (its fields are already merged into
        "config" by the daemon); None: it has none, and updateKeys is dropped with a warning.
"""

from __future__ import annotations

import json
from typing import Any

MAX_LINE = 16 * 1024 * 1024


_encoder = json.JSONEncoder(separators=(",", ":"), default=str)


def encode(obj: dict[str, Any]) -> bytes:
    return _encoder.encode(obj).encode() + b"\n"


def encode_value(value: Any) -> bytes:
    """A JSON value as it appears inside a line (no newline)."""
    return _encoder.encode(value).encode()


def decode(line: bytes) -> dict[str, Any]:
    obj = json.loads(line)
    if not isinstance(obj, dict) or "t" not in obj:
        raise ValueError("protocol line is not an object with a type")
    return obj
