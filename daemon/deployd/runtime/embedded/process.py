"""Step processes as the daemon sees them, and the launcher that starts them.

`Launcher` owns the runtime socket (an abstract Unix socket: no path length limits, gone
with the daemon) and the fork server. `StepProcess` is one running step: spawn it, wait until
it is ready, send it a call or a message and await the `Result`, stop or kill it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import os
import secrets
import signal
import sys
import time
import weakref
from asyncio import Future
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...store.queues import Queued
from ...toolchains.env import clean_env
from ...toolchains.env import log_tail as read_tail
from ..base import StepFailed
from ..credentials import CredentialError, Credentials
from ..protocol import MAX_LINE, decode, encode, encode_value
from .node_pool import NodeRuntime, NodeSettings
from .py_pool import PyPool
from .replies import Replies

log = logging.getLogger("deployd.runtime")
DONE = b'{"t":"done","ref":'  # the sailors write "done" exactly so (protocol.py) …
DATA = b'{"t":"data","headers":{},"body":{'[:-1]  # … and an output without headers so
READ_CHUNK = 256 * 1024  # bytes read from a step's socket at once (many lines per read)
MAX_DETAIL = 16000  # characters of an error's traceback or stack that are kept


class StepDied(Exception):
    """The step process went away while it had work."""


# An output message: its body (a dict, or the sailor's JSON text) and headers.
Output = tuple[dict[str, Any] | str, dict[str, Any]]


@dataclass
class Result:
    """What one call or message produced."""

    # (body, headers): a body the daemon only forwards stays the JSON text the sailor sent
    outputs: list[Output] = field(default_factory=list)
    # the attachments of outputs that have any, by their index in `outputs`: the JSON text of
    # `{"<name>": {"url", "size", "content-type"}}` (most outputs have none)
    attachments: dict[int, str] = field(default_factory=dict)
    snapshot: dict[str, Any] | None = None
    errors: list[str] = field(default_factory=list)
    detail: str | None = None  # the last error's whole text (traceback or stack), when sent
    rebound: str | None = None
    data: Any = None
    ended: float = 0.0
    took: float = 0.0  # seconds the sailor spent on it (its own clock)
    msg_id: str = ""  # the message handled ("" for a call): what an httpReply answers


def step_env(home: Path) -> dict[str, str]:
    """Step processes get a clean environment: nothing of the daemon's (so no secret)."""
    env = clean_env(home, {"PYTHONUNBUFFERED": "1"})
    del env["CI"]
    return env


