"""Issue 4 figures: signed GitHub-style pushes against POST /hooks/{component}.

A real `deployd serve` (loopback) with components whose repository is a bare file:// repo
holding a chain of real commits; a second process (this file with ``--load``) sends the
requests over 16 keep-alive connections with a minimal asyncio HTTP/1.1 client (so the
client costs little of the 2-core machine's CPU).

1. Throughput: 5,000 pushes (after 500 warm-up), each a realistic ~4 KB GitHub push payload
   with its own delivery id, HMAC-SHA256 signed, naming successive commits: every request
   takes the full 202 path (verify, parse, delivery-id insert, queue). Targets: ≥ 1,000
   req/s and p99 ≤ 50 ms at concurrency 16.
2. Burst: 1,000 pushes of 1,000 successive commits to one component as fast as they go,
   then the number of builds they caused once the pipeline is idle. Target: ≤ 2.

Run standalone with ``python bench/bench_webhook.py`` (prints JSON) or through bench/run.py.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

CONCURRENCY = 16
WARMUP = 500
REQUESTS = 5000
BURST = 1000
SECRET = "bench-webhook-secret"
GIT_ENV = {
    "GIT_AUTHOR_NAME": "Bench",
    "GIT_AUTHOR_EMAIL": "bench@example.com",
    "GIT_COMMITTER_NAME": "Bench",
    "GIT_COMMITTER_EMAIL": "bench@example.com",
    "GIT_CONFIG_NOSYSTEM": "1",
}
PAYLOAD = Path(__file__).resolve().parent.parent / "tests/sources/payloads/github_push.json"
DESCRIPTOR = {
    "title": "Bench",
    "triggers": {"ticker": {"main": "./lib/ticker.py", "title": "Ticker"}},
}


def _deployd() -> list[str]:
    script = Path(sys.executable).parent / "deployd"
    return [str(script)] if script.exists() else [sys.executable, "-m", "deployd"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _git(*args: str, cwd: Path, stdin: bytes | None = None) -> str:
    proc = subprocess.run(
        ["git", *args],
        cwd=cwd,
        env={**os.environ, **GIT_ENV},
        input=stdin,
        capture_output=True,
        check=True,
    )
    return proc.stdout.decode().strip()


def _pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    k = (len(ordered) - 1) * p
    lo = int(k)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def make_repo(root: Path, name: str, commits: int) -> tuple[Path, list[str]]:
    """A bare repository whose main branch is a chain of `commits` commits after the first."""
    bare = root / f"{name}.git"
    work = root / f"{name}-work"
    _git("init", "-q", "--bare", "-b", "main", str(bare), cwd=root)
    _git("init", "-q", "-b", "main", str(work), cwd=root)
    (work / "lib").mkdir()
    (work / "lib/ticker.py").write_text("def process(msg, cfg, snapshot, ctx):\n    return {}\n")
    (work / "component.json").write_text(json.dumps(DESCRIPTOR))
    _git("add", "-A", cwd=work)
    _git("commit", "-qm", "initial", cwd=work)
    first = _git("rev-parse", "HEAD", cwd=work)
    stream = []
    for i in range(commits):
        msg = f"change {i}".encode()
        stream.append(
            b"commit refs/heads/main\n"
            + f"mark :{i + 1}\n".encode()
            + f"committer Bench <bench@example.com> {1700000000 + i} +0000\n".encode()
            + f"data {len(msg)}\n".encode()
            + msg
            + b"\n"
            + (f"from {first}\n".encode() if i == 0 else b"")
        )
    _git("fast-import", "--quiet", cwd=work, stdin=b"".join(stream) + b"done\n")
    shas = _git("rev-list", "--reverse", f"{first}..main", cwd=work).split()
    # main stays at the first commit (what the daemon builds at start); the chain waits
    # under another ref until `advance` moves main, as the pushes would have.
    _git("push", "-q", str(bare), f"{first}:refs/heads/main", "main:refs/heads/chain", cwd=work)
    return bare, [first, *shas]


def advance(bare: Path, sha: str) -> None:
    """Move main of `bare` to `sha`: the pushes that the webhooks then announce."""
    _git("update-ref", "refs/heads/main", sha, cwd=bare)


def requests_for(shas: list[str], component: str, port: int) -> list[bytes]:
    """Pre-built HTTP/1.1 requests: a signed GitHub push per sha, each its own delivery."""
    template = PAYLOAD.read_text()
    out = []
    for sha in shas:
        body = (
            template.replace("__REF__", "refs/heads/main")
            .replace("__AFTER__", sha)
            .replace("__BEFORE__", "0" * 40)
            .replace("__CLONE_URL__", "https://github.com/acme/billing.git")
            .encode()
        )
        signature = hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
        head = (
            f"POST /hooks/{component} HTTP/1.1\r\n"
            f"Host: 127.0.0.1:{port}\r\n"
            "User-Agent: GitHub-Hookshot/5f0ac5e\r\n"
            "Content-Type: application/json\r\n"
            "X-GitHub-Event: push\r\n"
            f"X-GitHub-Delivery: {uuid.uuid4()}\r\n"
            f"X-Hub-Signature-256: sha256={signature}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        )
        out.append(head.encode() + body)
    return out


# -- the load generator (runs in its own process) --------------------------------------------


async def _connection(
    port: int, queue: list[bytes], latencies: list[float], statuses: dict[int, int]
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        while queue:
            request = queue.pop()
            started = time.perf_counter()
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n")[1:]:
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            if length:
                await reader.readexactly(length)
            latencies.append(time.perf_counter() - started)
            code = int(head.split(b" ", 2)[1])
            statuses[code] = statuses.get(code, 0) + 1
    finally:
        writer.close()


async def _load(port: int, requests: list[bytes], concurrency: int) -> dict[str, Any]:
    queue = list(reversed(requests))  # pop() from the end sends them in order
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    started = time.perf_counter()
    await asyncio.gather(
        *(_connection(port, queue, latencies, statuses) for _ in range(concurrency))
    )
    elapsed = time.perf_counter() - started
    return {
        "requests": len(latencies),
        "seconds": elapsed,
        "latencies_ms": [x * 1000 for x in latencies],
        "statuses": statuses,
    }


def _load_main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    requests = [bytes.fromhex(r) for r in spec["requests"]]
    result = asyncio.run(_load(spec["port"], requests, spec["concurrency"]))
    Path(spec["out"]).write_text(json.dumps(result))


def load(
    port: int, requests: list[bytes], root: Path, tag: str, concurrency: int = CONCURRENCY
) -> dict[str, Any]:
    """Send `requests` from a second process over `concurrency` connections; its measurements."""
    spec = root / f"load-{tag}.json"
    out = root / f"result-{tag}.json"
    spec.write_text(
        json.dumps(
            {
                "port": port,
                "concurrency": concurrency,
                "out": str(out),
                "requests": [r.hex() for r in requests],
            }
        )
    )
    subprocess.run([sys.executable, __file__, "--load", str(spec)], check=True, timeout=600)
    return dict(json.loads(out.read_text()))


# -- the benchmark ---------------------------------------------------------------------------


def _wait(cond: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.02)
    raise RuntimeError(f"timed out waiting for {what}")


def _builds(db: Path, component: str) -> list[tuple[str, str]]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return list(
            conn.execute(
                "SELECT sha, status FROM builds WHERE component = ? ORDER BY id", (component,)
            )
        )
    finally:
        conn.close()


def run() -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="deployd-bench-webhook-"))
    proc: subprocess.Popen[bytes] | None = None
    try:
        tput_repo, tput_shas = make_repo(root, "tput", WARMUP + REQUESTS)
        burst_repo, burst_shas = make_repo(root, "burst", BURST)
        port = _free_port()
        state = root / "var"
        lines = ["[daemon]", f'state_dir = "{state}"', f'listen = "127.0.0.1:{port}"']
        for name, repo in (("tput", tput_repo), ("burst", burst_repo)):
            lines += [
                "[[components]]",
                f'name = "{name}"',
                f'url = "file://{repo}"',
                "watch = false",
                'poll_interval = "0"',
                f'webhook_secret = "{SECRET}"',
            ]
        (root / "config.toml").write_text("\n".join(lines) + "\n")
        log = (root / "daemon.log").open("wb")
        proc = subprocess.Popen(
            [*_deployd(), "serve", "-c", str(root / "config.toml")], stdout=log, stderr=log
        )

        def healthy() -> bool:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1):
                    return True
            except OSError:
                return False

        _wait(healthy, 30, "the daemon to start")
        db = state / "deployd.db"
        # The start-up reconcile builds both branch heads; let that finish first.
        _wait(lambda: len(_builds(db, "tput")) >= 1 and len(_builds(db, "burst")) >= 1, 60, "start")
        _wait(lambda: all(s != "building" for _, s in _builds(db, "burst")), 60, "start builds")

        # 1. throughput and latency (the first WARMUP requests are not measured)
        advance(tput_repo, tput_shas[-1])
        reqs = requests_for(tput_shas[1:], "tput", port)
        load(port, reqs[:WARMUP], root, "warmup")
        measured = load(port, reqs[WARMUP:], root, "tput")
        lat = measured["latencies_ms"]

        # 2. a burst of pushes of successive commits to one component → how many builds
        before = len(_builds(db, "burst"))
        advance(burst_repo, burst_shas[-1])
        burst = load(port, requests_for(burst_shas[1:], "burst", port), root, "burst")
        last = burst_shas[-1]
        _wait(
            lambda: any(sha == last and s == "succeeded" for sha, s in _builds(db, "burst")),
            120,
            "the burst's last commit to be built",
        )
        burst_builds = len(_builds(db, "burst")) - before
        return {
            "throughput": {
                "requests": measured["requests"],
                "concurrency": CONCURRENCY,
                "req_per_s": round(measured["requests"] / measured["seconds"]),
                "p50_ms": round(_pct(lat, 0.50), 2),
                "p99_ms": round(_pct(lat, 0.99), 2),
                "max_ms": round(max(lat), 2),
                "statuses": measured["statuses"],
                "target": ">= 1000 req/s, p99 <= 50 ms",
            },
            "burst": {
                "pushes": burst["requests"],
                "seconds": round(burst["seconds"], 2),
                "builds": burst_builds,
                "last_commit_built": True,
                "statuses": burst["statuses"],
                "target": "<= 2 builds",
            },
        }
    finally:
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--load":
        _load_main(sys.argv[2])
    else:
        print(json.dumps(run(), indent=2))
