"""Issue 7 figures measured side by side with a peer, and push → live by each source.

1. Webhook intake vs. adnanh/webhook (Debian package `webhook`, installed here if missing;
   skipped with a note if it can't be). Both verify the same GitHub HMAC-SHA256 signature over
   the same ~4 KB payload and answer: deployd queues a deploy (every request names a commit
   not built yet, so each takes the full 202 path), webhook runs a no-op command (`/bin/true`,
   `trigger-rule` on `payload-hmac-sha256` over `X-Hub-Signature-256`). The load generator is
   bench_webhook's asyncio client in a second process. Concurrency 1, 16, 64, the two servers
   alternating, REPS rounds; medians. Target: deployd >= 1.0x webhook's req/s, p99 <= 50 ms.
2. Switch-over vs. stop-then-start: the same 3-step flow (5 steps with its two mappers), the
   trigger every 20 ms (~50 msg/s), redeployed REDEPLOYS times, once by deployd's publish
   (update = "auto", a push) and once the way integration platforms do it (update = "manual":
   a push makes a draft, then stop the flow, publish, start it — through the HTTP API,
   back to back, the fastest a script can do it). The gap is taken the same way for both from
   the sink's records: end of the trigger's last call by the old version → start of its first
   call by the new one (the trigger stamps both). Messages delayed: trigger calls that the gap
   pushed back (gap // interval). 0 lost and 0 duplicated in both (the counter goes through
   the trigger's snapshot). Target: deployd's gap <= 1/10 of stop-then-start's.
3. Push → live by source: a hosted push (`git push` to the daemon's repository), a webhook
   push (`git push` to a file:// remote, then the signed GitHub hook) and a poll (`git push`
   to a file:// remote polled every 1 s) → the first message handled by the new version (the
   sink stamps its wall-clock time). p50/p95.
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_webhook
from common import (
    FlowBench,
    flow_toml,
    free_port,
    git,
    loadavg,
    read_jsonl,
    summary,
    wait_until,
)

REPS = 3
CONCURRENCIES = (1, 16, 64)
HOOK_REQUESTS = 1500
HOOK_WARMUP = 300
REDEPLOYS = 20
INTERVAL_MS = 20
LIVE_PUSHES = 8

DESC: dict[str, Any] = {
    "title": "Compare",
    "runtime": "python",
    "triggers": {"ticker": {"main": "./lib/ticker.py", "title": "Ticker"}},
    "actions": {
        "pass": {"main": "./lib/pass.py", "title": "Pass"},
        "write": {
            "main": "./lib/write.py",
            "title": "Write",
            "fields": {"out": {"label": "Output file", "required": True}},
        },
    },
}
TICKER = """\
import time
TAG = {tag!r}

def process(msg, cfg, snapshot, ctx):
    t0 = time.time()
    n = snapshot.get("n", 0) + 1
    ctx.emit("snapshot", {{"n": n}})
    return {{"n": n, "tv": TAG, "t0": t0, "t1": time.time()}}
"""
PASS = """\
TAG = {tag!r}

def process(msg, cfg):
    return {{**msg["body"], "via": TAG}}
"""
WRITE = """\
import json, time
TAG = {tag!r}

def process(msg, cfg):
    line = {{**msg["body"], "by": TAG, "t": time.time()}}
    with open(cfg["out"], "a") as fh:
        fh.write(json.dumps(line) + "\\n")