class StepProcess:
    """One step's long-lived process, from spawn to exit."""

    def __init__(
        self,
        launcher: Launcher,
        spec: dict[str, Any],
        log_path: Path,
        on_exit: Callable[[StepProcess], None] | None = None,
    ) -> None:
        self.launcher = launcher
        self.token = secrets.token_hex(16)
        self.spec = {**spec, "token": self.token, "socket": launcher.address}
        self.step_id: str = spec["step"]
        self.runtime: str = spec.get("runtime", "python")
        self.log_path = log_path
        self.on_exit = on_exit
        self.pid: int | None = None
        self.state = "starting"
        self.exit_code: int | None = None
        self.started_at = time.monotonic()
        loop = asyncio.get_running_loop()
        self.ready: asyncio.Future[None] = loop.create_future()
        self.exited = asyncio.Event()
        self._exit_known = asyncio.Event()
        self.expected_exit = False
        self._writer: asyncio.StreamWriter | None = None
        # The sailor works on one request at a time, in order: events belong to the oldest.
        self._pending: collections.OrderedDict[int, tuple[asyncio.Future[Result], Result]] = (
            collections.OrderedDict()
        )
        self._ref = 0
        self._reader_task: asyncio.Task[None] | None = None
        # The step's snapshot as this process has it: given with its first call or message,
        # then changed only by what the process emits (the sailor keeps the same copy), so a
        # pipelined message need not carry one.
        self.snap: dict[str, Any] | None = None
        self._out: list[bytes] = []  # submitted requests not written yet

    # -- lifecycle -------------------------------------------------------------------------

    async def spawn(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        if self.runtime != "python":  # a Python sailor writes this line itself
            with self.log_path.open("a") as fh:
                fh.write(
                    f"--- deployd: starting step {self.step_id} ({self.spec['component']} "
                    f"v{self.spec['version']} {self.spec['function']}) ---\n"
                )
        self.launcher.expect(self)
        try:
            self.pid = await self.launcher.launch(self)
        except Exception as exc:
            self.launcher.forget(self)
            self._died(f"could not start: {exc}")

    def attach(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writer = writer
        self._reader_task = asyncio.get_running_loop().create_task(self._read(reader))

    async def _read(self, reader: asyncio.StreamReader) -> None:
        reason = "its connection closed"
        parts: list[bytes] = []  # the start of a line that has not ended yet
        size = 0
        try:
            while chunk := await reader.read(READ_CHUNK):
                end = chunk.rfind(b"\n")
                if end < 0:
                    parts.append(chunk)
                    size += len(chunk)
                    if size > MAX_LINE:
                        raise ValueError(f"a line longer than {MAX_LINE} bytes")
                    continue
                data = b"".join((*parts, chunk[:end])) if parts else chunk[:end]
                rest = chunk[end + 1 :]
                parts, size = ([rest], len(rest)) if rest else ([], 0)
                for line in data.split(b"\n"):
                    if line.startswith(DONE):  # most lines: parsed without json
                        ref, _, took = line[len(DONE) : -1].partition(b',"took":')
                        self._done(int(ref), float(took or 0))
                    elif line.startswith(DATA) and line.endswith(b"}}") and self._pending:
                        # An output without headers: its body is kept as the sailor's JSON
                        # text, to be stored and forwarded without decoding and encoding.
                        res = next(iter(self._pending.values()))[1]
                        res.outputs.append((line[len(DATA) : -1].decode(), {}))
                    elif line:
                        self._dispatch(decode(line))
        except ValueError as exc:
            reason = f"protocol error: {exc}"
        except ConnectionError:
            pass
        finally:
            if self._writer is not None:
                self._writer.close()
            if not self.expected_exit and self.pid is not None:
                # The fork server reports the exit code a moment after the socket closes;
                # wait briefly so the recorded reason says how the process ended.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._exit_known.wait(), 0.5)
            self._died(reason)

    def _dispatch(self, msg: dict[str, Any]) -> None:
        kind = msg["t"]
        res = next(iter(self._pending.values()))[1] if self._pending else None
        if kind == "ready":
            self.state = "ready"
            if not self.ready.done():
                self.ready.set_result(None)
        elif kind == "failed":
            self.state = "failed"
            if not self.ready.done():
                self.ready.set_exception(StepFailed(self.step_id, str(msg.get("error"))))
        elif kind == "data" and res is not None:
            body = msg.get("body")
            files = msg.get("attachments")
            if isinstance(files, dict) and files:
                res.attachments[len(res.outputs)] = encode_value(files).decode()
            res.outputs.append((body if isinstance(body, dict) else {}, msg.get("headers") or {}))
        elif kind == "snapshot" and res is not None:
            self.snap = res.snapshot = dict(msg.get("data") or {})
        elif kind == "updateSnapshot" and res is not None:
            self.snap = res.snapshot = {**(self.snap or {}), **(msg.get("data") or {})}
        elif kind == "error" and res is not None:
            res.errors.append(str(msg.get("error"))[:4000])
            stack = msg.get("stack")
            res.detail = str(stack)[:MAX_DETAIL] if stack else None
        elif kind == "rebound" and res is not None:
            res.rebound = str(msg.get("error") or "rebound")
        elif kind == "updateKeys":
            self.launcher.keys_updated(self, msg.get("data"))
        elif kind == "httpReply" and res is not None:
            self.launcher.http_reply(self, res.msg_id, msg.get("data"))
        elif kind == "done":
            self._done(int(msg.get("ref", -1)), float(msg.get("took") or 0))
        elif kind == "result":
            entry = self._pending.pop(int(msg.get("ref", -1)), None)
            if entry is not None:
                fut, res = entry
                res.ended = time.monotonic()
                res.data = msg.get("data")
                if not fut.done():
                    fut.set_result(res)

    def _done(self, ref: int, took: float) -> None:
        entry = self._pending.pop(ref, None)
        if entry is not None:
            fut, res = entry
            res.ended = time.monotonic()
            res.took = took
            if not fut.done():
                fut.set_result(res)

    def _died(self, reason: str) -> None:
        if self.exited.is_set():
            return
        if self.state not in ("failed", "stopping"):
            self.state = "exited"
        elif self.state == "stopping":
            self.state = "stopped"
        self.launcher.forget(self)
        if not self.ready.done():
            tail = log_tail(self.log_path)
            self.ready.set_exception(
                StepFailed(self.step_id, f"process exited before it was ready ({reason}){tail}")
            )
        for fut, _res in self._pending.values():
            if not fut.done():
                fut.set_exception(StepDied(f"step {self.step_id} exited ({reason})"))
        self._pending.clear()
        self.exited.set()
        if self.on_exit is not None:
            self.on_exit(self)

    def exit_reported(self, code: int) -> None:
        """The launcher saw the process end (its exit code)."""
        self.exit_code = code
        self._exit_known.set()
        if self._writer is None:
            self._died(f"exit code {code}")

    # -- work ------------------------------------------------------------------------------

    def submit(self, obj: dict[str, Any], snapshot: dict[str, Any] | None) -> Future[Result]:
        """Send a call or message without waiting for it (requests are pipelined: the sailor
        handles them in order); the future resolves when the process says it is done.

        `snapshot` is the step's committed snapshot: only the first request of a process
        carries it. `None` (a startup/shutdown hook) carries none. Raises StepDied.
        """
        body = obj
        if snapshot is not None and self.snap is None:
            self.snap = snapshot
            body = {**obj, "snapshot": snapshot}
        return self._send(encode({**body, "ref": self._ref + 1}))

    def submit_msg(self, row: Queued, snapshot: dict[str, Any]) -> Future[Result]:
        """`submit` of a queued message, its body, headers, passthrough and attachments
        forwarded as stored."""
        extra = b""
        if self.snap is None:
            self.snap = snapshot
            extra = b',"snapshot":' + encode_value(snapshot)
        line = (
            b'{"t":"msg","ref":%d,"msg":{"id":%s,"body":%s,"headers":%s,"passthrough":%s,'
            b'"attachments":%s}%s}\n'
            % (
                self._ref + 1,
                encode_value(row.msg_id),
                row.body.encode(),
                row.headers.encode(),
                row.passthrough.encode(),
                row.attachments.encode(),
                extra,
            )
        )
        return self._send(line, row.msg_id)

    def _send(self, line: bytes, msg_id: str = "") -> Future[Result]:
        if self._writer is None or self._writer.is_closing() or self.exited.is_set():
            raise StepDied(f"step {self.step_id} is not running")
        self._ref += 1
        fut: Future[Result] = asyncio.get_running_loop().create_future()
        self._pending[self._ref] = (fut, Result(msg_id=msg_id))
        self._out.append(line)  # written by drain(): many requests, one write
        return fut

    async def drain(self) -> None:
        """Write what was submitted (one write for many requests: the sailor then reads them
        at once and answers them at once), and wait while the socket's send buffer is full.
        Raises StepDied when the connection is gone."""
        if self._writer is None:
            raise StepDied(f"step {self.step_id} is not running")
        try:
            if self._out:
                data = b"".join(self._out)
                self._out.clear()
                self._writer.write(data)
            await self._writer.drain()
        except ConnectionError as exc:
            raise StepDied(f"step {self.step_id}: {exc}") from exc

    async def request(self, obj: dict[str, Any], snapshot: dict[str, Any] | None) -> Result:
        """Send one call/msg/startup/shutdown and wait until the process says it is done."""
        fut = self.submit(obj, snapshot)
        try:
            await self.drain()
        except StepDied:
            forget(fut)  # it fails (or failed) with the process; nobody awaits it now
            raise
        return await fut

    async def stop(self, timeout: float = 10.0) -> None:
        """Ask the process to finish its current work and exit; kill it after `timeout`."""
        if self.exited.is_set():
            return
        self.expected_exit = True
        self.state = "stopping"
        if self._writer is not None:
            with contextlib.suppress(ConnectionError, RuntimeError):
                self._writer.write(encode({"t": "stop"}))
                await self._writer.drain()
        try:
            await asyncio.wait_for(self.exited.wait(), timeout)
        except TimeoutError:
            self.kill()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.exited.wait(), 5)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.pid is None:
            return
        self.expected_exit = self.expected_exit or sig == signal.SIGKILL
        try:
            os.killpg(self.pid, sig)
        except (ProcessLookupError, PermissionError):
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)


