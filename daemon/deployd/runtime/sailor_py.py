"""The Python sailor: loads one component function and speaks the step protocol.

Runs inside a step process (forked from the fork server, or started as
``python -m deployd.runtime.sailor_py SPEC_JSON``). It connects to the daemon's runtime
socket, imports the function's module from the version's artifact folder, runs `init(cfg)`,
reports ready, then handles one call or message at a time until told to stop or the daemon
goes away (socket EOF: the process exits, so a killed daemon leaves no orphans).
A "service" spec answers "method" requests instead (protocol.py): `get_meta_model(cfg)`, the
select model functions a component.json field names with `"model"`, and
`verify_credentials(cfg)` of a credentials verifier module.
"""

from __future__ import annotations

import asyncio
import importlib.util
import inspect
import json
import logging
import os
import re
import socket
import sys
import time
import traceback
from types import ModuleType
from typing import Any

from .protocol import decode, encode

READ_CHUNK = 256 * 1024
VERIFY = "verifyCredentials"  # the "method" request of `deployd credential verify`
PEEK = int(socket.MSG_PEEK | socket.MSG_DONTWAIT)
# Output is sent when reading would block, or once this much is buffered, or this old (a slow
# step's results must not wait for the messages handed to it ahead).
FLUSH_AT = 64 * 1024
FLUSH_AFTER = 0.002  # bytes of buffered output sent at once without waiting for the read


class FieldsAdapter(logging.LoggerAdapter[logging.Logger]):
    """A logger that appends its fields to every line (`ctx.log_child({...})`)."""

    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        fields = " ".join(f"{k}={v}" for k, v in (self.extra or {}).items())
        return (f"{msg} [{fields}]" if fields else msg), kwargs

    def child(self, fields: dict[str, Any]) -> FieldsAdapter:
        return FieldsAdapter(self.logger, {**(self.extra or {}), **fields})


class Context:
    """`ctx` of `process(msg, cfg, snapshot, ctx)`: emit events and log to the step log."""

    def __init__(self, sailor: Sailor) -> None:
        self._sailor = sailor
        self.flow: str = sailor.spec.get("flow", "")
        self.step: str = sailor.spec.get("step", "")
        self.log = logging.getLogger(f"step.{self.step}")  # %-style: log.info("%s", x)
        self.logger = self.log  # the name the platform's Node sailor uses

    @property
    def flow_variables(self) -> dict[str, str]:
        """The flow file's [variables] (secrets expanded): a copy, safe to change."""
        return dict(self._sailor.spec.get("variables") or {})

    def log_child(self, fields: dict[str, Any]) -> FieldsAdapter:
        """A logger whose lines carry `fields` (the Node sailor's `logger.child(fields)`)."""
        return FieldsAdapter(self.log, dict(fields))

    def emit(self, event: str, payload: Any = None) -> None:
        if event == "data":
            body: Any = payload
            headers: dict[str, Any] = {}
            files: Any = None
            if (
                isinstance(payload, dict)
                and "body" in payload
                and isinstance(payload["body"], dict)
            ):
                body, headers = payload["body"], payload.get("headers") or {}
                files = payload.get("attachments")  # {name: {url, size, "content-type"}}
            if not isinstance(body, dict):
                body = {"value": body}
            # headers first: the daemon forwards a body without headers undecoded; the
            # attachments (when there are any) before the body, so that still holds
            if isinstance(files, dict) and files:
                self._sailor.send(
                    {"t": "data", "headers": headers, "attachments": files, "body": body}
                )
            else:
                self._sailor.send({"t": "data", "headers": headers, "body": body})
        elif event in ("snapshot", "updateSnapshot"):
            if not isinstance(payload, dict):
                raise TypeError(f"ctx.emit({event!r}, …) needs a dict")
            self._sailor.keep_snapshot(event, payload)
            self._sailor.send({"t": event, "data": payload})
        elif event == "error":
            self._sailor.send({"t": "error", "error": _describe(payload), **_stack(payload)})
        elif event == "rebound":
            self._sailor.send({"t": "rebound", "error": _describe(payload)})
        elif event == "updateKeys":
            # Refreshed keys of the step's credential: the daemon stores them (encrypted) and
            # merges them into cfg at the next start of every step using the credential.
            if not isinstance(payload, dict):
                raise TypeError("ctx.emit('updateKeys', …) needs a dict of the credential's fields")
            self._sailor.send({"t": "updateKeys", "data": payload})
        elif event == "httpReply":
            # {statusCode, body, headers}: answers the sync HTTP request the flow execution
            # came from (builtin = "http", reply = "sync"); the first reply wins.
            if not isinstance(payload, dict):
                raise TypeError("ctx.emit('httpReply', …) needs a dict {statusCode, body, headers}")
            self._sailor.send({"t": "httpReply", "data": payload})
        elif event == "end":
            pass  # Python functions finish when process() returns
        else:
            raise ValueError(
                f"unknown event {event!r} (data, snapshot, updateSnapshot, error, rebound, "
                "updateKeys, httpReply)"
            )


