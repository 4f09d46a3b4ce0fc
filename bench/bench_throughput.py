"""Issue 11 figures: messages per second through a real-time flow, latency, backpressure, and
Node-RED side by side.

A `deployd serve` (embedded runtime, a free loopback port; a new one after each phase that
floods its queues, which stay in the state database) hosts one component pushed with
`git push`: `tput` (Python) or `tputnode` (Node.js, no package.json so no npm run). Each has
the flow trigger `emit` → action `pass` (returns its input) → action `sink` (appends one JSON
line {"n", "t_emit", "t_recv"} per message to the out file, buffered, flushed every 200 lines
or 50 ms). The trigger counts in process memory; each call emits `batch` messages
{"n": int, "t": time.time()} with n contiguous, or with `rate` set only the messages due by
now at that rate (at most `batch`), which offers an exact load whatever a call costs.

Rates and latencies are taken from the sink's lines by their `t_recv`: WINDOWS windows of
WINDOW_S seconds each, after WARM_S seconds of the flow running; the figure is the median
window. CPU % of the daemon and of each step process comes from /proc over the same span.
With no backpressure a trigger emitting 100 per call fills the queue of `pass` much faster than
the actions drain it: `ingest_msgs_per_s` (what entered the flow: the sink's rate plus the
growth of the queues) and `queued_at_end` show it.

1. `python_msgs_per_s`: interval "0s", batch 100. Target >= 10,000 msg/s. Beside it the
   same with batch 1 (one message per call).
2. `node_msgs_per_s`: the same with the Node component. Target >= 5,000 msg/s. Beside it
   the same with batch 1.
3. `latency_ms`: 1,000 msg/s offered (interval "1ms", rate 1000, batch cap 50: each call
   emits the ~1 message due), emit → sink receive, p50 / p99. Targets p50 <= 2, p99 <= 10.
   Today's code does not sustain that rate, so its queue (and the latency) grows with the
   time the flow has run; `latency_ms_at_100_msgs_per_s` (the same at 100 msg/s) is the
   latency of the path itself.
4. `backpressure`: the trigger offers 5,000 msg/s (interval "1ms", rate 5000, batch cap 50)
   to a sink sleeping 2 ms per message (~500 msg/s) for BACKPRESSURE_S seconds (10 s with
   BENCH_SHORT=1); the queue depth of each action step is read every ~100 ms from the state
   database (read-only), the daemon's RSS from /proc. The action steps get `max_queue =
   MAX_QUEUE` when the flow format accepts it (today's rejects unknown step keys: the bench
   then applies the flow without it and says so in `max_queue_in_flow`); BENCH_MAX_QUEUE=N
   sets the value, BENCH_MAX_QUEUE=0 leaves it out. Targets: depth <= max_queue + one
   call's output (batch cap), daemon RSS <= 150 MB.
5. `node_red`: Node-RED (npm package, installed into bench/.cache/node-red when missing),
   with its own free loopback port and temporary user dir, editor off: inject (once) →
   function `gen` (batches of GEN_BATCH messages per timer tick, at most NR_AHEAD in flight)
   → function `pass` → function `sink` → file (append line) → function `ack` (counts what
   was written, for the in-flight bound). Measured the same way as 1 (after deployd's daemon
   has stopped); the ratios deployd / Node-RED are reported.

BENCH_SHORT=1 makes every phase shorter (~1.6 min in all instead of ~3.5).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    FlowBench,
    children_of,
    cmdline,
    cpu_seconds,
    flow_toml,
    free_port,
    loadavg,
    pct,
    wait_until,
)

HERE = Path(__file__).resolve().parent
SHORT = os.environ.get("BENCH_SHORT") == "1"
WARM_S = 1.5 if SHORT else 3.0
WINDOW_S = 2.0 if SHORT else 4.0
WINDOWS = 3
BACKPRESSURE_S = 10.0 if SHORT else 60.0
SAMPLE_S = 0.1
BATCH = 100
LATENCY_RATE = 1000
LOW_RATE = 100  # a rate today's code sustains: the latency of the path itself
BP_RATE = 5000
BP_SINK_SLEEP = 0.002  # seconds per message: a sink doing ~500 msg/s
RATE_BATCH_CAP = 50  # the most one rate-paced call emits
MAX_QUEUE = int(os.environ.get("BENCH_MAX_QUEUE", "1000"))
NODE_RED_PACKAGE = "node-red@4"
NODE_RED_DIR = HERE / ".cache" / "node-red"
GEN_BATCH = 200
NR_AHEAD = 5000
START_WAIT = 90.0  # bound for a start, a build, a first message (a loaded machine)

PY_DESC: dict[str, Any] = {
    "title": "Throughput",
    "runtime": "python",
    "triggers": {"emit": {"main": "./lib/emit.py", "title": "Emit"}},
    "actions": {
        "pass": {"main": "./lib/pass.py", "title": "Pass"},
        "sink": {
            "main": "./lib/sink.py",
            "title": "Sink",
            "fields": {"out": {"label": "Output file", "required": True}},
        },
    },
}
PY_EMIT = """\
import time