def forget(fut: Future[Result]) -> None:
    """Nobody will await `fut`: its StepDied is expected, not an unretrieved error."""
    if fut.done():
        if not fut.cancelled():
            fut.exception()
    else:
        fut.add_done_callback(lambda f: None if f.cancelled() else f.exception())


def append_step_log(path: Path, level: str, text: str) -> None:
    """A line of deployd's own in a step's log (what it did with something the step sent)."""
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as fh:
            fh.write(f"{stamp}Z {level} deployd: {text}\n")
    except OSError as exc:
        log.warning("could not write to the step log %s: %s", path, exc)


def log_tail(path: Path, lines: int = 12) -> str:
    """The last `lines` lines a step wrote (deployd's own markers left out), for a reason."""
    text = read_tail(path, 4000)
    tail = [ln for ln in text.splitlines() if not ln.startswith("--- deployd:")][-lines:]
    return ("; log tail: " + " | ".join(tail)) if tail else ""


class Launcher:
    """The runtime socket and the fork server; starts step processes of either language."""

    def __init__(self, state_dir: Path, node: NodeSettings | None = None) -> None:
        self.state_dir = state_dir
        # Padded with NULs to the whole sun_path (108 bytes): node (libuv) connects to an
        # abstract address with that full length, so only a padded name matches it.
        self.address = f"\0deployd-{os.getpid()}-{secrets.token_hex(6)}".ljust(108, "\0")
        self._expected: dict[str, StepProcess] = {}
        self._by_pid: dict[int, StepProcess] = {}
        self._server: asyncio.AbstractServer | None = None
        self._fork: asyncio.subprocess.Process | None = None
        self._fork_reader: asyncio.Task[None] | None = None
        self._spawned: dict[str, asyncio.Future[int]] = {}
        self._fork_lock = asyncio.Lock()
        self._writers: weakref.WeakSet[asyncio.StreamWriter] = weakref.WeakSet()
        self.home = state_dir / "run" / "home"
        self.api_uri: str | None = None  # ELASTICIO_API_URI of the steps (set by the runtime)
        # what the steps' object storage tokens derive from (set by the runtime)
        self.object_key: bytes | None = None
        # The config's credentials and their refreshed keys (set by the runtime; None: no
        # credential can be used, and emit('updateKeys') is refused).
        self.credentials: Credentials | None = None
        # Sync requests of HTTP-fed flows waiting for a step's httpReply (set by the runtime).
        self.replies: Replies | None = None
        self.node = NodeRuntime(
            node or NodeSettings(), self.address, self.home, state_dir / "logs", step_env(self.home)
        )
        self.py_pool = PyPool(
            self.address, state_dir / "logs" / "python-pool.log", self._fork_spawn
        )

    async def start(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        self._server = await asyncio.start_unix_server(
            self._accept, path=self.address, limit=MAX_LINE
        )
        await self._start_forkserver()
        await self.py_pool.start()
        await self.node.start()

    async def _start_forkserver(self) -> None:
        logf = (self.state_dir / "logs" / "forkserver.log").open("ab")
        self._fork = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "deployd.runtime.embedded.forkserver",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=logf,
            env={**step_env(self.home), "PYTHONPATH": _package_root()},
            limit=MAX_LINE,
        )
        logf.close()
        self._fork_reader = asyncio.get_running_loop().create_task(
            self._read_forkserver(self._fork)
        )

    async def _read_forkserver(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        while line := await proc.stdout.readline():
            msg = json.loads(line)
            if "spawned" in msg:
                fut = self._spawned.pop(msg["spawned"], None)
                if fut is not None and not fut.done():
                    fut.set_result(int(msg["pid"]))
            elif "exit" in msg:
                step = self._by_pid.pop(int(msg["exit"]), None)
                if step is not None:
                    step.exit_reported(int(msg["code"]))
                else:
                    self.py_pool.exited(int(msg["exit"]))
        await proc.wait()
        for fut in self._spawned.values():
            if not fut.done():
                fut.set_exception(RuntimeError("the fork server exited"))
        self._spawned.clear()

    async def stop(self) -> None:
        await self.py_pool.stop()
        if self._server is not None:
            self._server.close()
        if self._fork is not None and self._fork.returncode is None:
            if self._fork.stdin is not None:
                self._fork.stdin.close()
            try:
                await asyncio.wait_for(self._fork.wait(), 5)
            except TimeoutError:
                self._fork.kill()
                await self._fork.wait()
        if self._fork_reader is not None:
            self._fork_reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._fork_reader
        await self.node.stop()
        # A sailor that connected while the runtime was closing (a pool refill, say) may have
        # been accepted after its taker was cancelled: close what is left, not the GC.
        for writer in list(self._writers):
            if not writer.is_closing():
                writer.close()

    def keys_updated(self, proc: StepProcess, keys: Any) -> None:
        """`emit('updateKeys', keys)` of `proc`: stored for its step's credential, encrypted;
        what happened goes to its step log and the daemon's (names only, never values)."""
        name = proc.spec.get("credential")
        where = f"{proc.spec.get('flow') or '-'}/{proc.step_id}"
        if not name:
            text = (
                "emit('updateKeys') ignored: this step names no credential, so there is no "
                'account to keep the keys in; give the step credential = "NAME" in the flow '
                "file (a [[credentials]] of the daemon config). The keys were dropped"
            )
            append_step_log(proc.log_path, "WARNING", text)
            log.warning("step %s: %s", where, text)
            return
        if self.credentials is None:
            text = f"emit('updateKeys') of credential {name} ignored: no credential store here"
            append_step_log(proc.log_path, "WARNING", text)
            log.warning("step %s: %s", where, text)
            return
        try:
            text = self.credentials.update_keys(str(name), str(proc.spec["component"]), keys)
        except CredentialError as exc:
            append_step_log(proc.log_path, "WARNING", str(exc))
            log.warning("step %s: %s", where, exc)
            return
        except Exception as exc:  # the database: the step goes on, the keys are not stored
            text = f"the refreshed keys of credential {name} could not be stored: {exc}"
            append_step_log(proc.log_path, "ERROR", text)
            log.error("step %s: %s", where, text)
            return
        append_step_log(proc.log_path, "INFO", text)
        log.info("step %s: %s", where, text)

    def http_reply(self, proc: StepProcess, msg_id: str, reply: Any) -> None:
        """`emit('httpReply', reply)` of `proc` while it handled `msg_id`: the answer of the
        sync request that message came from (the first reply wins; others are dropped)."""
        if self.replies is None or not msg_id or not self.replies.answer(msg_id, reply):
            log.debug("step %s: httpReply with no request waiting for it dropped", proc.step_id)

    def expect(self, step: StepProcess) -> None:
        self._expected[step.token] = step

    def forget(self, step: StepProcess) -> None:
        self._expected.pop(step.token, None)
        if step.pid is not None:
            self._by_pid.pop(step.pid, None)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)  # closed by stop() if nobody else closed it by then
        try:
            line = await asyncio.wait_for(reader.readline(), 10)
            hello = decode(line)
            # One connection per token: a token seen again (leaked, replayed) gets nothing.
            step = self._expected.pop(str(hello.get("token", "")), None)
        except (TimeoutError, ValueError, ConnectionError):
            step = None
            hello = {}
        if step is None and self.py_pool.accept(str(hello.get("token", "")), reader, writer):
            return  # an idle Python sailor of the pool: it waits there for a step
        if step is None and self.node.accept(str(hello.get("token", "")), reader, writer):
            return  # an idle Node sailor of the pool: it waits there for a step
        if step is None or hello.get("t") != "hello":
            writer.close()
            return
        step.attach(reader, writer)

    async def launch(self, step: StepProcess) -> int:
        if step.runtime == "node":
            return await self._launch_node(step)
        pid = self.py_pool.take(step)  # an idle forked sailor: no fork on the warm-up path
        if pid is None:
            pid = await self._fork_spawn(step.spec, str(step.log_path))
        self._by_pid[pid] = step
        return pid

    async def _fork_spawn(self, spec: dict[str, Any], log_path: str) -> int:
        """Have the fork server fork a Python sailor for `spec`; its pid."""
        async with self._fork_lock:
            if self._fork is None or self._fork.returncode is not None:
                await self._start_forkserver()
        assert self._fork is not None and self._fork.stdin is not None
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._spawned[spec["token"]] = fut
        try:
            self._fork.stdin.write((json.dumps({"spawn": spec, "log": log_path}) + "\n").encode())
            await self._fork.stdin.drain()
            return await asyncio.wait_for(fut, 10)
        finally:
            self._spawned.pop(spec["token"], None)

    async def _launch_node(self, step: StepProcess) -> int:
        return await self.node.launch(step)


def _package_root() -> str:
    return str(Path(__file__).resolve().parents[3])
