"""The seed platform's own message path on a RabbitMQ broker: the real elastic.io sailor.

`run_seed_sailor(amqp_url, work)` runs the npm package `elasticio-sailor-nodejs` (installed on
demand into bench/.cache/seed-sailor/, version SAILOR_VERSION) as three step processes of a
flow trigger -> pass -> sink, with the component in bench/seed_component/, and returns its
throughput, latency and counts. It is the seed side of the RabbitMQ runtime's benchmark.

What the platform would do, and what stands in for it here:

* Topology. One direct exchange per user (`userexchange:<user>`, the sailor's PUBLISH_MESSAGES_TO),
  one durable queue per step (`<flow>:<step>:<exec>:messages`, its LISTEN_MESSAGES_ON); step
  n publishes with routing key `<flow>:<step n>:<exec>:message` and step n+1's queue is bound
  to that key. The error, rebound and snapshot keys of every step go to one more queue (the
  platform's handlers would read it); it must stay empty, and the run fails if it does not.
* The platform API. At start every sailor asks for its step: `GET /v1/tasks/{flow}/steps/{step}`
  (basic auth API_USERNAME:API_KEY, through `elasticio-rest-node`). A loopback http.server
  answers it with {id, comp_id, function, config, snapshot: {}, is_passthrough: false,
  variables: {}}; `config` carries the bench's settings to the component. Nothing else is
  requested with the settings used here (startup hooks and object storage are off); any other
  request is answered 404 and reported in `notes`.
* The trigger's start. In the platform a trigger step is a sailor on a queue like any other
  and the scheduler starts a poll by sending that queue a message. Here one such message
  (body {}, AES-256-CBC with the flow's crypto password and IV, base64 = protocol version 1, a
  messageId header, as the sailor's own integration tests send it) goes to the trigger's queue
  through the default exchange; that one process() call then emits every message of the run,
  numbered, with its CLOCK_MONOTONIC stamp in the body: `await this.emit('data', ...)` (the
  documented way, which waits for the sailor's flow control and the broker's confirm) as fast
  as it returns, or paced to `rate` msg/s. The run ends after `seconds` even if the trigger
  fell behind its rate; `notes` then says by how much and gives the latency counted from the
  scheduled times too (the emit stamp alone would hide the trigger's own lag).
* Messages as components make them: {id: uuid, body, headers, attachments, metadata}, what
  elasticio-node's newMessageWithBody returns. The id becomes the messageId header, and the
  sailor's deduplication (2.7.7 and later) takes deliveries with one messageId as one message:
  without ids, every message of one trigger call would share its messageId.
* The sailor as the platform runs it: `node node_modules/elasticio-sailor-nodejs/run.js` with
  the component directory as cwd (COMPONENT_PATH is relative to cwd), prefetch 1 (its
  default RABBITMQ_PREFETCH_SAILOR; `prefetch=` changes it), each output published on a
  confirm channel and waited for, the input acked after `end`, transient messages
  (AMQP_PERSISTENT_MESSAGES default), bunyan logs at info (its default; one line a message in
  the actions) to a file. One setting differs from its defaults: DATA_RATE_LIMIT, the static
  flow control of 10 data messages per 100 ms (100 msg/s a step), is raised out of the way
  (`data_rate_limit=None`), else nothing above 100 msg/s could be measured; pass
  `data_rate_limit=10` for the platform's default. Even so every emit goes through the
  throttle's setTimeout, at least 1 ms in Node: with prefetch 1 a step cannot pass more than
  about 1 / (1 ms + a confirm round trip + its own CPU) messages a second.

Latency is the sink's handling time minus the trigger's stamp; throughput is the messages the
sink handled over the time from the first stamp to the last handling. lost = emitted and never
handled, duplicated = handled more than once. `notes` also has each sailor's CPU time a
message (from /proc, from the start message to the end of the drain) and the load average,
as the figures depend on what else the machine runs. Everything is torn down after the run
(sailor processes, the stub, queues and exchange); the run's directory under `work`, with the
sailors' logs, is kept only when something was lost, duplicated or left in a queue.

Standalone: `python bench/seed_sailor.py [--url URL] [--seconds N] [--rate R]` prints the JSON;
without --url it starts a private broker (rabbitmq-server on loopback ports, in a temp dir).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

SAILOR_VERSION = "2.7.8"
HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CACHE = HERE / ".cache" / "seed-sailor"
COMPONENT = HERE / "seed_component"
ADMIN = HERE / "seed_amqp.js"
STEPS = (("step_1", "trigger"), ("step_2", "pass"), ("step_3", "sink"))
API_USER = "bench@seed.invalid"
CRYPTO_IV = "iv=any16_symbols"  # 16 bytes, as AES-256-CBC needs
UNTHROTTLED = 1_000_000  # data messages per RATE_INTERVAL (100 ms)


# -- install ----------------------------------------------------------------------------------


def installed_version() -> str | None:
    pkg = CACHE / "node_modules" / "elasticio-sailor-nodejs" / "package.json"
    try:
        return str(json.loads(pkg.read_text())["version"])
    except (OSError, ValueError, KeyError):
        return None


def ensure_sailor() -> str:
    """Install elasticio-sailor-nodejs@SAILOR_VERSION into CACHE unless it is there; its version."""
    if installed_version() != SAILOR_VERSION:
        CACHE.mkdir(parents=True, exist_ok=True)
        manifest = {
            "name": "deployd-seed-sailor",
            "private": True,
            "dependencies": {"elasticio-sailor-nodejs": SAILOR_VERSION},
        }
        (CACHE / "package.json").write_text(json.dumps(manifest, indent=2) + "\n")
        subprocess.run(
            ["npm", "install", "--no-audit", "--no-fund", "--ignore-scripts", "--loglevel=error"],
            cwd=CACHE,
            check=True,
            stdout=subprocess.DEVNULL,
        )
    version = installed_version()
    if version is None:
        raise RuntimeError(f"elasticio-sailor-nodejs is not in {CACHE} after npm install")
    return version


# -- small helpers ----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(pred: Callable[[], Any], timeout: float, what: str, interval: float = 0.02) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def pct(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..1)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def node_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ELASTICIO_")}
    env["NODE_PATH"] = str(CACHE / "node_modules")
    env.pop("NODE_ENV", None)  # "test" would silence the sailor's logging
    return env


def admin(cmd: str, spec: Path, timeout: float = 60.0) -> Any:
    out = subprocess.run(
        ["node", str(ADMIN), cmd, str(spec)],
        env=node_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if out.returncode != 0:
        raise RuntimeError(f"seed_amqp.js {cmd} failed: {out.stderr.strip()}")
    return json.loads(out.stdout)


# -- the platform API stub --------------------------------------------------------------------


class ApiStub:
    """A loopback stand-in for the platform API: answers the sailors' step-info requests."""

    def __init__(self, flow_id: str, api_key: str, steps: dict[str, dict[str, Any]]) -> None:
        self.requests: list[str] = []
        self.unanswered: list[str] = []
        auth = "Basic " + base64.b64encode(f"{API_USER}:{api_key}".encode()).decode()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                line = f"{self.command} {self.path}"
                stub.requests.append(line)
                prefix = f"/v1/tasks/{flow_id}/steps/"
                step = self.path[len(prefix) :] if self.path.startswith(prefix) else None
                if self.headers.get("Authorization") != auth:
                    status, body = 401, {"error": "bad credentials"}
                elif self.command == "GET" and step in steps:
                    status, body = 200, steps[step]
                else:
                    stub.unanswered.append(line)
                    status, body = 404, {"error": "not in the stub"}
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_DELETE = _answer

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