"""
MAPPING = '{"n": n, "tv": tv, "t0": t0, "t1": t1}'


def files(tag: str) -> dict[str, Any]:
    return {
        "component.json": DESC,
        "lib/ticker.py": TICKER.format(tag=tag),
        "lib/pass.py": PASS.format(tag=tag),
        "lib/write.py": WRITE.format(tag=tag),
    }


def three_steps(component: str, out: Path, interval: str, mappers: bool = True) -> list[dict]:
    """tick → (mapper) pass → (mapper) write: 3 steps, 5 with the mappers."""
    extra = {"mapping": MAPPING} if mappers else {}
    return [
        {"id": "tick", "component": component, "function": "ticker", "interval": interval},
        {"id": "pass", "component": component, "function": "pass", **extra},
        {
            "id": "write",
            "component": component,
            "function": "write",
            **extra,
            "config": {"out": str(out)},
        },
    ]


# -- 1. webhook intake vs. adnanh/webhook ------------------------------------------------------


def _webhook_binary() -> tuple[str | None, str]:
    """Path of adnanh/webhook, installing the Debian package if needed; (path, note)."""
    found = shutil.which("webhook")
    if found:
        return found, "already installed"
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return None, "webhook not installed and apt-get not usable here (not root)"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "webhook"]):
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
        if proc.returncode != 0:
            return None, f"`{' '.join(cmd)}` failed: {proc.stderr.strip()[-300:]}"
    found = shutil.which("webhook")
    return found, "installed with apt-get" if found else "apt-get ran but no webhook binary"


def _start_webhook(binary: str, root: Path, component: str, port: int) -> subprocess.Popen[bytes]:
    hooks = [
        {
            "id": component,
            "execute-command": "/bin/true",
            "command-working-directory": str(root),
            "response-message": "queued",
            "trigger-rule-mismatch-http-response-code": 401,
            "trigger-rule": {
                "match": {
                    "type": "payload-hmac-sha256",
                    "secret": bench_webhook.SECRET,
                    "parameter": {"source": "header", "name": "X-Hub-Signature-256"},
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


def _port_open(port: int) -> bool:
    import socket

    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def webhook_vs_adnanh(root: Path) -> dict[str, Any]:
    binary, note = _webhook_binary()
    if binary is None:
        return {"skipped": f"adnanh/webhook unavailable: {note}"}
    version = subprocess.run([binary, "-version"], capture_output=True, text=True).stdout.strip()
    root.mkdir(parents=True, exist_ok=True)
    runs = REPS * len(CONCURRENCIES)
    repo, shas = bench_webhook.make_repo(root, "hooked", HOOK_WARMUP + runs * HOOK_REQUESTS)
    bench_webhook.advance(repo, shas[-1])
    b = FlowBench(
        root / "hookd",
        [
            {
                "name": "hooked",
                "url": f"file://{repo}",
                "watch": False,
                "poll_interval": "0",
                "webhook_secret": bench_webhook.SECRET,
            }
        ],
    )
    wport = free_port()
    peer = _start_webhook(binary, root, "hooked", wport)
    try:
        b.daemon.start()
        wait_until(lambda: _port_open(wport), timeout=20)
        reqs = bench_webhook.requests_for(shas[1:], "hooked", b.daemon.port)
        # Warm both up (the same requests: the peer keeps no state).
        bench_webhook.load(b.daemon.port, reqs[:HOOK_WARMUP], root, "warm-d", 16)
        bench_webhook.load(wport, reqs[:HOOK_WARMUP], root, "warm-w", 16)
        raw: dict[int, dict[str, list[dict[str, Any]]]] = {
            c: {"deployd": [], "webhook": []} for c in CONCURRENCIES
        }
        i = HOOK_WARMUP
        for rep in range(REPS):
            for c in CONCURRENCIES:
                batch = reqs[i : i + HOOK_REQUESTS]
                i += HOOK_REQUESTS
                # Alternate who goes first, so neither always meets the other's leftovers.
                order = [("deployd", b.daemon.port), ("webhook", wport)]
                for who, port in order if rep % 2 == 0 else order[::-1]:
                    m = bench_webhook.load(port, batch, root, f"{who}-{c}-{rep}", c)
                    lat = m["latencies_ms"]
                    raw[c][who].append(
                        {
                            "req_per_s": m["requests"] / m["seconds"],
                            "p50_ms": bench_webhook._pct(lat, 0.5),
                            "p99_ms": bench_webhook._pct(lat, 0.99),
                            "statuses": m["statuses"],
                        }
                    )
        out: dict[str, Any] = {
            "peer": version,
            "peer_install": note,
            "requests_per_run": HOOK_REQUESTS,
            "runs_per_figure": REPS,
        }
        for c in CONCURRENCIES:
            row: dict[str, Any] = {}
            for who in ("deployd", "webhook"):
                runs_ = raw[c][who]
                statuses: dict[str, int] = {}
                for r in runs_:
                    for code, count in r["statuses"].items():
                        statuses[str(code)] = statuses.get(str(code), 0) + count
                row[who] = {
                    "req_per_s": round(statistics.median(r["req_per_s"] for r in runs_)),
                    "p50_ms": round(statistics.median(r["p50_ms"] for r in runs_), 2),
                    "p99_ms": round(statistics.median(r["p99_ms"] for r in runs_), 2),
                    "statuses": statuses,
                }
            ratios = [
                d["req_per_s"] / w["req_per_s"]
                for d, w in zip(raw[c]["deployd"], raw[c]["webhook"], strict=True)
            ]
            row["ratio_req_per_s"] = round(statistics.median(ratios), 2)
            out[f"concurrency_{c}"] = row
        out["target"] = "deployd >= 1.0x webhook's req/s, deployd p99 <= 50 ms"
        return out
    finally:
        peer.send_signal(signal.SIGTERM)
        try:
            peer.wait(10)
        except subprocess.TimeoutExpired:
            peer.kill()
            peer.wait(5)
        b.close()


# -- 2. switch-over vs. stop-then-start -------------------------------------------------------


def _gaps(rows: list[dict[str, Any]], tags: list[str]) -> list[float]:
    """For each tag after the first: start of its trigger's first call minus the end of the
    previous tag's last call, in ms (from the sink's records, in counter order)."""
    by_n = sorted(rows, key=lambda r: r["n"])
    gaps = []
    for old, new in itertools.pairwise(tags):
        last_old = max((r["t1"] for r in by_n if r["tv"] == old), default=None)
        first_new = min((r["t0"] for r in by_n if r["tv"] == new), default=None)
        if last_old is not None and first_new is not None:
            gaps.append(max(0.0, (first_new - last_old) * 1000))
    return gaps


def _switch_mode(b: FlowBench, mode: str, first_tag: str) -> tuple[dict[str, Any], str]:
    """`REDEPLOYS` redeploys of a new flow by `mode`; (figures, the tag running at the end)."""
    name = f"sw-{mode}"
    comp = "hosted"
    out = b.root / f"{name}.jsonl"
    update = "auto" if mode == "publish" else "manual"
    b.apply(name, flow_toml(name, three_steps(comp, out, f"{INTERVAL_MS}ms"), update=update))
    wait_until(lambda: len(read_jsonl(out)) >= 5, timeout=30)
    tags = [first_tag]
    publish_ms = []
    for i in range(REDEPLOYS):
        tag = f"{mode}{i}"
        b.push(comp, files(tag))
        version = (b.active_version(name) or 0) + 1
        if mode == "publish":
            dep = b.wait_deploy(name, version)
            assert dep["status"] == "done", dep
        else:
            wait_until(lambda: b.rows("SELECT 1 FROM drafts WHERE flow = ?", name), timeout=30)
            began = time.monotonic()
            b.api("POST", f"/api/v1/flows/{name}/stop")
            b.api("POST", f"/api/v1/flows/{name}/publish")
            b.api("POST", f"/api/v1/flows/{name}/start")
            publish_ms.append((time.monotonic() - began) * 1000)
        tags.append(tag)
        wait_until(lambda tag=tag: any(r["tv"] == tag for r in read_jsonl(out)), timeout=30)
    have = len(read_jsonl(out))
    wait_until(lambda: len(read_jsonl(out)) >= have + 5, timeout=30)
    b.api("POST", f"/api/v1/flows/{name}/stop")
    rows = read_jsonl(out)
    ns = [r["n"] for r in rows]
    gaps = _gaps(rows, tags)
    result: dict[str, Any] = {
        "redeploys": REDEPLOYS,
        "gap_ms": summary(gaps),
        "messages_delayed": sum(int(g // INTERVAL_MS) for g in gaps),
        "messages": len(ns),
        "lost": len(set(range(1, max(ns) + 1)) - set(ns)),
        "duplicated": len(ns) - len(set(ns)),
        "in_order": ns == sorted(ns),
    }
    if publish_ms:
        result["stop_publish_start_api_ms"] = summary(publish_ms)
    else:
        deps = b.rows(
            "SELECT gap_ms FROM deployments WHERE flow = ? AND from_version IS NOT NULL", name
        )
        result["deployd_gap_ms_recorded"] = summary([d["gap_ms"] for d in deps if d["gap_ms"]], 2)
    return result, tags[-1]


def switch_vs_stop_start(b: FlowBench) -> dict[str, Any]:
    deployd, tag = _switch_mode(b, "publish", "v0")
    peer, _ = _switch_mode(b, "stopstart", tag)
    ratio = deployd["gap_ms"]["p50"] / max(peer["gap_ms"]["p50"], 0.001)
    return {
        "steps": "3 (5 with the two mappers)",
        "rate_per_s": 1000 // INTERVAL_MS,
        "deployd_publish": deployd,
        "stop_then_start": peer,
        "gap_ratio_p50": round(ratio, 4),
        "target": "deployd gap <= 1/10 of stop-then-start's; 0 lost, 0 duplicated in both",
    }


# -- 3. push → live by source -----------------------------------------------------------------


def _hook_request(b: FlowBench, component: str, sha: str) -> None:
    body = (
        bench_webhook.PAYLOAD.read_text()
        .replace("__REF__", "refs/heads/main")
        .replace("__AFTER__", sha)
        .replace("__BEFORE__", "0" * 40)
        .replace("__CLONE_URL__", "https://github.com/acme/billing.git")
        .encode()
    )
    import httpx

    sig = hmac.new(bench_webhook.SECRET.encode(), body, hashlib.sha256).hexdigest()
    resp = httpx.post(
        f"{b.daemon.url}/hooks/{component}",
        content=body,
        headers={
            "Content-Type": "application/json",
            "X-GitHub-Event": "push",
            "X-GitHub-Delivery": str(uuid.uuid4()),
            "X-Hub-Signature-256": f"sha256={sig}",
        },
        timeout=10,
    )
    assert resp.status_code == 202, resp.text


def push_to_live(b: FlowBench, remotes: dict[str, Path]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for source, comp in (("hosted", "hosted"), ("webhook", "hooked"), ("poll_1s", "polled")):
        name = f"live-{comp}"
        out = b.root / f"{name}.jsonl"
        b.apply(name, flow_toml(name, three_steps(comp, out, "100ms")))
        wait_until(lambda out=out: read_jsonl(out), timeout=30)
        samples = []
        for i in range(LIVE_PUSHES):
            tag = f"{comp}{i}"
            started, sha = b.push(comp, files(tag), remotes.get(comp))
            if source == "webhook":
                _hook_request(b, comp, sha)
            row = wait_until(
                lambda out=out, tag=tag: next((r for r in read_jsonl(out) if r["by"] == tag), None),
                timeout=30,
                interval=0.005,
            )
            samples.append((row["t"] - started) * 1000)
            time.sleep(0.3)  # let the rollback watch and the pool refill settle
        b.api("POST", f"/api/v1/flows/{name}/stop")
        result[source] = summary(samples)
    result["flow"] = "3 steps (5 with mappers), trigger every 100 ms"
    result["note"] = "webhook includes deployd's 100 ms coalescing hold; poll waits up to 1 s"
    return result


def _bare(root: Path, name: str, work: Path) -> Path:
    bare = root / "remotes" / f"{name}.git"
    bare.parent.mkdir(parents=True, exist_ok=True)
    git("init", "-q", "--bare", "-b", "main", str(bare))
    git("push", "-q", str(bare), "HEAD:refs/heads/main", cwd=work)
    return bare


def run() -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="deployd-bench-compare-") as tmp:
        root = Path(tmp)
        result: dict[str, Any] = {"cpus": os.cpu_count(), "loadavg_at_start": loadavg()}
        result["webhook_vs_adnanh"] = webhook_vs_adnanh(root / "hooks")
        b = FlowBench(root / "flows", [])
        remotes: dict[str, Path] = {}
        for comp in ("hosted", "hooked", "polled"):
            work = b.work(comp, files("v0"))
            if comp != "hosted":
                remotes[comp] = _bare(root, comp, work.path)
        b.daemon.components = [
            {"name": "hosted"},
            {
                "name": "hooked",
                "url": f"file://{remotes['hooked']}",
                "watch": False,
                "poll_interval": "0",
                "webhook_secret": bench_webhook.SECRET,
            },
            {
                "name": "polled",
                "url": f"file://{remotes['polled']}",
                "watch": False,
                "poll_interval": "1s",
            },
        ]
        b.daemon.start()
        try:
            b.push("hosted", files("v0"))
            wait_until(lambda: b.daemon.recent_sha("hosted"), timeout=30)
            wait_until(lambda: b.daemon.recent_sha("hooked"), timeout=30)
            wait_until(lambda: b.daemon.recent_sha("polled"), timeout=30)
            result["switch_over"] = switch_vs_stop_start(b)
            result["push_to_live"] = push_to_live(b, remotes)
        finally:
            b.close()
        return result


if __name__ == "__main__":
    print(json.dumps(run(), indent=2))
