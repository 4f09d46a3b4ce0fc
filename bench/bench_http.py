"""Issue 14 figures: HTTP intake into a real-time flow (`builtin = "http"`, async replies).

A real `deployd serve` on loopback, the flow `in` (builtin http, auth hmac, reply async) →
`rec` (a Python action appending each message's id to a file), and adnanh/webhook (Debian
package `webhook`, installed with apt-get when missing, as `bench_compare` does) answering
the same requests — same ~200-byte JSON order event, same `X-Deployd-Signature: sha256=<HMAC>`
checked by its `payload-hmac-sha256` rule — by running a command per hook (`/bin/true`).
The load comes from a second process (bench_webhook's minimal asyncio HTTP/1.1 client) over
16 keep-alive connections.

1. Throughput and latency at concurrency 16: REPS runs of REQUESTS requests each, the two
   servers alternating (who goes first alternates too); medians. Target: >= 2,000 req/s with
   p99 <= 50 ms. Each run ends when its server's work is done: deployd's sink has every
   message, webhook's commands (which it runs after answering) have all exited — else one
   server's leftover work is the other's next run's load, and its CPU is not counted.
2. 0 lost across 10 redeploys under that load: LOAD_REQUESTS requests at concurrency 16
   while 10 pushes of a new component version each redeploy the flow; every id answered 202
   must be in the sink exactly once.

Run standalone with ``python bench/bench_http.py`` (prints JSON) or through bench/run.py.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import bench_compare
import bench_webhook
from common import (
    FlowBench,
    children_of,
    cpu_seconds,
    free_port,
    loadavg,
    read_jsonl,
    wait_until,
)

# after `common`, which puts the repository root on sys.path
http_fed = importlib.import_module("tests.flows.http_fed")
SECRET, SECRET_VAR, sign = http_fed.SECRET, http_fed.SECRET_VAR, http_fed.sign
http_flow, record, web_files = http_fed.http_flow, http_fed.record, http_fed.web_files

CONCURRENCY = 16
WARMUP = 500
REQUESTS = 5000
REPS = 3
LOAD_REQUESTS = 20000
REDEPLOYS = 10


def _requests(port: int, path: str, n: int, start: int = 0) -> list[bytes]:
    """Pre-built signed POSTs of a small order event, each with its own body."""
    out = []
    for i in range(start, start + n):
        body = json.dumps(
            {
                "event": "order.created",
                "order": {"id": i, "customer": f"c-{i % 97}", "total": 12.5, "items": 3},
                "at": "2026-12-01T23:59:59Z",
            }
        ).encode()
        head = (
            f"POST {path} HTTP/1.1\r\n"
            f"Host: 127.0.0.1:{port}\r\n"
            "User-Agent: shop/1.0\r\n"
            "Content-Type: application/json\r\n"
            f"X-Deployd-Signature: {sign(body)}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        )
        out.append(head.encode() + body)
    return out


def _start_webhook(binary: str, root: Path, port: int) -> subprocess.Popen[bytes]:
    hooks = [
        {
            "id": "orders",
            "execute-command": "/bin/true",
            "command-working-directory": str(root),
            "response-message": "queued",
            "trigger-rule-mismatch-http-response-code": 401,
            "trigger-rule": {
                "match": {
                    "type": "payload-hmac-sha256",
                    "secret": SECRET,
                    "parameter": {"source": "header", "name": "X-Deployd-Signature"},
                }
            },
        }
    ]
    (root / "hooks.json").write_text(json.dumps(hooks))
    log = (root / "webhook.log").open("wb")
    proc = subprocess.Popen(
        [binary, "-hooks", str(root / "hooks.json"), "-ip", "127.0.0.1", "-port", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    log.close()
    return proc


_TICK = os.sysconf("SC_CLK_TCK")


def _tree_cpu(pid: int) -> float:
    """CPU seconds of `pid`, its children that were waited for, and its live children: on a
    shared machine, what a server really spent (wall time mostly measures the wait for a core)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    own = sum(int(fields[i]) for i in (11, 12, 13, 14)) / _TICK
    return own + sum(_safe_cpu(c) for c in children_of(pid))