# -- the run ----------------------------------------------------------------------------------


def _stop(procs: list[subprocess.Popen[bytes]]) -> list[int | None]:
    """SIGTERM (the sailor's graceful shutdown), then SIGKILL what is left after 10 s."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 10
    for p in procs:
        with suppress(subprocess.TimeoutExpired):
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        if p.poll() is None:
            p.kill()
            p.wait()
    return [p.returncode for p in procs]


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a live process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _read_sink(path: Path) -> list[tuple[int, float, float]]:
    rows = []
    with suppress(FileNotFoundError), path.open() as f:
        for line in f:
            if line.endswith("\n"):
                seq, emitted, handled = line.split()
                rows.append((int(seq), float(emitted), float(handled)))
    return rows


def _line_count(path: Path) -> int:
    try:
        with path.open("rb") as f:
            return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 16), b""))
    except FileNotFoundError:
        return 0


def run_seed_sailor(
    amqp_url: str,
    work: Path,
    seconds: float = 10.0,
    rate: float | None = None,
    *,
    data_rate_limit: int | None = None,
    prefetch: int | None = None,
    log_level: str = "info",
    drain_timeout: float = 120.0,
) -> dict[str, Any]:
    """Run trigger -> pass -> sink on the real sailor for `seconds`; the figures of the run.

    rate None: the trigger emits as fast as the sailor lets it (throughput); rate N: N msg/s
    (latency at that rate). data_rate_limit None lifts the sailor's static flow control (its
    default is 10 a 100 ms); prefetch None keeps the sailor's RABBITMQ_PREFETCH_SAILOR (1);
    log_level is the sailor's LOG_LEVEL (the platform's is info).
    """
    version = ensure_sailor()
    load_before = f"{os.getloadavg()[0]:.1f}"
    work.mkdir(parents=True, exist_ok=True)
    run = work / f"seed-sailor-{secrets.token_hex(4)}"
    run.mkdir()
    flow_id = secrets.token_hex(12)  # 24 hex digits, as the platform's ids
    exec_id = secrets.token_hex(12)
    user_id = secrets.token_hex(12)
    workspace_id = secrets.token_hex(12)
    comp_id = secrets.token_hex(12)
    api_key = secrets.token_hex(8)
    crypto_password = secrets.token_hex(16)
    exchange = f"userexchange:{user_id}"

    def key(step: str, kind: str) -> str:
        return f"{flow_id}:{step}:{exec_id}:{kind}"

    def queue(step: str) -> str:
        return f"{flow_id}:{step}:{exec_id}:messages"

    platform_queue = f"{flow_id}:{exec_id}:platform"
    queues = [{"name": queue(step), "bindings": []} for step, _ in STEPS]
    for i in range(1, len(STEPS)):
        queues[i]["bindings"].append(key(STEPS[i - 1][0], "message"))
    queues.append(
        {
            "name": platform_queue,
            "bindings": [
                key(step, kind) for step, _ in STEPS for kind in ("error", "rebound", "snapshot")
            ],
        }
    )
    tally, sink_out = run / "trigger.json", run / "sink.txt"
    config = {"seconds": seconds, "rate": rate or 0, "tally": str(tally), "out": str(sink_out)}
    step_info = {
        step: {
            "id": step,
            "comp_id": comp_id,
            "function": fn,
            "config": config,
            "snapshot": {},
            "is_passthrough": False,
            "variables": {},
        }
        for step, fn in STEPS
    }
    spec = run / "spec.json"
    spec.write_text(
        json.dumps(
            {
                "url": amqp_url,
                "exchange": exchange,
                "queues": queues,
                "consumers": [queue(step) for step, _ in STEPS],
                "timeout_ms": 30_000,
                "start": {
                    "queue": queue(STEPS[0][0]),
                    "password": crypto_password,
                    "iv": CRYPTO_IV,
                    "headers": {
                        "execId": exec_id,
                        "taskId": flow_id,
                        "workspaceId": workspace_id,
                        "userId": user_id,
                        "stepId": "scheduler",
                        "messageId": secrets.token_hex(16),
                        "threadId": secrets.token_hex(16),
                    },
                },
            }
        )
    )

    stub = ApiStub(flow_id, api_key, step_info)
    procs: list[subprocess.Popen[bytes]] = []
    declared = False
    try:
        admin("declare", spec)
        declared = True
        sailor = CACHE / "node_modules" / "elasticio-sailor-nodejs" / "run.js"
        for step, fn in reversed(STEPS):  # downstream first: each step's queue is read from
            env = node_env() | {
                "LOG_LEVEL": log_level,
                "ELASTICIO_AMQP_URI": amqp_url,
                "ELASTICIO_LISTEN_MESSAGES_ON": queue(step),
                "ELASTICIO_PUBLISH_MESSAGES_TO": exchange,
                "ELASTICIO_DATA_ROUTING_KEY": key(step, "message"),
                "ELASTICIO_ERROR_ROUTING_KEY": key(step, "error"),
                "ELASTICIO_REBOUND_ROUTING_KEY": key(step, "rebound"),
                "ELASTICIO_SNAPSHOT_ROUTING_KEY": key(step, "snapshot"),
                "ELASTICIO_MESSAGE_CRYPTO_PASSWORD": crypto_password,
                "ELASTICIO_MESSAGE_CRYPTO_IV": CRYPTO_IV,
                "ELASTICIO_API_URI": stub.url,
                "ELASTICIO_API_USERNAME": API_USER,
                "ELASTICIO_API_KEY": api_key,
                "ELASTICIO_FLOW_ID": flow_id,
                "ELASTICIO_EXEC_ID": exec_id,
                "ELASTICIO_STEP_ID": step,
                "ELASTICIO_CONTAINER_ID": f"{step}-{secrets.token_hex(4)}",
                "ELASTICIO_WORKSPACE_ID": workspace_id,
                "ELASTICIO_USER_ID": user_id,
                "ELASTICIO_COMP_ID": comp_id,
                "ELASTICIO_FUNCTION": fn,
                "ELASTICIO_DATA_RATE_LIMIT": str(data_rate_limit or UNTHROTTLED),
            }
            if prefetch:
                env["ELASTICIO_RABBITMQ_PREFETCH_SAILOR"] = str(prefetch)
            log = (run / f"{step}-{fn}.log").open("wb")
            procs.append(
                subprocess.Popen(
                    ["node", str(sailor)],
                    cwd=COMPONENT,
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )
            log.close()
        admin("wait-consumers", spec)
        cpu_start = [_cpu_seconds(p.pid) for p in procs]
        admin("start", spec)

        def dead() -> str | None:
            for p, (step, fn) in zip(procs, reversed(STEPS), strict=True):
                if p.poll() is not None:
                    return f"the {fn} sailor ({step}) exited with {p.returncode}"
            return None

        def trigger_done() -> bool:
            if (why := dead()) is not None:
                raise RuntimeError(why)
            return tally.exists()

        wait_until(trigger_done, seconds + 60, "the trigger to finish its run")
        trig = json.loads(tally.read_text())
        emitted = int(trig["emitted"])

        # drain: until the sink has all of them, or it makes no progress for 5 s
        last = [-1, time.monotonic()]

        def drained() -> bool:
            if (why := dead()) is not None:
                raise RuntimeError(why)
            n = _line_count(sink_out)
            if n >= emitted:
                return True
            if n != last[0]:
                last[:] = [n, time.monotonic()]
            return time.monotonic() - last[1] > 5

        wait_until(drained, drain_timeout, "the sink to handle what the trigger emitted")
        counts = admin("counts", spec)
        cpu = {
            fn: _cpu_seconds(p.pid) - c0
            for p, c0, (_, fn) in zip(procs, cpu_start, reversed(STEPS), strict=True)
        }
    finally:
        codes = _stop(procs)
        stub.close()
        if declared:
            admin("delete", spec)

    rows = _read_sink(sink_out)
    seqs = [r[0] for r in rows]
    unique = set(seqs)
    latencies = [handled - emitted_at for _, emitted_at, handled in rows]
    first = min((r[1] for r in rows), default=0.0)
    last_handled = max((r[2] for r in rows), default=0.0)
    span_s = (last_handled - first) / 1000
    left = {q: c["messages"] for q, c in counts.items() if c["messages"]}
    if counts[platform_queue]["messages"]:
        raise RuntimeError(
            f"{counts[platform_queue]['messages']} error/rebound/snapshot messages: see {run}"
        )
    notes = [
        f"real elasticio-sailor-nodejs {version} (node {_node_version()}), 3 sailor processes "
        f"trigger -> pass -> sink, prefetch {prefetch or '1 (its default)'}, "
        "publish with confirm then ack, AES-256-CBC "
        "bodies (protocol v1, base64), transient messages on durable queues",
        "static flow control "
        + (
            f"DATA_RATE_LIMIT={data_rate_limit} a 100 ms"
            if data_rate_limit
            else "lifted (sailor default DATA_RATE_LIMIT=10 a 100 ms = 100 msg/s a step)"
        ),
        f"sailor LOG_LEVEL={log_level}",
        "trigger started by one scheduler-style message on its queue; "
        f"stub answered {len(stub.requests) - len(stub.unanswered)} step-info requests",
    ]
    if stub.unanswered:
        notes.append(f"stub answered 404 to: {sorted(set(stub.unanswered))}")
    if left:
        notes.append(f"left in queues at the end: {left}")
    if any(c not in (0, None) for c in codes):
        notes.append(f"sailor exit codes at stop: {codes}")
    trig_rate = emitted / ((trig["end"] - trig["start"]) / 1000)
    if rate:
        # the emit stamp hides how far the trigger fell behind its schedule: say it
        behind = [emitted_at - (trig["start"] + seq * 1000 / rate) for seq, emitted_at, _ in rows]
        sched = [handled - (trig["start"] + seq * 1000 / rate) for seq, _, handled in rows]
        notes.append(
            f"trigger emitted {trig_rate:.0f} msg/s of {rate:g} asked, at most "
            f"{max(behind, default=0):.0f} ms behind its schedule; latency from the scheduled "
            f"time p50 {statistics.median(sched) if sched else 0:.1f} ms, "
            f"p99 {pct(sched, 0.99) if sched else 0:.1f} ms"
        )
    else:
        notes.append(f"trigger emitted {trig_rate:.0f} msg/s")
    per_msg = {fn: round(c * 1000 / max(1, len(rows)), 2) for fn, c in reversed(cpu.items())}
    notes.append(f"sailor CPU ms a message {per_msg}")
    notes.append(f"load average {load_before} before, {os.getloadavg()[0]:.1f} after")
    if not left and emitted == len(unique) == len(seqs):
        shutil.rmtree(run)  # kept, with the sailors' logs, when something is off
    return {
        "msgs_per_s": round(len(rows) / span_s, 1) if span_s > 0 else 0.0,
        "latency_p50_ms": round(statistics.median(latencies), 2) if latencies else 0.0,
        "latency_p99_ms": round(pct(latencies, 0.99), 2) if latencies else 0.0,
        "messages": len(rows),
        "lost": emitted - len(unique & set(range(emitted))),
        "duplicated": len(seqs) - len(unique),
        "sailor_version": version,
        "notes": "; ".join(notes),
    }


def _node_version() -> str:
    return subprocess.run(["node", "--version"], capture_output=True, text=True).stdout.strip()


# -- a private broker for a standalone run ----------------------------------------------------


class PrivateBroker:
    """rabbitmq-server on loopback ports in a temp dir, with its own epmd; guest/guest works."""

    def __init__(self, root: Path) -> None:
        self.root = root
        port, dist, epmd_port = free_port(), free_port(), free_port()
        (root / "plugins").write_text("[].\n")
        (root / "rabbitmq.conf").write_text(
            f"listeners.tcp.1 = 127.0.0.1:{port}\nloopback_users = none\n"
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith("RABBITMQ_")}
        env |= {
            "HOME": str(root),  # its own .erlang.cookie
            "RABBITMQ_NODENAME": "seedbench@localhost",
            "RABBITMQ_NODE_PORT": str(port),
            "RABBITMQ_DIST_PORT": str(dist),
            "ERL_EPMD_PORT": str(epmd_port),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
            "RABBITMQ_MNESIA_BASE": str(root / "mnesia"),
            "RABBITMQ_LOG_BASE": str(root / "log"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(root / "plugins"),
            "RABBITMQ_CONFIG_FILE": str(root / "rabbitmq.conf"),
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
        }
        self.url = f"amqp://guest:guest@127.0.0.1:{port}/"
        epmd = shutil.which("epmd") or "epmd"
        # our own epmd, in the foreground, so that close() stops exactly it
        self.epmd = subprocess.Popen(
            [epmd, "-port", str(epmd_port), "-address", "127.0.0.1"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        server = "/usr/lib/rabbitmq/bin/rabbitmq-server"  # not the /usr/sbin wrapper: no su
        self.log = (root / "server.out").open("wb")
        self.proc = subprocess.Popen(
            [server if Path(server).exists() else "rabbitmq-server"],
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            wait_until(lambda: self._up(port), 120, "rabbitmq-server to listen", 0.1)
        except BaseException:
            self.close()
            raise

    def _up(self, port: int) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"rabbitmq-server exited: see {self.root / 'server.out'}")
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", port)) == 0

    def close(self) -> None:
        for p in (self.proc, self.epmd):
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        self.log.close()


@contextmanager
def broker(root: Path) -> Iterator[str]:
    """tests/broker.py's start_broker where it exists, else PrivateBroker; yields the url."""
    try:
        sys.path.insert(0, str(ROOT))
        from tests.broker import start_broker  # type: ignore[import-not-found]
    except ImportError:
        started: Any = PrivateBroker(root)
    else:
        started = start_broker(root)
    try:
        yield started.url
    finally:
        started.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="AMQP url of a broker (default: start a private one)")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rate", type=float, default=None, help="msg/s (default: flat out)")
    parser.add_argument("--data-rate-limit", type=int, default=None)
    parser.add_argument("--prefetch", type=int, default=None, help="default: the sailor's, 1")
    parser.add_argument("--log-level", default="info")
    parser.add_argument("--work", type=Path, help="keep a failed run's logs here (default: temp)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="seed-sailor-") as tmp:
        work = Path(tmp)
        runs = args.work or work / "run"
        kwargs: dict[str, Any] = {
            "seconds": args.seconds,
            "rate": args.rate,
            "data_rate_limit": args.data_rate_limit,
            "prefetch": args.prefetch,
            "log_level": args.log_level,
        }
        if args.url:
            result = run_seed_sailor(args.url, runs, **kwargs)
        else:
            (work / "broker").mkdir()
            with broker(work / "broker") as url:
                result = run_seed_sailor(url, runs, **kwargs)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