N = 0
START = None


def process(msg, cfg, snapshot, ctx):
    global N, START
    batch = int(cfg.get("batch", 1))
    rate = float(cfg.get("rate", 0))
    now = time.time()
    count = batch
    if rate > 0:
        if START is None:
            START = now
        count = max(0, min(batch, int((now - START) * rate) - N))
    out = []
    for _ in range(count):
        N += 1
        out.append({"n": N, "t": now})
    return out
"""
PY_PASS = """\
def process(msg, cfg):
    return msg["body"]
"""
PY_SINK = """\
import json
import time

FH = None
PENDING = 0
LAST = 0.0


def init(cfg):
    global FH
    FH = open(cfg["out"], "a", buffering=1 << 16)


def process(msg, cfg):
    global PENDING, LAST
    now = time.time()
    body = msg["body"]
    FH.write(json.dumps({"n": body.get("n"), "t_emit": body.get("t"), "t_recv": now}) + "\\n")
    PENDING += 1
    if PENDING >= 200 or now - LAST >= 0.05:
        FH.flush()
        PENDING = 0
        LAST = now
    pause = float(cfg.get("sleep", 0))
    if pause:
        time.sleep(pause)
"""

NODE_DESC: dict[str, Any] = {
    "title": "Throughput (Node)",
    "runtime": "node",
    "triggers": {"emit": {"main": "./lib/emit.js", "title": "Emit"}},
    "actions": {
        "pass": {"main": "./lib/pass.js", "title": "Pass"},
        "sink": {
            "main": "./lib/sink.js",
            "title": "Sink",
            "fields": {"out": {"label": "Output file", "required": True}},
        },
    },
}
NODE_EMIT = """\
let N = 0;
let START = null;
exports.process = async function (msg, cfg) {
  const batch = Number(cfg.batch || 1);
  const rate = Number(cfg.rate || 0);
  const now = Date.now() / 1000;
  let count = batch;
  if (rate > 0) {
    if (START === null) START = now;
    count = Math.max(0, Math.min(batch, Math.floor((now - START) * rate) - N));
  }
  for (let i = 0; i < count; i++) {
    N += 1;
    this.emit('data', { body: { n: N, t: now } });
  }
};
"""
NODE_PASS = """\
exports.process = async function (msg) {
  return { body: msg.body };
};
"""
NODE_SINK = """\
const fs = require('fs');
let fd = null;
let buf = [];
let last = 0;
exports.process = async function (msg, cfg) {
  const now = Date.now() / 1000;
  if (fd === null) fd = fs.openSync(cfg.out, 'a');
  buf.push(JSON.stringify({ n: msg.body.n, t_emit: msg.body.t, t_recv: now }) + '\\n');
  if (buf.length >= 200 || now - last >= 0.05) {
    fs.writeSync(fd, buf.join(''));
    buf = [];
    last = now;
  }
};
"""

NR_GEN = """\
let n = 0;
function tick() {
  const ahead = n - (flow.get('done') || 0);
  const k = Math.min(%(batch)d, %(ahead)d - ahead);
  const t = Date.now() / 1000;
  for (let i = 0; i < k; i++) {
    n += 1;
    node.send({ payload: { n: n, t: t } }, false);
  }
  setTimeout(tick, 0);
}
tick();
return null;
"""
NR_SINK = """\
const p = msg.payload;
msg.payload = JSON.stringify({ n: p.n, t_emit: p.t, t_recv: Date.now() / 1000 });
return msg;
"""
NR_ACK = """\
flow.set('done', (flow.get('done') || 0) + 1);
return null;
"""
NR_SETTINGS = """\
module.exports = {
    uiHost: "127.0.0.1",
    httpAdminRoot: false,
    credentialSecret: false,
    flowFilePretty: false,
    telemetry: { enabled: false, updateNotification: false },
    diagnostics: { enabled: false, ui: false },
    externalModules: { autoInstall: false, palette: { allowInstall: false } },
    logging: { console: { level: "warn", metrics: false, audit: false } },
};
"""


# -- measuring --------------------------------------------------------------------------------


class Lines:
    """Counts the complete lines of a growing file, reading only what is new."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.pos = 0
        self.count = 0

    def poll(self) -> int:
        try:
            with self.path.open("rb") as fh:
                fh.seek(self.pos)
                data = fh.read()
        except FileNotFoundError:
            return 0
        self.pos += len(data)
        self.count += data.count(b"\n")
        return self.count


