"""Profile the daemon on bench_throughput's workload (not a bench module: run it by hand).

    .venv/bin/pip install py-spy
    .venv/bin/python bench/profile_throughput.py [--batch 1] [--duration 15] [--native]
        [--component tput|tputnode] [--out DIR]

Starts the same daemon and flow as bench_throughput (trigger → pass → sink, interval "0s",
`--batch` messages per call), lets it run WARM_S seconds, then records the daemon with
`py-spy record` (raw collapsed stacks, and a speedscope file) for `--duration` seconds while
/proc gives the CPU time of the daemon and of each step process. Prints one JSON object: the
messages per second at the sink and into the flow, CPU % by process, daemon CPU µs per
message, the share of the daemon's samples by part (sqlite, json, asyncio, socket, ...) with
its µs per message, and the top functions by self and by inclusive samples. The raw files
stay in `--out` (default: a folder under bench/out/).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_throughput as bt

TICK = os.sysconf("SC_CLK_TCK")

# A sample's part is that of the innermost frame matching one of these, in this order
# (file-name fragment or function name, part).
PARTS: list[tuple[str, str]] = [
    ("prometheus_client", "metrics"),
    ("logging/", "logging"),
    ("jsonata", "mapper (jsonata)"),
    ("json/encoder", "json encode"),
    ("json/decoder", "json decode"),
    ("json/__init__", "json (dumps/loads)"),
    ("uuid", "uuid4"),
    ("store/", "sqlite (store)"),
    ("sqlite3", "sqlite (store)"),
    ("protocol.py", "protocol encode/decode"),
    ("asyncio/streams", "asyncio streams (socket read/write)"),
    ("asyncio/selector_events", "asyncio selector (socket syscalls)"),
    ("selectors.py", "epoll wait"),
    ("asyncio/", "asyncio loop/tasks/futures"),
    ("runtime/embedded/router", "router (python)"),
    ("runtime/embedded/process", "process.py (python)"),
    ("runtime/embedded/runner", "runner (python)"),
]


def frames(stack: str) -> list[tuple[str, str]]:
    """(function, file:line) frames of one collapsed py-spy line, outermost first."""
    out = []
    for frame in stack.split(";"):
        func, _, where = frame.partition(" (")
        out.append((func.strip(), where.rstrip(")")))
    return out


def part_of(stack: list[tuple[str, str]]) -> str:
    for func, where in reversed(stack):
        for needle, part in PARTS:
            if needle in where or needle == func:
                return part
    return "other"


def loop_of(stack: list[tuple[str, str]]) -> str:
    """Which daemon task the sample ran in (the trigger loop, an action loop, ...)."""
    for func, where in stack:
        if func in ("_trigger_loop", "_action_loop", "_read"):
            return f"{func} ({Path(where.split(':')[0]).name})"
    return "elsewhere"


def analyse(raw: Path, cpu_us_per_msg: float) -> dict[str, Any]:
    """Shares of the event loop thread's samples (py-spy -t: each stack starts with
    "thread (TID): NAME"); the other threads' samples are only counted."""
    stacks: collections.Counter[str] = collections.Counter()
    threads: collections.Counter[str] = collections.Counter()
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        thread, _, stack = stack.partition(";")
        name = thread.partition(": ")[2]
        threads[name] += int(count)
        if stack and name == "MainThread":
            stacks[stack] += int(count)
    total = sum(stacks.values()) or 1
    parts: collections.Counter[str] = collections.Counter()
    loops: collections.Counter[str] = collections.Counter()
    self_: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    for stack, n in stacks.items():
        fr = frames(stack)
        parts[part_of(fr)] += n
        loops[loop_of(fr)] += n
        self_[f"{fr[-1][0]} ({fr[-1][1]})"] += n
        seen = set()
        for func, where in fr:
            key = f"{func} ({where.rsplit(':', 1)[0]})"
            if key not in seen:
                seen.add(key)
                incl[key] += n

    def share(counter: collections.Counter[str], k: int) -> list[dict[str, Any]]:
        return [
            {
                "what": what,
                "percent": round(n / total * 100, 1),
                "us_per_msg": round(n / total * cpu_us_per_msg, 1),
            }
            for what, n in counter.most_common(k)
        ]

    return {
        "samples_by_thread": dict(threads.most_common()),
        "samples": total,
        "parts": share(parts, 30),
        "tasks": share(loops, 10),
        "top_self": share(self_, 25),
        "top_inclusive": share(incl, 40),
    }


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds of each thread of `pid`, by "name/tid"."""
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            name = (task / "comm").read_text().strip()
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[f"{name}/{task.name}"] = (int(fields[11]) + int(fields[12])) / TICK
    return out


def sched(pid: int) -> tuple[float, float, int, int]:
    """(seconds on a CPU, seconds runnable but waiting for one, voluntary and involuntary
    context switches) of the main thread of `pid` so far."""
    run, wait, _ = (int(x) for x in Path(f"/proc/{pid}/schedstat").read_text().split())
    status = Path(f"/proc/{pid}/status").read_text().splitlines()
    ctx = {k: int(v) for k, _, v in (ln.partition(":\t") for ln in status) if "ctxt" in k}
    return run / 1e9, wait / 1e9, ctx["voluntary_ctxt_switches"], ctx["nonvoluntary_ctxt_switches"]


def perf_record(pid: int, seconds: int, out_dir: Path) -> dict[str, Any]:
    """`perf record` of the daemon (on-CPU samples, native frames): shares by library and
    the top symbols, as text files in `out_dir`, and the library shares."""
    data = out_dir / "perf.data"
    record = ["perf", "record", "-e", "cpu-clock", "-F", "999", "-g", "-p", str(pid)]
    subprocess.run(
        [*record, "-o", str(data), "--", "sleep", str(seconds)],
        check=True,
        capture_output=True,
    )
    shares: dict[str, float] = {}
    for sort, name in (("dso", "perf-dso.txt"), ("dso,sym", "perf-sym.txt")):
        cmd = ["perf", "report", "-i", str(data), "--stdio", "--no-children", "-g", "none"]
        report = subprocess.run(
            [*cmd, "--sort", sort, "--percent-limit", "0.3"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        (out_dir / name).write_text(report)
        if sort == "dso":
            for line in report.splitlines():
                parts = line.split()
                if len(parts) >= 2 and parts[0].endswith("%") and not line.startswith("#"):
                    shares[" ".join(parts[1:])] = float(parts[0].rstrip("%"))
    return shares


MICRO_ECHO = """\
import socket, sys
s = socket.socket(fileno=int(sys.argv[1]))
f = s.makefile("rb")
for line in f:
    s.sendall(b'{"t":"data","body":{"n":1,"t":1.5},"headers":{}}\\n{"t":"done","ref":1}\\n')
