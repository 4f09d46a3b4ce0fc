"""The step image's entrypoint: one step of one flow version, in a pod (issue 13).

    python3 -m deployd.runtime.kubernetes.pod       (the Deployment's `command`)

1. Serves the probes on `DEPLOYD_PROBE_PORT` at once: `/healthz` (200 while the process
   lives), `/readyz` (200 only once the step can work, 503 before and while stopping).
2. Downloads its component version's archive from deployd (`DEPLOYD_ARTIFACT_URL`, bearer
   `DEPLOYD_ARTIFACT_TOKEN`) into the artifact volume, hashing it as it arrives; an archive
   whose sha256 is not `DEPLOYD_ARTIFACT_SHA256` is refused (the pod exits 3, nothing of it
   extracted). It is extracted with tarfile's "data" filter (no absolute paths, no `..`, no
   links out, no devices). A container restarted in the same pod reuses a verified folder.
3. Starts deployd's sailor on it (the same `sailor_py` as on one machine, over a private
   abstract socket, its `init(cfg)` run), connects to RabbitMQ (`DEPLOYD_AMQP_URL`); then
   it is ready.
4. Works: each step waits at its start gate (`deployd.<flow>.<step>.v<N>.go`, opened by deployd
   when this version starts: the old version's pods of that step are gone by then); then a
   trigger calls `process()` every `interval`; an action consumes its quorum queue
   `deployd.<flow>.<step>` one message at a time (so per-step order is kept with one replica).
   Each output — the next step's mapping applied, as the daemon's router does — is published
   with a confirm before the input is acked. A message whose handling fails is a dead letter
   and the step's snapshot, when a call changed it, is kept: both go to the flow's records
   queue (`records.py`; deployd writes them to its database), confirmed before the input is
   acked. The snapshot is read from deployd (`GET /api/v1/snapshots/{flow}/{step}`) once,
   before the first call or message. A trigger also takes deployd's `startup()`/`shutdown()`
   requests from `deployd.<flow>.<step>.v<N>.hooks` (declared before it is ready, served
   whether its gate is open or not: `hooks.py`), each run on the sailor between two calls and
   answered with what the hook returned or its error; it never runs one by itself.
5. SIGTERM: not ready any more; the current call or message finishes, nothing new starts, the
   sailor is told to stop, exit 0 — within the pod's termination grace period.

What this agent does not do that the daemon-side router does: handled message ids are kept in
the pod's memory only (the newest HANDLED_MEMORY), not in a database — so a message that comes
again to a pod that handled it is acked without a second call, but after a pod itself dies its
unacked message is handled again by the next pod (at-least-once; README).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import os
import secrets
import shutil
import signal
import socket
import sys
import tarfile
import time
import urllib.error
import urllib.request
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from ...errors import DeploydError
from ...toolchains.env import clean_env
from ..mapper import apply as apply_mapping
from ..protocol import decode, encode
from ..rabbitmq.broker import EXCHANGE, Broker, properties, redact, routing_key
from ..rabbitmq.router import envelope
from . import hooks
from .manifests import gate_queue, hooks_queue
from .records import KIND_HEADER, records_queue

MAX_ARCHIVE = 2 << 30  # bytes: larger is not a component version
SAILOR_JS = Path(__file__).resolve().parent.parent / "sailor.js"
PACKAGE_ROOT = str(Path(__file__).resolve().parents[3])  # where `deployd` is imported from
MAX_SNAPSHOT = 16 << 20  # bytes of a snapshot answer
CHUNK = 1 << 16
READY_TIMEOUT = 120.0  # seconds the sailor's init and the broker may take
HANDLED_MEMORY = 50_000  # message ids a pod remembers having handled
HOLD_POLL = 0.1  # seconds between looks at a full next queue (backpressure)
EXIT_REFUSED = 3  # the artifact's sha256 did not match: a restart will not help


class PodError(Exception):
    """Why this pod cannot run its step (printed as one line, then a non-zero exit)."""


@dataclass(frozen=True)
class Settings:
    artifact_url: str
    artifact_sha256: str
    artifact_token: str
    artifact_dir: Path
    amqp_url: str
    probe_port: int
    step: dict[str, Any]
    api_url: str = ""  # deployd's API (the step's snapshot); "": start with an empty one

    @classmethod
    def from_environ(cls, environ: dict[str, str]) -> Settings:
        names = (
            "DEPLOYD_ARTIFACT_URL",
            "DEPLOYD_ARTIFACT_SHA256",
            "DEPLOYD_ARTIFACT_TOKEN",
            "DEPLOYD_ARTIFACT_DIR",
            "DEPLOYD_AMQP_URL",
            "DEPLOYD_STEP",
        )
        missing = [n for n in names if not environ.get(n)]
        if missing:
            raise PodError(
                f"{', '.join(missing)} not set: this entrypoint runs a step Deployment that "
                "deployd rendered (see `deployd flow manifests`)"
            )
        try:
            step = json.loads(environ["DEPLOYD_STEP"])
        except ValueError as exc:
            raise PodError(f"DEPLOYD_STEP is not JSON ({exc})") from None
        if not environ["DEPLOYD_ARTIFACT_URL"].startswith(("http://", "https://")):
            raise PodError("DEPLOYD_ARTIFACT_URL must be an http:// or https:// url")
        sha = environ["DEPLOYD_ARTIFACT_SHA256"].lower()
        if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
            raise PodError("DEPLOYD_ARTIFACT_SHA256 is not a sha256 (64 hex digits)")
        return cls(
            artifact_url=environ["DEPLOYD_ARTIFACT_URL"],
            artifact_sha256=sha,
            artifact_token=environ["DEPLOYD_ARTIFACT_TOKEN"],
            artifact_dir=Path(environ["DEPLOYD_ARTIFACT_DIR"]),
            amqp_url=environ["DEPLOYD_AMQP_URL"],
            probe_port=int(environ.get("DEPLOYD_PROBE_PORT") or 8080),
            step=step,
            api_url=environ.get("DEPLOYD_URL", "").rstrip("/"),
        )


# -- the artifact ----------------------------------------------------------------------------


def fetch_snapshot(s: Settings) -> dict[str, Any]:
    """The step's snapshot as deployd keeps it (`GET /api/v1/snapshots/{flow}/{step}`, the
    artifact token), retried for a while: a pod that cannot read it does not start from an
    empty one."""
    if not s.api_url.startswith(("http://", "https://")):
        return {}
    flow, step = quote(str(s.step["flow"]), safe=""), quote(str(s.step["step"]), safe="")
    url = f"{s.api_url}/api/v1/snapshots/{flow}/{step}"
    request = urllib.request.Request(  # noqa: S310 (http(s) only: checked above)
        url, headers={"Authorization": f"Bearer {s.artifact_token}"}
    )
    deadline = time.monotonic() + READY_TIMEOUT
    delay = 0.2
    while True:
        try:
            with urllib.request.urlopen(request, timeout=30) as answer:  # noqa: S310
                data = json.loads(answer.read(MAX_SNAPSHOT + 1)[:MAX_SNAPSHOT])
            return dict(data.get("snapshot") or {})
        except urllib.error.HTTPError as exc:
            if exc.code < 500:
                detail = exc.read(2000).decode(errors="replace")
                raise PodError(f"snapshot refused: HTTP {exc.code} {detail}") from None
            why = f"HTTP {exc.code}"
        except (urllib.error.URLError, OSError, ValueError) as exc:
            why = str(exc)
        if time.monotonic() > deadline:
            raise PodError(f"the step's snapshot could not be read from {url}: {why}")
        time.sleep(delay)
        delay = min(delay * 2, 5.0)


def fetch_artifact(s: Settings) -> Path:
    """The verified, extracted code folder (downloaded unless a verified one is there)."""
    code, marker = s.artifact_dir / "code", s.artifact_dir / ".verified-sha256"
    with contextlib.suppress(OSError):
        if marker.read_text().strip() == s.artifact_sha256 and code.is_dir():
            return code
    download = s.artifact_dir / ".download.tar.gz"
    request = urllib.request.Request(  # noqa: S310 (http(s) only: Settings checked it)
        s.artifact_url, headers={"Authorization": f"Bearer {s.artifact_token}"}
    )
    digest = hashlib.sha256()
    size = 0
    try:
        with urllib.request.urlopen(request, timeout=60) as answer, download.open("wb") as fh:  # noqa: S310
            while data := answer.read(CHUNK):
                size += len(data)
                if size > MAX_ARCHIVE:
                    raise PodError(f"artifact at {s.artifact_url} is larger than {MAX_ARCHIVE}")
                digest.update(data)
                fh.write(data)
    except urllib.error.HTTPError as exc:
        detail = exc.read(2000).decode(errors="replace")
        raise PodError(f"artifact download refused: HTTP {exc.code} {detail}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise PodError(f"artifact download from {s.artifact_url} failed: {exc}") from None
    got = digest.hexdigest()
    if not hmac.compare_digest(got, s.artifact_sha256):
        download.unlink(missing_ok=True)
        raise PodError(
            f"artifact refused: its sha256 is {got}, the Deployment names "
            f"{s.artifact_sha256} (a tampered or replaced archive); nothing of it was used"
        )
    staging = s.artifact_dir / ".staging"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        with tarfile.open(download, "r:gz") as tar:
            tar.extractall(staging, filter="data")
    except (tarfile.TarError, OSError) as exc:
        raise PodError(f"artifact cannot be extracted: {exc}") from None
    shutil.rmtree(code, ignore_errors=True)
    staging.rename(code)
    download.unlink(missing_ok=True)
    marker.write_text(s.artifact_sha256 + "\n")
    return code


# -- probes ----------------------------------------------------------------------------------


class Probes:
    """/healthz and /readyz over plain HTTP/1.0 (the kubelet's httpGet)."""

    def __init__(self) -> None:
        self.ready = False
        self.server: asyncio.Server | None = None

    async def start(self, port: int) -> None:
        self.server = await asyncio.start_server(self._serve, "0.0.0.0", port)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), 5)
            path = line.split(b" ")[1] if line.count(b" ") >= 2 else b""
            if path == b"/healthz":
                status = b"200 OK"
            elif path == b"/readyz":
                status = b"200 OK" if self.ready else b"503 Service Unavailable"
            else:
                status = b"404 Not Found"
            writer.write(b"HTTP/1.0 " + status + b"\r\nContent-Length: 0\r\n\r\n")
            await writer.drain()
        except (TimeoutError, OSError):
            pass
        finally:
            writer.close()

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