def read_lines(path: Path) -> list[dict[str, Any]]:
    """Every complete JSON line of an out file (a partly flushed last line is left out)."""
    out = []
    with contextlib.suppress(FileNotFoundError), path.open("rb") as fh:
        for raw in fh:
            if raw.endswith(b"\n"):
                out.append(json.loads(raw))
    return out


def proc_status_kb(pid: int, key: str) -> int:
    """A kB figure of /proc/PID/status (VmRSS, VmHWM), 0 when the process is gone."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def parent_of(pid: int) -> int:
    with contextlib.suppress(OSError):
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    return 0


class CpuMeter:
    """CPU time of named processes between `start()` and `stop()`, as % of one core."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.before: dict[str, float] = {}
        self.began = 0.0

    def _read(self) -> dict[str, float]:
        out = {}
        for name, pid in self.pids.items():
            with contextlib.suppress(OSError):
                out[name] = cpu_seconds(pid)
        return out

    def start(self) -> None:
        self.before = self._read()
        self.began = time.monotonic()

    def stop(self) -> dict[str, float]:
        after = self._read()
        span = time.monotonic() - self.began
        return {
            name: round((after[name] - self.before[name]) / span * 100, 1)
            for name in after
            if name in self.before
        }


def window_figures(
    lines: list[dict[str, Any]], windows: list[tuple[float, float]]
) -> dict[str, Any]:
    """msg/s of each window (lines by t_recv), the median, and latencies in the windows."""
    rates, lat = [], []
    for a, b in windows:
        inside = [r for r in lines if a <= r["t_recv"] < b]
        rates.append(len(inside) / (b - a))
        lat += [(r["t_recv"] - r["t_emit"]) * 1000 for r in inside]
    ns = [r["n"] for r in lines]
    expected = list(range(1, len(ns) + 1))
    return {
        "msgs_per_s": round(statistics.median(rates)),
        "windows_msgs_per_s": [round(r) for r in rates],
        "latency_ms": {
            "p50": round(statistics.median(lat), 2) if lat else None,
            "p99": round(pct(lat, 0.99), 2) if lat else None,
            "max": round(max(lat), 2) if lat else None,
        },
        "messages": len(ns),
        "contiguous_in_order": ns == expected,
    }