def _describe(err: Any) -> str:
    if isinstance(err, BaseException):
        return "".join(traceback.format_exception_only(type(err), err)).strip()
    return str(err)


def _stack(err: Any) -> dict[str, str]:
    """The traceback of an exception, for the dead letter of the message it failed."""
    if isinstance(err, BaseException) and err.__traceback__ is not None:
        return {"stack": "".join(traceback.format_exception(type(err), err, err.__traceback__))}
    return {}


def _copy(value: Any) -> Any:
    """A deep copy of a JSON value (step config): each call gets its own, as on the platform."""
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy(v) for v in value]
    return value


def _snake(name: str) -> str:
    """`getMetaModel` → `get_meta_model`: the Python spelling of a platform method name."""
    return re.sub(r"(?<=[a-z0-9])([A-Z])", r"_\1", name).lower()


def _arity(func: Any) -> int:
    try:
        params = inspect.signature(func).parameters.values()
    except (TypeError, ValueError):
        return 4
    if any(p.kind is p.VAR_POSITIONAL for p in params):
        return 4
    return sum(1 for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD))


class LineReader:
    """Lines from the daemon's socket, knowing whether a whole one is already buffered (so
    buffered output is flushed exactly when reading would block)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray()
        self.pos = 0
        self.read_at = 0.0

    def _closed(self) -> bool:
        """Whether the daemon closed its end (its results would not be committed)."""
        try:
            return self.sock.recv(1, PEEK) == b""
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            return True

    def ready(self) -> bool:
        return self.buf.find(b"\n", self.pos) >= 0

    def readline(self) -> bytes:
        while True:
            end = self.buf.find(b"\n", self.pos)
            if end >= 0:
                if self.pos and time.monotonic() - self.read_at > 0.001 and self._closed():
                    # The daemon is gone: what it sent ahead is not handled (checked once a
                    # millisecond: the work it may hand ahead is a few milliseconds at most).
                    return b""
                line = bytes(self.buf[self.pos : end + 1])
                self.pos = end + 1
                if self.pos > 65536 and self.pos * 2 > len(self.buf):
                    del self.buf[: self.pos]
                    self.pos = 0
                return line
            chunk = self.sock.recv(READ_CHUNK)
            if not chunk:
                return b""
            self.buf += chunk
            self.read_at = time.monotonic()


class Sailor:
    def __init__(
        self, spec: dict[str, Any], sock: socket.socket, rfile: LineReader | None = None
    ) -> None:
        self.spec = spec
        self.sock = sock
        self.rfile = rfile if rfile is not None else LineReader(sock)
        self.module: ModuleType | None = None
        self.loop: asyncio.AbstractEventLoop | None = None  # made on the first async call
        self.ctx = Context(self)
        self.snapshot: dict[str, Any] = {}  # as the daemon has it (see protocol.py)
        self.config: dict[str, Any] = spec.get("config", {})
        self._func: Any = None
        self._nargs = 4
        self.out: list[bytes] = []  # lines not sent yet: flushed before reading blocks
        self.out_size = 0
        self.out_since = 0.0

    def send(self, obj: dict[str, Any]) -> None:
        self.send_line(encode(obj))

    def send_line(self, line: bytes) -> None:
        if not self.out:
            self.out_since = time.monotonic()
        self.out.append(line)
        self.out_size += len(line)
        if self.out_size >= FLUSH_AT or time.monotonic() - self.out_since >= FLUSH_AFTER:
            self.flush()

    def flush(self) -> None:
        if self.out:
            data = b"".join(self.out)
            self.out.clear()
            self.out_size = 0
            self.sock.sendall(data)

    def keep_snapshot(self, event: str, data: dict[str, Any]) -> None:
        if event == "snapshot":
            self.snapshot = dict(data)
        else:
            self.snapshot = {**self.snapshot, **data}

    def readline(self) -> bytes:
        """The next command; what is buffered to send goes first when none is waiting."""
        if self.out and not self.rfile.ready():
            self.flush()
        return self.rfile.readline()

    def _run(self, result: Any) -> Any:
        if inspect.isawaitable(result):
            if self.loop is None:
                self.loop = asyncio.new_event_loop()
            return self.loop.run_until_complete(result)
        return result

    def load(self) -> None:
        # The step's environment (ELASTICIO_*, the flow file's env), before its code loads: a
        # pooled process was forked before it knew its step.
        os.environ.update(self.spec.get("env") or {})
        root = self.spec["artifact_dir"]
        os.chdir(root)
        for extra in (os.path.join(root, ".deps"), root):
            if os.path.isdir(extra) and extra not in sys.path:
                sys.path.insert(0, extra)
        path = os.path.join(root, self.spec["main"])
        name = "deployd_step_" + os.path.splitext(os.path.basename(path))[0]
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is None or spec.loader is None:
            raise ImportError(f"cannot load {self.spec['main']}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        if self.spec.get("service"):
            # A one-off process for "method" requests: the module only (no init, no process).
            self.module = module
            return
        if not callable(getattr(module, "process", None)):
            raise AttributeError(f"{self.spec['main']} defines no process() function")
        self.module = module
        init = getattr(module, "init", None)
        if callable(init):
            self._run(init(_copy(self.config)))

    def process(self, msg: dict[str, Any], snapshot: dict[str, Any]) -> None:
        assert self.module is not None
        func = self.module.process
        if func is not self._func:  # inspecting a signature costs more than most process()
            self._func, self._nargs = func, _arity(func)
        args = (msg, _copy(self.config) if self.config else {}, snapshot, self.ctx)[: self._nargs]
        try:
            result = self._run(func(*args))
        except Exception as exc:
            traceback.print_exc()
            self.send({"t": "error", "error": _describe(exc), **_stack(exc)})
            return
        if isinstance(result, dict):
            self.ctx.emit("data", result)
        elif isinstance(result, list):
            for item in result:
                self.ctx.emit("data", item)

    def method(self, name: str, cfg: dict[str, Any]) -> Any:
        """A service verb: the module's `name` (or its snake_case form: `getMetaModel` is
        `get_meta_model`), called with (cfg) or (cfg, ctx); it may be a coroutine."""
        assert self.module is not None
        names = list(dict.fromkeys((name, _snake(name))))
        func = next((f for n in names if callable(f := getattr(self.module, n, None))), None)
        if func is None:
            raise AttributeError(
                f'Method "{name}" is not found in "{self.spec.get("function")}" action or '
                f"trigger ({self.spec.get('main')} defines no {' or '.join(names)})"
            )
        args = (_copy(cfg), self.ctx)[: max(1, min(_arity(func), 2))]
        return self._run(func(*args))

    def verify(self, cfg: dict[str, Any]) -> dict[str, Any]:
        """`verify_credentials(cfg)` (or `verifyCredentials`, `verify`; with ctx when it
        takes two arguments; it may be a coroutine), answered as the platform's service does:
        True or an answer without "verified" is verified, False is not, an exception is
        `{"verified": False, "reason": its message}`."""
        assert self.module is not None
        names = ("verify_credentials", "verifyCredentials", "verify")
        func = next((f for n in names if callable(f := getattr(self.module, n, None))), None)
        if func is None:
            raise AttributeError(
                f"{self.spec.get('main')} defines no verify_credentials(cfg) (nor "
                "verifyCredentials or verify)"
            )
        args = (_copy(cfg), self.ctx)[: max(1, min(_arity(func), 2))]
        try:
            result = self._run(func(*args))
        except Exception as exc:
            traceback.print_exc()
            return {"verified": False, "reason": str(exc) or type(exc).__name__}
        if isinstance(result, bool):
            return {"verified": result}
        if not isinstance(result, dict) or "verified" not in result:
            return {"verified": True}
        return result

    def hook(self, name: str, *args: Any) -> Any:
        assert self.module is not None
        func = getattr(self.module, name, None)
        if not callable(func):
            return None
        return self._run(func(_copy(self.config), *args))

    def serve(self, hello: bool = True) -> int:
        if hello:
            self.send({"t": "hello", "token": self.spec["token"], "pid": os.getpid()})
        try:
            self.load()
        except BaseException as exc:  # the import or init of user code failed
            traceback.print_exc()
            self.send({"t": "failed", "error": _describe(exc)})
            self.flush()
            return 3
        self.send({"t": "ready"})
        while True:
            line = self.readline()
            if not line:
                return 0  # the daemon is gone: exit rather than linger as an orphan
            cmd = decode(line)
            kind = cmd["t"]
            if kind in ("call", "msg"):
                if "snapshot" in cmd:
                    self.snapshot = cmd["snapshot"]
                msg = cmd["msg"] if kind == "msg" else {"id": str(cmd["ref"]), "body": {}}
                msg.setdefault("headers", {})
                msg.setdefault("passthrough", {})
                msg.setdefault("attachments", {})
                began = time.perf_counter()
                self.process(msg, self.snapshot)
                took = time.perf_counter() - began
                self.send_line(b'{"t":"done","ref":%d,"took":%.6f}\n' % (cmd["ref"], took))
            elif kind in ("startup", "shutdown"):
                try:
                    args = (cmd.get("data"),) if kind == "shutdown" else ()
                    data = self.hook(kind, *args)
                    json.dumps(data)
                except Exception as exc:
                    traceback.print_exc()
                    self.send({"t": "error", "error": f"{kind}(): {_describe(exc)}"})
                    data = None
                self.send({"t": "result", "ref": cmd["ref"], "data": data})
            elif kind == "method":
                try:
                    name, cfg = str(cmd.get("name")), cmd.get("cfg") or {}
                    data = self.verify(cfg) if name == VERIFY else self.method(name, cfg)
                    json.dumps(data)
                except Exception as exc:
                    traceback.print_exc()
                    self.send({"t": "error", "error": _describe(exc), **_stack(exc)})
                    data = None
                self.send({"t": "result", "ref": cmd["ref"], "data": data})
            elif kind == "stop":
                self.flush()
                return 0


def _header(spec: dict[str, Any]) -> None:
    """The first line of this start in the step log (written here, not by the daemon, so a
    warm-up of many steps costs the daemon no file writes)."""
    os.write(
        2,
        f"--- deployd: starting step {spec.get('step')} ({spec.get('component')} "
        f"v{spec.get('version')} {spec.get('function')}) ---\n".encode(),
    )


def _redirect_output(path: str) -> None:
    """From now on stdout and stderr (of the code, and of this process) go to the step log."""
    sys.stdout.flush()
    sys.stderr.flush()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


def run(spec: dict[str, Any]) -> int:
    """Connect to the daemon and serve one step; returns the exit code."""
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(spec["socket"])
    except OSError as exc:
        print(f"sailor: cannot reach the daemon at {spec['socket']}: {exc}", file=sys.stderr)
        return 2
    try:
        if not spec.get("pool"):
            _header(spec)
            return Sailor(spec, sock).serve()
        # An idle sailor of the pool: say hello, then wait for the step to become.
        sock.sendall(encode({"t": "hello", "token": spec["token"], "pid": os.getpid()}))
        rfile = LineReader(sock)
        line = rfile.readline()
        if not line:
            return 0  # the pool shrank, or the daemon is gone
        cmd = decode(line)
        if cmd.get("t") != "spec":
            return 2
        step = cmd["spec"]
        _redirect_output(step["log"])
        _header(step)
        return Sailor(step, sock, rfile).serve(hello=False)
    except (BrokenPipeError, ConnectionResetError):
        return 0
    finally:
        sys.stdout.flush()
        sys.stderr.flush()


if __name__ == "__main__":
    # The spec (its token, the step's config) in the environment — which only this user can
    # read — rather than on the command line, which every user can (`ps`).
    sys.exit(run(json.loads(os.environ.pop("DEPLOYD_SPEC", "") or sys.argv[1])))