"""


def micro(n: int = 5000) -> dict[str, Any]:
    """µs of each part of today's message path, one at a time, in this process (no step
    processes competing for the cores): what a message costs the daemon at best."""
    import asyncio
    import socket
    import time as _time

    from deployd.metrics import Metrics
    from deployd.runtime.embedded.process import Result
    from deployd.runtime.embedded.router import Router
    from deployd.runtime.protocol import decode, encode
    from deployd.store import FlowStore, Store
    from deployd.types import RunStep, StepKind

    def per_op(fn: Any, count: int = n) -> float:
        t0 = _time.process_time()
        for _ in range(count):
            fn()
        return round((_time.process_time() - t0) / count * 1e6, 1)

    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="deployd-micro-") as tmp:
        store = Store.open(Path(tmp) / "deployd.db")
        fs = FlowStore(store)
        metrics = Metrics()
        router = Router(store, metrics)
        steps = tuple(
            RunStep(sid, kind, "c", 1, sid, tmp, "x.py")
            for sid, kind in (
                ("emit", StepKind.TRIGGER),
                ("pass", StepKind.ACTION),
                ("sink", StepKind.ACTION),
            )
        )
        body = {"n": 1, "t": 1700000000.123}
        for _ in range(n):
            fs.enqueue("f", "pass", body, {})
        rows = []

        def take() -> None:
            rows.append(fs.next_message("f", "pass"))

        out["next_message_select_decode"] = per_op(take)
        queue = iter(rows)

        def commit_action() -> None:
            res = Result(outputs=[(body, {})])
            router.commit("f", steps, 1, res, next(queue))

        out["router_commit_action_msg"] = per_op(commit_action)

        def commit_trigger_100() -> None:
            router.commit("f", steps, 0, Result(outputs=[(body, {})] * 100))

        out["router_commit_trigger_call_100_msgs"] = per_op(commit_trigger_100, 200)

        def empty_tx() -> None:
            with store.tx():
                pass

        out["empty_transaction"] = per_op(empty_tx)
        out["enqueue_one_in_open_tx"] = 0.0
        with store.tx():
            out["enqueue_one_in_open_tx"] = per_op(lambda: fs.enqueue("g", "x", body, {}))
        import json as _json
        import uuid

        from deployd.store import utcnow

        out["uuid4_hex"] = per_op(lambda: uuid.uuid4().hex)
        out["utcnow_iso"] = per_op(utcnow)
        out["json_dumps_body"] = per_op(lambda: _json.dumps(body))
        conn = store.conn
        ins = (
            "INSERT INTO messages (flow, step, msg_id, body, headers, created_at)"
            " VALUES (?, ?, ?, ?, ?, ?)"
        )
        params = ("h", "x", "a" * 32, '{"n": 1}', "{}", "2026-01-01T00:00:00.000+00:00")
        with store.tx():
            out["sql_insert_message_constant_params"] = per_op(lambda: conn.execute(ins, params))
        ids = [r[0] for r in conn.execute("SELECT id FROM messages WHERE flow = 'h'")]
        it = iter(ids)
        with store.tx():
            out["sql_delete_message"] = per_op(
                lambda: conn.execute("DELETE FROM messages WHERE id = ?", (next(it),))
            )
        with store.tx():
            out["sql_count_upsert"] = per_op(lambda: fs.count("f", "pass", processed=1))
        out["metrics_message_processed"] = per_op(lambda: metrics.message_processed("f", "pass"))
        req = {"t": "msg", "msg": {"id": "a" * 32, "body": body, "headers": {}}, "snapshot": {}}
        out["protocol_encode_msg_request"] = per_op(lambda: encode({**req, "ref": 7}))
        data = encode({"t": "data", "body": body, "headers": {}})
        done = encode({"t": "done", "ref": 7})
        out["protocol_decode_reply_2_lines"] = per_op(lambda: (decode(data), decode(done)))

        # One request/reply over a Unix socket with asyncio streams, as StepProcess does it
        # (the peer is a trivial echo process): the daemon's CPU per round trip, and wall.
        parent, child = socket.socketpair()
        echo = subprocess.Popen(
            [sys.executable, "-c", MICRO_ECHO, str(child.fileno())], pass_fds=[child.fileno()]
        )
        child.close()

        async def trips(count: int) -> tuple[float, float]:
            reader, writer = await asyncio.open_unix_connection(sock=parent)
            t0, c0 = _time.perf_counter(), _time.process_time()
            for i in range(count):
                writer.write(encode({**req, "ref": i}))
                await writer.drain()
                decode(await reader.readline())
                decode(await reader.readline())
            wall = (_time.perf_counter() - t0) / count * 1e6
            cpu = (_time.process_time() - c0) / count * 1e6
            writer.close()
            return round(cpu, 1), round(wall, 1)

        try:
            cpu, wall = asyncio.run(trips(n))
        finally:
            echo.kill()
            echo.wait()
        out["asyncio_round_trip_cpu"] = cpu
        out["asyncio_round_trip_wall"] = wall
        store.close()
    out["unit"] = "µs of this process's CPU per operation (round trip: also wall)"
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--duration", type=int, default=15)
    ap.add_argument("--rate", type=int, default=100, help="py-spy samples per second")
    ap.add_argument("--native", action="store_true", help="py-spy --native (C frames)")
    ap.add_argument("--component", default="tput", choices=("tput", "tputnode"))
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--perf", action="store_true", help="also `perf record` the daemon")
    ap.add_argument("--gil", action="store_true", help="py-spy --gil: only samples holding it")
    ap.add_argument("--micro", action="store_true", help="only the per-operation costs")
    args = ap.parse_args()
    if args.micro:
        print(json.dumps(micro(), indent=2))
        return 0
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    out_dir = args.out or bt.HERE / "out" / f"profile-{args.component}-b{args.batch}"
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="deployd-profile-") as tmp:
        b = bt.ThroughputBench(Path(tmp), (args.component,))
        try:
            b.start()
            assert b.daemon.proc is not None
            pid = b.daemon.proc.pid
            name = "prof"
            emit = {"interval": "0s", "config": {"batch": args.batch}}
            sink_out = b.run_flow(name, args.component, emit)
            bt.wait_until(bt.Lines(sink_out).poll, timeout=bt.START_WAIT, interval=0.05)
            time.sleep(bt.WARM_S)
            meter = bt.CpuMeter(b.pids(name))
            q0 = b.queued(name)
            raw = out_dir / "daemon.raw.txt"
            cmd = [spy, "record", "-t", "-p", str(pid), "-d", str(args.duration)]
            cmd += ["-r", str(args.rate)]
            cmd += ["--native"] if args.native else []
            cmd += ["--gil"] if args.gil else []
            meter.start()
            threads0 = thread_cpu(pid)
            sched0 = {k: sched(p) for k, p in meter.pids.items()}
            t0 = time.time()
            subprocess.run([*cmd, "-f", "raw", "-o", str(raw)], check=True, capture_output=True)
            t1 = time.time()
            cpu = meter.stop()
            threads1 = thread_cpu(pid)
            sched1 = {k: sched(p) for k, p in meter.pids.items()}
            q1 = b.queued(name)
            perf = perf_record(pid, args.duration, out_dir) if args.perf else None
            b.stop_flow(name)
            lines = bt.read_lines(sink_out)
        finally:
            b.close()
    sunk = len([r for r in lines if t0 <= r["t_recv"] < t1])
    rate = sunk / (t1 - t0)
    ingest = rate + (q1 - q0) / (t1 - t0)
    lat = [(r["t_recv"] - r["t_emit"]) * 1000 for r in lines if t0 <= r["t_recv"] < t1]
    # One message through the flow = one share of a trigger call + a pass and a sink message.
    us_per_msg = cpu["daemon"] / 100 / max(rate, 1) * 1e6
    span = t1 - t0
    by_thread = {
        k: round((threads1[k] - threads0[k]) / span * 100, 1)
        for k in threads1
        if k in threads0 and threads1[k] > threads0[k]
    }
    scheduling = {
        k: {
            "on_cpu_percent": round((sched1[k][0] - sched0[k][0]) / span * 100, 1),
            "runqueue_wait_percent": round((sched1[k][1] - sched0[k][1]) / span * 100, 1),
            "voluntary_switches_per_s": round((sched1[k][2] - sched0[k][2]) / span),
            "involuntary_switches_per_s": round((sched1[k][3] - sched0[k][3]) / span),
        }
        for k in sched1
        if k in sched0
    }
    main = next((k for k in threads1 if k.endswith(f"/{pid}")), "")
    main_cpu = (threads1.get(main, 0) - threads0.get(main, 0)) / span
    main_us = main_cpu / max(rate, 1) * 1e6
    result = {
        "component": args.component,
        "batch": args.batch,
        "seconds": round(t1 - t0, 1),
        "sink_msgs_per_s": round(rate),
        "ingest_msgs_per_s": round(ingest),
        "latency_ms_p50": round(statistics.median(lat), 2) if lat else None,
        "cpu_percent": cpu,
        "daemon_cpu_us_per_sink_msg": round(us_per_msg, 1),
        "daemon_threads_cpu_percent": by_thread,
        "main_threads_scheduling": scheduling,
        "py_spy_gil_only": args.gil,
        "main_thread_cpu_us_per_sink_msg": round(main_us, 1),
        "raw": str(raw),
        "perf_dso_percent": perf,
        **analyse(raw, main_us),
    }
    text = json.dumps(result, indent=2)
    (out_dir / "summary.json").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