def measure_windows(
    out: Path, meter: CpuMeter | None = None, queued: Callable[[], int] | None = None
) -> tuple[list[tuple[float, float]], dict[str, float], list[int]]:
    """Wait for the first line, let the flow run WARM_S s, then WINDOWS windows: their
    bounds, the CPU % over them, and `queued()` (messages in the queues) at each bound."""
    counter = Lines(out)
    wait_until(counter.poll, timeout=START_WAIT, interval=0.05)
    time.sleep(WARM_S)  # the measurement itself: the flow runs at its own pace meanwhile
    if meter is not None:
        meter.start()
    windows: list[tuple[float, float]] = []
    depths: list[int] = []
    for _ in range(WINDOWS):
        if queued is not None and not depths:
            depths.append(queued())
        a = time.time()
        time.sleep(WINDOW_S)
        windows.append((a, time.time()))
        if queued is not None:
            depths.append(queued())
    cpu = meter.stop() if meter is not None else {}
    return windows, cpu, depths


# -- deployd ----------------------------------------------------------------------------------


COMPONENTS: dict[str, dict[str, Any]] = {
    "tput": {
        "component.json": PY_DESC,
        "lib/emit.py": PY_EMIT,
        "lib/pass.py": PY_PASS,
        "lib/sink.py": PY_SINK,
    },
    "tputnode": {
        "component.json": NODE_DESC,
        "lib/emit.js": NODE_EMIT,
        "lib/pass.js": NODE_PASS,
        "lib/sink.js": NODE_SINK,
    },
}