def _settled(pid: int, window: float = 0.5, idle: float = 0.01, timeout: float = 300) -> None:
    """Wait until the process tree of `pid` is idle: less than `idle` CPU seconds in a
    `window` — a server that answers before it has done the work (webhook runs its command
    after the answer, one process per request, too short-lived to see in /proc) is still at
    it. Raises TimeoutError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last = _tree_cpu(pid)
    while time.monotonic() < deadline:
        time.sleep(window)  # sampling CPU over a window (a bench, not a test wait)
        now = _tree_cpu(pid)
        if now - last < idle:
            return
        last = now
    raise TimeoutError(f"pid {pid} still busy after {timeout:g}s")


def _safe_cpu(pid: int) -> float:
    try:
        return cpu_seconds(pid)
    except OSError:
        return 0.0


def _figures(m: dict[str, Any], cpu: float) -> dict[str, Any]:
    lat = m["latencies_ms"]
    return {
        "cpu_ms_per_request": cpu * 1000 / max(1, m["requests"]),
        "req_per_s": m["requests"] / m["seconds"],
        "p50_ms": bench_webhook._pct(lat, 0.5),
        "p99_ms": bench_webhook._pct(lat, 0.99),
        "statuses": m["statuses"],
    }


def _median(runs: list[dict[str, Any]]) -> dict[str, Any]:
    statuses: Counter[str] = Counter()
    for r in runs:
        statuses.update({str(k): v for k, v in r["statuses"].items()})
    return {
        "req_per_s": round(statistics.median(r["req_per_s"] for r in runs)),
        "p50_ms": round(statistics.median(r["p50_ms"] for r in runs), 2),
        "p99_ms": round(statistics.median(r["p99_ms"] for r in runs), 2),
        "runs_req_per_s": [round(r["req_per_s"]) for r in runs],
        "cpu_ms_per_request": round(statistics.median(r["cpu_ms_per_request"] for r in runs), 3),
        "statuses": dict(statuses),
    }


# -- 2: a load that keeps the answers (ids), in a second process --------------------------


async def _keep(port: int, queue: list[bytes], ids: list[str], codes: dict[int, int]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        while queue:
            writer.write(queue.pop())
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n")[1:]:
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            body = await reader.readexactly(length) if length else b""
            code = int(head.split(b" ", 2)[1])
            codes[code] = codes.get(code, 0) + 1
            if code == 202:
                ids.append(json.loads(body)["id"])
    finally:
        writer.close()


def _keep_main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    queue = list(reversed([bytes.fromhex(r) for r in spec["requests"]]))
    ids: list[str] = []
    codes: dict[int, int] = {}

    async def main() -> float:
        started = time.perf_counter()
        await asyncio.gather(
            *(_keep(spec["port"], queue, ids, codes) for _ in range(spec["concurrency"]))
        )
        return time.perf_counter() - started

    seconds = asyncio.run(main())
    Path(spec["out"]).write_text(json.dumps({"ids": ids, "codes": codes, "seconds": seconds}))


def _load_keeping_ids(port: int, requests: list[bytes], root: Path) -> dict[str, Any]:
    spec, out = root / "keep.json", root / "keep-out.json"
    spec.write_text(
        json.dumps(
            {
                "port": port,
                "concurrency": CONCURRENCY,
                "out": str(out),
                "requests": [r.hex() for r in requests],
            }
        )
    )
    subprocess.run([sys.executable, __file__, "--keep", str(spec)], check=True, timeout=900)
    return dict(json.loads(out.read_text()))


def under_redeploys(b: FlowBench, out: Path, root: Path) -> dict[str, Any]:
    port = b.daemon.port
    reqs = _requests(port, "/flows/orders/in", LOAD_REQUESTS, start=10**6)
    result: dict[str, Any] = {}
    before = b.active_version("orders") or 0
    baseline = len(read_jsonl(out))

    def redeploy() -> None:
        gaps = []
        for k in range(REDEPLOYS):
            tag = f"r{k + 1}"
            b.push("hello", web_files(tag) | {"lib/record.py": record(tag)})
            dep = b.wait_deploy("orders", before + k + 1, timeout=120)
            gaps.append(dep["gap_ms"])
        result["gaps_ms"] = gaps

    pusher = threading.Thread(target=redeploy)
    pusher.start()
    load = _load_keeping_ids(port, reqs, root)
    pusher.join(300)
    accepted = load["ids"]
    wait_until(lambda: len(read_jsonl(out)) >= baseline + len(accepted), timeout=300, interval=0.2)
    seen = Counter(r["id"] for r in read_jsonl(out))
    lost = [i for i in accepted if seen[i] == 0]
    twice = [i for i in accepted if seen[i] > 1]
    deployed = len(result.get("gaps_ms", []))
    return {
        "requests": LOAD_REQUESTS,
        "accepted": len(accepted),
        "statuses": load["codes"],
        "req_per_s": round(len(accepted) / load["seconds"]),
        "redeploys_done": deployed,
        "gap_ms_p50": round(statistics.median(g for g in result["gaps_ms"] if g is not None), 2)
        if result.get("gaps_ms")
        else None,
        "lost": len(lost),
        "duplicated": len(twice),
        "target": "0 lost across 10 redeploys",
    }


def run() -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="deployd-bench-http-") as tmp:
        root = Path(tmp)
        os.environ[SECRET_VAR] = SECRET
        result: dict[str, Any] = {"cpus": os.cpu_count(), "loadavg_at_start": loadavg()}
        b = FlowBench(root / "flows", [{"name": "hello"}])
        b.work("hello", web_files("v1"))
        b.daemon.start()
        peer = None
        try:
            b.push("hello", web_files("v1"))
            wait_until(lambda: b.daemon.recent_sha("hello"), timeout=60)
            out = root / "orders.jsonl"
            b.apply("orders", http_flow("orders", out))
            port = b.daemon.port
            bench_webhook.load(port, _requests(port, "/flows/orders/in", WARMUP), root, "warm", 16)

            binary, note = bench_compare._webhook_binary()
            wport = free_port()
            if binary is not None:
                version = subprocess.run(
                    [binary, "-version"], capture_output=True, text=True
                ).stdout.strip()
                peer = _start_webhook(binary, root, wport)
                wait_until(lambda: bench_compare._port_open(wport), timeout=20)
                wreq = _requests(wport, "/hooks/orders", WARMUP)
                bench_webhook.load(wport, wreq, root, "warm-w", CONCURRENCY)
            raw: dict[str, list[dict[str, Any]]] = {"deployd": [], "webhook": []}
            for rep in range(REPS):
                n0 = WARMUP + rep * REQUESTS
                assert b.daemon.proc is not None
                order = [("deployd", port, "/flows/orders/in", b.daemon.proc.pid)]
                if peer is not None:
                    order.append(("webhook", wport, "/hooks/orders", peer.pid))
                for who, p, path, pid in order if rep % 2 == 0 else order[::-1]:
                    reqs = _requests(p, path, REQUESTS, start=n0)
                    if who == "deployd":  # the sink of the last run has caught up
                        wait_until(lambda n=n0: len(read_jsonl(out)) >= n, timeout=300)
                    before = _tree_cpu(pid)
                    m = bench_webhook.load(p, reqs, root, f"{who}-{rep}", CONCURRENCY)
                    if who == "deployd":  # its step processes' share of this run, too
                        wait_until(lambda n=n0: len(read_jsonl(out)) >= n + REQUESTS, timeout=300)
                    else:
                        # webhook answers before its command ran (a goroutine runs it): the
                        # commands still to run are this run's work, not the next run's load
                        _settled(pid)
                    raw[who].append(_figures(m, _tree_cpu(pid) - before))
            intake: dict[str, Any] = {
                "concurrency": CONCURRENCY,
                "requests_per_run": REQUESTS,
                "runs": REPS,
                "deployd": _median(raw["deployd"]),
                "target": ">= 2000 req/s, p99 <= 50 ms (async replies, concurrency 16)",
            }
            if peer is not None:
                intake["webhook"] = _median(raw["webhook"]) | {"version": version, "install": note}
                ratios = [
                    d["req_per_s"] / w["req_per_s"]
                    for d, w in zip(raw["deployd"], raw["webhook"], strict=True)
                ]
                intake["ratio_req_per_s"] = round(statistics.median(ratios), 2)
            else:
                intake["webhook"] = {"skipped": f"adnanh/webhook unavailable: {note}"}
            result["intake"] = intake
            wait_until(
                lambda: len(read_jsonl(out)) >= WARMUP + REPS * REQUESTS, timeout=300, interval=0.2
            )
            result["sink_lines_after_intake"] = len(read_jsonl(out))
            result["redeploys"] = under_redeploys(b, out, root)
            result["loadavg_at_end"] = loadavg()
            return result
        finally:
            if peer is not None:
                peer.send_signal(signal.SIGTERM)
                try:
                    peer.wait(10)
                except subprocess.TimeoutExpired:
                    peer.kill()
            b.close()


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--keep":
        _keep_main(sys.argv[2])
    else:
        print(json.dumps(run(), indent=2))