# -- the sailor ------------------------------------------------------------------------------


@dataclass
class Outcome:
    outputs: list[tuple[dict[str, Any], dict[str, Any], Any]]  # headers, attachments, body
    error: str | None = None


class SailorProcess:
    """deployd's sailor for this step, connected over a private abstract socket."""

    def __init__(self, spec: dict[str, Any], code: Path) -> None:
        self.token = secrets.token_hex(16)
        # Padded with NULs to the whole sun_path (108 bytes): node (libuv) connects to an
        # abstract address with that full length, so only a padded name matches it.
        self.address = f"\0deployd-pod-{uuid.uuid4().hex}".ljust(108, "\0")
        env = dict(spec.get("env") or {})
        env.update({k: v for k, v in os.environ.items() if k.startswith("ELASTICIO_")})
        env["ELASTICIO_EXEC_ID"] = uuid.uuid4().hex
        self.spec = {
            "flow": spec["flow"],
            "step": spec["step"],
            "kind": spec["kind"],
            "component": spec["component"],
            "version": spec["version"],
            "function": spec["function"],
            "config": spec.get("config") or {},
            "credential": spec.get("credential"),
            "artifact_dir": str(code),
            "main": spec["main"],
            "runtime": spec.get("runtime", "python"),
            "env": env,
            "variables": spec.get("variables") or {},
            "token": self.token,
            "socket": self.address,
        }
        self.proc: asyncio.subprocess.Process | None = None
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.ref = 0
        self.snapshot: dict[str, Any] = {}
        self.first = True
        # One request at a time: a hook asked by deployd waits for the current call to end.
        self.lock = asyncio.Lock()

    def command(self) -> list[str]:
        """The sailor of the step's runtime (the same ones as on one machine)."""
        runtime = self.spec["runtime"]
        if runtime == "python":
            return [sys.executable, "-m", "deployd.runtime.sailor_py"]
        if runtime == "node":
            node = shutil.which("node")
            if node is None:
                raise PodError(
                    'a runtime = "node" step, and this image has no `node` on PATH: use '
                    "the step image built from deploy/step/Containerfile"
                )
            return [node, str(SAILOR_JS)]
        raise PodError(f"runtime {runtime!r} is not a runtime deployd's step image runs")

    def environment(self) -> dict[str, str]:
        """Nothing of the pod's own environment (its broker url, its tokens): the sailor sets
        the step's `ELASTICIO_*` and `env` from the spec, as on one machine."""
        home = Path(self.spec["artifact_dir"]).parent / "home"
        home.mkdir(exist_ok=True)
        env = clean_env(home, {"PYTHONUNBUFFERED": "1", "PYTHONPATH": PACKAGE_ROOT})
        env.pop("CI", None)
        env["DEPLOYD_SPEC"] = json.dumps(self.spec)  # not argv: `ps` shows argv to everyone
        return env

    async def start(self) -> None:
        command = self.command()
        connected: asyncio.Future[tuple[asyncio.StreamReader, asyncio.StreamWriter]]
        connected = asyncio.get_running_loop().create_future()

        def accept(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            if not connected.done():
                connected.set_result((r, w))

        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(self.address)
        server = await asyncio.start_unix_server(accept, sock=sock, limit=16 << 20)
        self.proc = await asyncio.create_subprocess_exec(
            *command, env=self.environment(), cwd=self.spec["artifact_dir"]
        )
        try:
            reader, self.writer = await asyncio.wait_for(connected, READY_TIMEOUT)
        finally:
            server.close()
        self.reader = reader
        hello = decode(await reader.readline())
        if hello.get("t") != "hello" or not hmac.compare_digest(
            str(hello.get("token")), self.token
        ):
            raise PodError("the sailor did not say hello")
        first = decode(await reader.readline())
        if first.get("t") != "ready":
            raise PodError(f"step {self.spec['step']} failed to start: {first.get('error')}")

    async def request(self, line: dict[str, Any]) -> Outcome:
        async with self.lock:
            return await self._request(line)

    async def _request(self, line: dict[str, Any]) -> Outcome:
        assert self.reader is not None and self.writer is not None
        self.ref += 1
        line = {**line, "ref": self.ref}
        if self.first:
            line["snapshot"] = self.snapshot
            self.first = False
        self.writer.write(encode(line))
        await self.writer.drain()
        out = Outcome([])
        while True:
            raw = await self.reader.readline()
            if not raw:
                raise PodError(f"step {self.spec['step']}'s sailor exited")
            event = decode(raw)
            kind = event["t"]
            if kind == "data":
                out.outputs.append(
                    (event.get("headers") or {}, event.get("attachments") or {}, event["body"])
                )
            elif kind == "snapshot":
                self.snapshot = dict(event.get("data") or {})
            elif kind == "updateSnapshot":
                self.snapshot = {**self.snapshot, **(event.get("data") or {})}
            elif kind in ("error", "rebound"):
                out.error = str(event.get("error"))
            elif kind == "done":
                return out

    async def hook(self, name: str, data: Any = None) -> tuple[Any, str | None]:
        """The trigger's `startup()` or `shutdown(data)`, between two calls: what it returned
        and its error (None: it did not fail)."""
        async with self.lock:
            assert self.reader is not None and self.writer is not None
            self.ref += 1
            line: dict[str, Any] = {"t": name, "ref": self.ref}
            if name == "shutdown":
                line["data"] = data
            self.writer.write(encode(line))
            await self.writer.drain()
            error = None
            while True:
                raw = await self.reader.readline()
                if not raw:
                    raise PodError(f"step {self.spec['step']}'s sailor exited")
                event = decode(raw)
                if event["t"] == "error":
                    error = str(event.get("error"))
                elif event["t"] == "result":
                    return event.get("data"), error

    async def stop(self, timeout: float) -> None:
        if self.writer is not None:
            with contextlib.suppress(OSError):
                self.writer.write(encode({"t": "stop"}))
                await self.writer.drain()
        if self.proc is not None:
            try:
                await asyncio.wait_for(self.proc.wait(), timeout)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()


# -- the step --------------------------------------------------------------------------------


class Agent:
    """One step: its sailor, its queues, its outputs."""

    def __init__(self, s: Settings, sailor: SailorProcess, broker: Broker) -> None:
        self.s = s
        self.step = s.step
        self.flow: str = s.step["flow"]
        self.sailor = sailor
        self.broker = broker
        self.stopping = asyncio.Event()
        self.exec_id = uuid.uuid4().hex[:12]
        self.snapshot_loaded = False
        self.records = 0
        # Backpressure: the next step's queue depth as last counted, plus what was published
        # to it since — an upper bound (its consumers only lower it), so the broker is asked
        # only when that bound reaches the queue's limit.
        self.next_counted = 0
        self.next_published = 0
        self.held = False
        # The ids of the messages this pod handled (outputs confirmed, input acked), newest
        # last: one delivered again — its upstream pod died after publishing it and published
        # it anew, or the connection went before its ack — is acked without a second call.
        self.handled: OrderedDict[str, None] = OrderedDict()
        self.hooks_consumer: tuple[Any, str] | None = None  # (queue, consumer tag)
        self.hooks_running: set[asyncio.Task[Any]] = set()

    async def publish_outputs(self, parent: dict[str, Any], outcome: Outcome) -> None:
        """Each output to the next step's queue (its mapping applied), each confirmed."""
        nxt = self.step.get("next")
        if nxt is None:
            return
        passthrough = dict(parent.get("passthrough") or {})
        pending = []
        for i, (headers, attachments, body) in enumerate(outcome.outputs):
            out_id = f"{parent['id']}.{i}"
            entry: dict[str, Any] = {"id": out_id, "body": body, "headers": headers}
            through = {**passthrough, self.step["step"]: entry}
            value = body
            if nxt.get("mapping"):
                value = apply_mapping(
                    nxt["mapping"], body, through, self.step.get("variables") or {}
                )
            data = envelope(
                out_id,
                json.dumps(value),
                json.dumps(headers),
                json.dumps(through),
                json.dumps(attachments),
            )
            head = {
                "messageId": out_id,
                "parentMessageId": parent["id"],
                "threadId": (parent.get("headers") or {}).get("threadId", parent["id"]),
                "flowId": self.flow,
                "stepId": nxt["step"],
            }
            pending.append(
                self.broker.publish(
                    EXCHANGE, routing_key(self.flow, nxt["step"]), data, properties(out_id, head)
                )
            )
        await asyncio.gather(*pending)
        self.next_published += len(pending)

    async def hold(self) -> None:
        """Before a call (a trigger) or a message (an action): while the next step's queue is
        at its `max_queue`, wait until it is below 90% of it (backpressure, as on one
        machine; nothing is dropped). Returns at once while the bound allows."""
        nxt: dict[str, Any] = self.step.get("next") or {}
        limit = int(nxt.get("max_queue") or 0)
        if not limit or self.next_counted + self.next_published < limit:
            return
        depth = await self.broker.depth(self.flow, nxt["step"])
        self.next_counted, self.next_published = depth, 0
        if depth < limit:
            return
        self.held = True
        print(
            f"deployd pod: held: the queue of step {nxt['step']} is full ({depth} >= {limit})",
            file=sys.stderr,
            flush=True,
        )
        while depth >= limit * 0.9 and not self.stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), HOLD_POLL)
            depth = await self.broker.depth(self.flow, nxt["step"])
        self.next_counted, self.held = depth, False
        print(f"deployd pod: resumed ({depth} queued)", file=sys.stderr, flush=True)

    async def record(self, kind: str, body: dict[str, Any], failures: int = 0) -> None:
        """A snapshot or a dead letter to the flow's records queue, confirmed (deployd writes
        it to its database: `records.py`)."""
        self.records += 1
        head = {
            KIND_HEADER: kind,
            "stepId": self.step["step"],
            "flowVersion": int(self.step["flow_version"]),
            "x-deployd-failures": failures,
        }
        msg_id = f"{self.flow}.{self.step['step']}.{self.exec_id}.r{self.records}"
        data = json.dumps(body).encode()
        await self.broker.publish("", records_queue(self.flow), data, properties(msg_id, head))

    async def dead_letter(self, message: dict[str, Any], error: str, failures: int = 0) -> None:
        await self.record("dead", {"message": message, "error": error[:20000]}, failures)

    async def load_snapshot(self) -> None:
        """The step's snapshot from deployd, once, before its first call or message."""
        if not self.snapshot_loaded:
            self.sailor.snapshot = await asyncio.to_thread(fetch_snapshot, self.s)
            self.snapshot_loaded = True

    async def keep_snapshot(self, before: dict[str, Any]) -> None:
        if self.sailor.snapshot != before:
            await self.record("snapshot", {"data": self.sailor.snapshot})

    async def wait_gate(self) -> bool:
        """Until deployd opens this step's start gate of this version (True) or the pod stops
        (False)."""
        assert self.broker.conn is not None
        channel = await self.broker.conn.channel()
        name = gate_queue(self.flow, self.step["step"], int(self.step["flow_version"]))
        queue = await channel.declare_queue(
            name, durable=True, arguments={"x-queue-type": "quorum"}
        )
        opened = asyncio.Event()

        async def got(message: Any) -> None:
            # Given back, not taken: the gate stays open for this version's next pod (a
            # restart, a rescheduling) until deployd deletes it at the next switch.
            await message.nack(requeue=True)
            opened.set()

        tag = await queue.consume(got)
        try:
            stop = asyncio.ensure_future(self.stopping.wait())
            gate = asyncio.ensure_future(opened.wait())
            await asyncio.wait({stop, gate}, return_when=asyncio.FIRST_COMPLETED)
            stop.cancel()
            gate.cancel()
            return opened.is_set()
        finally:
            with contextlib.suppress(Exception):
                await queue.cancel(tag)
            with contextlib.suppress(Exception):
                await channel.close()

    async def serve_hooks(self) -> None:
        """Take deployd's startup()/shutdown() requests (`hooks.py`) from this version's hooks
        queue, declared here before the pod is ready; from then on, gate open or not."""
        assert self.broker.conn is not None
        channel = await self.broker.conn.channel()
        await channel.set_qos(prefetch_count=1)
        name = hooks_queue(self.flow, self.step["step"], int(self.step["flow_version"]))
        queue = await hooks.declare(channel, name)
        self.hooks_consumer = (queue, await queue.consume(self._hook))

    async def _hook(self, message: Any) -> None:
        await message.ack()  # taken: a pod that dies in the hook does not run it again
        task = asyncio.current_task()
        if task is not None:
            self.hooks_running.add(task)
        try:
            try:
                request = json.loads(message.body)
                name = request.get("hook")
                if name not in hooks.HOOKS:
                    raise PodError(f"not a trigger hook: {name!r}")
                data, error = await self.sailor.hook(name, request.get("data"))
            except (PodError, ValueError, AttributeError) as exc:
                name, data, error = "hook", None, f"the pod could not run it: {exc}"
            print(
                f"deployd pod: {name}() " + ("ran" if error is None else f"failed: {error}"),
                file=sys.stderr,
                flush=True,
            )
            if message.reply_to:
                try:
                    await self.broker.publish(
                        "",
                        message.reply_to,
                        hooks.reply(data, error),
                        hooks.reply_properties(message.correlation_id),
                    )
                except Exception as exc:  # deployd stopped waiting (its reply-to is gone)
                    print(f"deployd pod: {name}() answer not sent: {exc}", file=sys.stderr)
        finally:
            if task is not None:
                self.hooks_running.discard(task)

    async def stop_hooks(self, timeout: float) -> None:
        """No more requests; the one being run finishes (and is answered) first."""
        if self.hooks_consumer is None:
            return
        queue, tag = self.hooks_consumer
        with contextlib.suppress(Exception):
            await queue.cancel(tag)  # a close now would cancel the hook being run
        if self.hooks_running:
            await asyncio.wait(set(self.hooks_running), timeout=timeout)
        with contextlib.suppress(Exception):
            await queue.channel.close()

    async def run_trigger(self) -> None:
        interval = float(self.step.get("interval") or 1.0)
        call = 0
        if not await self.wait_gate():
            return
        await self.load_snapshot()  # after the gate: the old trigger's last one is written
        print("deployd pod: started", file=sys.stderr, flush=True)
        while not self.stopping.is_set():
            await self.hold()
            if self.stopping.is_set():
                break
            call += 1
            before = self.sailor.snapshot
            outcome = await self.sailor.request({"t": "call"})
            parent = {"id": f"{self.flow}.{self.step['step']}.{self.exec_id}.{call}"}
            if outcome.error is None:
                await self.publish_outputs(parent, outcome)
            else:
                print(f"deployd pod: call {call} failed: {outcome.error}", file=sys.stderr)
            await self.keep_snapshot(before)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), interval)  # a call boundary

    async def run_action(self) -> None:
        # At its gate until the old version's pods of this step are gone (a switch): the two
        # versions never consume the step's queue at once, so its order is kept.
        if not await self.wait_gate():
            return
        channel = await self.broker.consumer_channel()
        await channel.set_qos(prefetch_count=1)
        queue = await self.broker.declare_step(self.flow, self.step["step"], channel)
        inbox: asyncio.Queue[Any] = asyncio.Queue()
        await queue.consume(inbox.put)
        try:
            while not self.stopping.is_set():
                getter = asyncio.ensure_future(inbox.get())
                stop = asyncio.ensure_future(self.stopping.wait())
                await asyncio.wait({getter, stop}, return_when=asyncio.FIRST_COMPLETED)
                stop.cancel()
                if not getter.done():
                    getter.cancel()
                    break
                await self._handle(getter.result())
        finally:
            # What was delivered and not handled goes back by the close, first again — and
            # in the same step as this consumer goes (no basic.cancel first: the queue would
            # count no consumer while it still holds the message, and deployd, which waits
            # for no consumer before it takes a moving flow's queue, would take later ones
            # before it).
            with contextlib.suppress(Exception):
                await channel.close()

    async def _handle(self, delivery: Any) -> None:
        await self.hold()  # held, this message waits unacked (back to its queue on a stop)
        if self.stopping.is_set():
            return
        await self.load_snapshot()
        message = json.loads(delivery.body)
        msg = {k: message.get(k) for k in ("id", "body", "headers", "passthrough", "attachments")}
        msg_id = str(msg.get("id") or "")
        if msg_id and msg_id in self.handled:
            print(
                f"deployd pod: message {msg_id} was handled before: acked, not processed again",
                file=sys.stderr,
                flush=True,
            )
            await self._ack(delivery, msg_id)
            return
        before = self.sailor.snapshot
        outcome = await self.sailor.request({"t": "msg", "msg": msg})
        try:
            if outcome.error is None:
                await self.publish_outputs(message, outcome)
        except Exception as exc:  # a mapping that fails: the message is a dead letter
            outcome.error = f"mapping for step {self.step['next']['step']} failed: {exc}"
        if outcome.error is not None:
            failures = int((delivery.headers or {}).get("x-deployd-failures") or 0)
            await self.dead_letter(msg, outcome.error, failures)
        await self.keep_snapshot(before)
        if msg_id and outcome.error is None:  # a dead letter may be retried: not remembered
            # Before the ack: if it does not reach the broker, the message comes again.
            self.handled[msg_id] = None
            if len(self.handled) > HANDLED_MEMORY:
                self.handled.popitem(last=False)
        await self._ack(delivery, msg_id)  # after its outputs, letter and snapshot are confirmed

    async def _ack(self, delivery: Any, msg_id: str) -> None:
        """Ack on the channel the message came on. That channel may be gone meanwhile (a lost
        connection, a broker restart, the broker's `consumer_timeout` after a long hold): the
        broker then gives the message again on the channel that replaced it, where it is
        recognised as handled. Not a reason to stop the pod."""
        try:
            await delivery.ack()
        except Exception as exc:
            print(
                f"deployd pod: message {msg_id} could not be acked ({type(exc).__name__}: "
                f"{redact(str(exc))}): its channel is gone; the broker delivers it again",
                file=sys.stderr,
                flush=True,
            )