class ThroughputBench(FlowBench):
    """A daemon hosting `tput` (Python) and/or `tputnode` (Node)."""

    def __init__(self, root: Path, components: tuple[str, ...] = ("tput", "tputnode")) -> None:
        super().__init__(root, [{"name": name} for name in components])
        self.components = components
        self.max_queue_ok: bool | None = None  # does the flow format take `max_queue`?

    def start(self) -> None:
        for name in self.components:
            self.work(name, COMPONENTS[name])
        self.daemon.start()
        for name in self.components:
            _, sha = self.push(name)
            self.daemon.wait_recent(name, sha, timeout=START_WAIT)

    def run_flow(
        self,
        name: str,
        component: str,
        emit: dict[str, Any],
        sink: dict[str, Any] | None = None,
        max_queue: int | None = None,
    ) -> Path:
        """Apply trigger → pass → sink; the sink's out file. `max_queue` on the actions when
        given and the flow format takes it (else applied without, `max_queue_ok` False)."""
        out = self.root / f"{name}.jsonl"
        steps: list[dict[str, Any]] = [
            {"id": "emit", "component": component, "function": "emit", **emit},
            {"id": "pass", "component": component, "function": "pass"},
            {
                "id": "sink",
                "component": component,
                "function": "sink",
                "config": {"out": str(out), **(sink or {})},
            },
        ]
        path = self.root / f"{name}.toml"
        if max_queue and self.max_queue_ok is not False:
            for step in steps[1:]:
                step["max_queue"] = max_queue
            path.write_text(flow_toml(name, steps))
            proc = self.daemon.cli("flow", "apply", str(path), check=False)
            if proc.returncode == 0:
                self.max_queue_ok = True
                return out
            if "unknown key" not in proc.stdout + proc.stderr:
                raise AssertionError(f"flow apply failed: {proc.stdout}{proc.stderr}")
            self.max_queue_ok = False
            for step in steps[1:]:
                del step["max_queue"]
        path.write_text(flow_toml(name, steps))
        self.daemon.cli("flow", "apply", str(path))
        return out

    def stop_flow(self, name: str) -> None:
        self.daemon.cli("flow", "stop", name)

    def queued(self, flow: str) -> int:
        return int(self.rows("SELECT COUNT(*) AS c FROM messages WHERE flow = ?", flow)[0]["c"])

    def pids(self, name: str) -> dict[str, int]:
        """The daemon, its fork server and every step process of flow `name`, by name."""
        assert self.daemon.proc is not None
        daemon = self.daemon.proc.pid
        out = {"daemon": daemon}
        for child in children_of(daemon):  # its forked step processes share its cmdline
            if "forkserver" in cmdline(child) and parent_of(child) == daemon:
                out["forkserver"] = child
        show = json.loads(self.daemon.cli("flow", "show", name, "--json").stdout)
        for step in show["steps"]:
            if step.get("pid"):
                out[f"step:{step['id']}"] = int(step["pid"])
        return out

    def throughput(
        self, name: str, component: str, emit: dict[str, Any], extra: dict[str, Any]
    ) -> dict[str, Any]:
        out = self.run_flow(name, component, emit)
        wait_until(Lines(out).poll, timeout=START_WAIT, interval=0.05)
        meter = CpuMeter(self.pids(name))
        windows, cpu, queued = measure_windows(out, meter, lambda: self.queued(name))
        self.stop_flow(name)
        result = window_figures(read_lines(out), windows)
        # Messages that entered the flow in a window: those the sink took, plus the growth
        # of the queues (a trigger that outruns its actions fills them).
        ingest = [
            rate + (queued[i + 1] - queued[i]) / (b - a)
            for i, (rate, (a, b)) in enumerate(
                zip(result["windows_msgs_per_s"], windows, strict=True)
            )
        ]
        result["ingest_msgs_per_s"] = round(statistics.median(ingest))
        result["queued_at_end"] = queued[-1]
        result["cpu_percent"] = cpu
        result.update(extra)
        return result

    def backpressure(self) -> dict[str, Any]:
        name = "backpressure"
        emit = {"interval": "1ms", "config": {"batch": RATE_BATCH_CAP, "rate": BP_RATE}}
        out = self.run_flow(name, "tput", emit, {"sleep": BP_SINK_SLEEP}, MAX_QUEUE or None)
        counter = Lines(out)
        wait_until(counter.poll, timeout=START_WAIT, interval=0.05)
        assert self.daemon.proc is not None
        pid = self.daemon.proc.pid
        began = time.monotonic()
        t_began = time.time()
        depth: dict[str, int] = {}
        last: dict[str, int] = {}
        rss_max = 0
        samples = 0
        while time.monotonic() - began < BACKPRESSURE_S:
            tick = time.monotonic()
            rows = self.rows(
                "SELECT step, COUNT(*) AS c FROM messages WHERE flow = ? GROUP BY step", name
            )
            last = {r["step"]: int(r["c"]) for r in rows}
            for step, c in last.items():
                depth[step] = max(depth.get(step, 0), c)
            rss_max = max(rss_max, proc_status_kb(pid, "VmRSS"))
            samples += 1
            time.sleep(max(0.0, SAMPLE_S - (time.monotonic() - tick)))
        t_end = time.time()
        hwm = proc_status_kb(pid, "VmHWM")
        self.stop_flow(name)
        lines = read_lines(out)
        half = (t_began + t_end) / 2
        sunk_late = [r for r in lines if half <= r["t_recv"] < t_end]
        emitted = (lines[-1]["n"] if lines else 0) + sum(last.values())
        bound = (MAX_QUEUE + RATE_BATCH_CAP) if MAX_QUEUE else None
        return {
            "seconds": BACKPRESSURE_S,
            "offered_msgs_per_s": BP_RATE,
            "sink_sleep_ms": BP_SINK_SLEEP * 1000,
            "emitted_msgs_per_s": round(emitted / (t_end - t_began)),
            "sink_msgs_per_s": round(len(sunk_late) / max(0.001, t_end - half)),
            "max_queue_depth": depth,
            "queue_depth_at_end": last,
            "samples": samples,
            "daemon_rss_mb_max_sampled": round(rss_max / 1024, 1),
            "daemon_rss_mb_peak": round(hwm / 1024, 1),
            "max_queue": MAX_QUEUE or None,
            "max_queue_in_flow": bool(self.max_queue_ok),
            "depth_bound": bound,
            "depth_within_bound": (
                all(d <= bound for d in depth.values()) if bound is not None else None
            ),
            "target": "depth <= max_queue + one call's output; daemon RSS <= 150 MB",
        }


Phase = tuple[str, str, dict[str, Any], dict[str, Any]]  # figure, flow, trigger keys, extra


def deployd_figures(root: Path) -> dict[str, Any]:
    """Every deployd phase; the daemons' peak RSS. A flow that floods its queues leaves them
    full in the state database, which would weigh on a later phase: each such phase is the
    last one on its daemon."""
    flat = {"interval": "0s", "config": {"batch": BATCH}}
    one = {"interval": "0s", "config": {"batch": 1}}

    def paced(rate: int) -> dict[str, Any]:
        return {"interval": "1ms", "config": {"batch": RATE_BATCH_CAP, "rate": rate}}

    def how(rate: int) -> dict[str, Any]:
        return {
            "offered_msgs_per_s": rate,
            "how": f'interval "1ms", rate {rate}, batch cap {RATE_BATCH_CAP}',
        }

    daemons: list[tuple[str, list[Phase]]] = [
        (
            "tput",
            [
                ("python_batch_1", "pyone", one, {"batch": 1}),
                ("latency_low_rate", "latencylow", paced(LOW_RATE), how(LOW_RATE)),
                ("latency", "latency", paced(LATENCY_RATE), how(LATENCY_RATE)),
            ],
        ),
        ("tput", [("python", "pybatch", flat, {"batch": BATCH})]),
        (
            "tputnode",
            [
                ("node_batch_1", "nodeone", one, {"batch": 1}),
                ("node", "nodebatch", flat, {"batch": BATCH}),
            ],
        ),
    ]
    figures: dict[str, Any] = {}
    peaks: list[float] = []
    for i, (component, phases) in enumerate(daemons):
        b = ThroughputBench(root / f"d{i}", (component,))
        try:
            b.start()
            for key, flow, emit, extra in phases:
                figures[key] = b.throughput(flow, component, emit, extra)
            assert b.daemon.proc is not None
            peaks.append(proc_status_kb(b.daemon.proc.pid, "VmHWM") / 1024)
        finally:
            b.close()
    b = ThroughputBench(root / "backpressure", ("tput",))
    try:
        b.start()
        figures["backpressure"] = b.backpressure()
    finally:
        b.close()
    figures["daemon_rss_mb_peak"] = round(max(peaks), 1)
    return figures


# -- Node-RED ---------------------------------------------------------------------------------


def node_red_install() -> tuple[Path, str]:
    """red.js of Node-RED under bench/.cache/node-red (npm install when missing); version."""
    red = NODE_RED_DIR / "node_modules" / "node-red" / "red.js"
    if not red.exists():
        if shutil.which("npm") is None:
            raise RuntimeError("npm is not installed")
        NODE_RED_DIR.mkdir(parents=True, exist_ok=True)
        npm = ["npm", "install", "--prefix", str(NODE_RED_DIR), "--no-audit", "--no-fund"]
        subprocess.run(
            [*npm, NODE_RED_PACKAGE],
            check=True,
            capture_output=True,
            timeout=300,
        )
    pkg = json.loads((red.parent / "package.json").read_text())
    return red, str(pkg["version"])


def node_red_flow(out: Path) -> list[dict[str, Any]]:
    # Nodes need x and y: without them Node-RED takes them for config nodes.
    def fn(name: str, code: str, wires: list[str], x: int) -> dict[str, Any]:
        return {
            "id": f"n-{name}",
            "type": "function",
            "z": "bench",
            "name": name,
            "func": code,
            "outputs": 1,
            "x": x,
            "y": 100,
            "wires": [wires],
        }

    return [
        {"id": "bench", "type": "tab", "label": "bench"},
        {
            "id": "n-inject",
            "type": "inject",
            "x": 100,
            "y": 100,
            "z": "bench",
            "props": [{"p": "payload"}],
            "repeat": "",
            "once": True,
            "onceDelay": 0.1,
            "payload": "",
            "payloadType": "date",
            "wires": [["n-gen"]],
        },
        fn("gen", NR_GEN % {"batch": GEN_BATCH, "ahead": NR_AHEAD}, ["n-pass"], 200),
        fn("pass", "return msg;", ["n-sink"], 300),
        fn("sink", NR_SINK, ["n-file"], 400),
        {
            "id": "n-file",
            "type": "file",
            "x": 500,
            "y": 100,
            "z": "bench",
            "filename": str(out),
            "filenameType": "str",
            "appendNewline": True,
            "createDir": False,
            "overwriteFile": "false",
            "encoding": "none",
            "wires": [["n-ack"]],
        },
        fn("ack", NR_ACK, [], 600),
    ]