async def serve(environ: dict[str, str]) -> int:
    """The whole pod; the exit code."""
    probes = Probes()
    s = Settings.from_environ(environ)
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stopping.set)  # Unix signal 15: the kubelet's stop
    loop.add_signal_handler(signal.SIGINT, stopping.set)
    await probes.start(s.probe_port)
    # Named for the step, so that an operator tells a pod's connections from deployd's.
    broker = Broker(s.amqp_url, f"deployd pod {s.step['flow']}.{s.step['step']}")
    sailor: SailorProcess | None = None
    try:
        code = await asyncio.to_thread(fetch_artifact, s)
        sailor = SailorProcess(s.step, code)
        await sailor.start()
        await broker.wait(READY_TIMEOUT)
        agent = Agent(s, sailor, broker)
        if s.step.get("next"):  # publishes are mandatory: its queue must be there
            await broker.declare_step(agent.flow, s.step["next"]["step"])
        assert broker.channel is not None
        await broker.channel.declare_queue(
            records_queue(agent.flow), durable=True, arguments={"x-queue-type": "quorum"}
        )
        if s.step["kind"] == "trigger":
            await agent.serve_hooks()  # before ready: a warmed version takes hook requests
            work = loop.create_task(agent.run_trigger())
        else:
            work = loop.create_task(agent.run_action())
        probes.ready = True
        print(f"deployd pod: step {s.step['step']} ready", file=sys.stderr, flush=True)
        waiter = loop.create_task(stopping.wait())
        await asyncio.wait({work, waiter}, return_when=asyncio.FIRST_COMPLETED)
        probes.ready = False
        agent.stopping.set()
        waiter.cancel()
        started = time.monotonic()
        await work  # the current call or message finishes first
        await agent.stop_hooks(10)
        print(
            f"deployd pod: stopped at a call boundary in {time.monotonic() - started:.3f}s",
            file=sys.stderr,
            flush=True,
        )
        return 0
    finally:
        probes.ready = False
        if sailor is not None:
            await sailor.stop(10)
        await broker.close()
        await probes.close()


def main() -> int:
    try:
        return asyncio.run(serve(dict(os.environ)))
    except (PodError, DeploydError) as exc:  # BrokerUnreachable is a DeploydError
        print(f"deployd pod: {redact(str(exc))}", file=sys.stderr, flush=True)
        return EXIT_REFUSED if "artifact refused" in str(exc) else 1


if __name__ == "__main__":
    sys.exit(main())