def node_red_figures(root: Path) -> dict[str, Any]:
    red, version = node_red_install()
    user = root / "node-red-user"
    user.mkdir(parents=True)
    out = root / "node-red.jsonl"
    flow = user / "flows.json"
    flow.write_text(json.dumps(node_red_flow(out)))
    settings = user / "settings.js"
    settings.write_text(NR_SETTINGS)
    port = free_port()
    node = shutil.which("node") or "node"
    logf = (root / "node-red.log").open("ab")
    proc = subprocess.Popen(
        [node, str(red), "-u", str(user), "-p", str(port), "-s", str(settings), str(flow)],
        stdout=logf,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    logf.close()
    try:
        meter = CpuMeter({"node_red": proc.pid})
        try:
            windows, cpu, _ = measure_windows(out, meter)
        except AssertionError as exc:
            log = (root / "node-red.log").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"Node-RED wrote nothing: {exc}; log: {log}") from None
        rss = proc_status_kb(proc.pid, "VmHWM")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
    result = window_figures(read_lines(out), windows)
    result["cpu_percent"] = cpu
    result["rss_mb_peak"] = round(rss / 1024, 1)
    result["version"] = version
    result["in_flight_max"] = NR_AHEAD
    return result


# -- the module -------------------------------------------------------------------------------


def run() -> dict[str, Any]:
    os.environ.setdefault("GIT_CONFIG_NOSYSTEM", "1")
    result: dict[str, Any] = {
        "cpus": os.cpu_count(),
        "loadavg_at_start": loadavg(),
        "short": SHORT,
        "warm_s": WARM_S,
        "window_s": WINDOW_S,
        "windows": WINDOWS,
    }
    with tempfile.TemporaryDirectory(prefix="deployd-bench-throughput-") as tmp:
        root = Path(tmp)
        d = deployd_figures(root / "deployd")
        result["python_msgs_per_s"] = d["python"]["msgs_per_s"]
        result["python_batch_1_msgs_per_s"] = d["python_batch_1"]["msgs_per_s"]
        result["node_msgs_per_s"] = d["node"]["msgs_per_s"]
        result["node_batch_1_msgs_per_s"] = d["node_batch_1"]["msgs_per_s"]
        result["latency_ms"] = {
            "p50": d["latency"]["latency_ms"]["p50"],
            "p99": d["latency"]["latency_ms"]["p99"],
            "achieved_msgs_per_s": d["latency"]["msgs_per_s"],
            "how": d["latency"]["how"],
        }
        low = d["latency_low_rate"]
        result[f"latency_ms_at_{LOW_RATE}_msgs_per_s"] = {
            "p50": low["latency_ms"]["p50"],
            "p99": low["latency_ms"]["p99"],
            "achieved_msgs_per_s": low["msgs_per_s"],
        }
        result["backpressure"] = d["backpressure"]
        result["detail"] = {
            k: d[k]
            for k in (
                "python",
                "python_batch_1",
                "node",
                "node_batch_1",
                "latency",
                "latency_low_rate",
            )
        }
        result["daemon_rss_mb_peak"] = d["daemon_rss_mb_peak"]
        try:
            nr = node_red_figures(root)
        except Exception as exc:  # no npm, no registry: deployd's figures still count
            result["node_red"] = {"error": f"{type(exc).__name__}: {exc}"}
        else:
            result["node_red"] = nr
            rate = max(nr["msgs_per_s"], 1)
            result["deployd_python_to_node_red"] = round(result["python_msgs_per_s"] / rate, 3)
            result["deployd_node_to_node_red"] = round(result["node_msgs_per_s"] / rate, 3)
    result["loadavg_at_end"] = loadavg()
    result["target"] = (
        "python >= 10000 msg/s, node >= 5000 msg/s, latency p50 <= 2 ms and p99 <= 10 ms "
        "at 1000 msg/s, backpressure depth <= max_queue + one call, daemon RSS <= 150 MB"
    )
    return result


if __name__ == "__main__":
    print(json.dumps(run(), indent=2))
