"""Issue 5 figures: an idle daemon's footprint, and recovery from SIGKILL.

A real `deployd serve` hosting 20 components (each pushed once) and running 10 three-step flows
(trigger → pass → write, no mappers; each flow uses its own component). The trigger is a
poller: every 1 s (the default interval) it looks for a gate file and emits a message only
when the file exists, as a real trigger finds nothing new most of the time.

1. Idle: no gate, so the flows poll and find nothing. After a settle period, CPU time of the
   daemon (and of everything it started) over IDLE_SECONDS, and RSS/PSS of the daemon and of
   every process it started (step processes, the fork server, idle pooled sailors). PSS counts
   pages shared between forked sailors once. Targets: daemon <= 1 % of a core, <= 100 MB RSS.
2. Recovery: the gate is opened (every trigger call emits), then RECOVERIES times: SIGKILL the
   daemon, start it again at once, and time from the kill to (a) /healthz answering, (b) every
   flow having written a message whose trigger call started after the kill. Old step
   processes still alive after the recovery are reported as orphans. Target: (b) <= 3 s.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import contextlib

from common import (
    FlowBench,
    children_of,
    cmdline,
    cpu_seconds,
    flow_toml,
    loadavg,
    memory_kb,
    read_jsonl,
    summary,
    wait_until,
)

COMPONENTS = 20
FLOWS = 10
IDLE_SECONDS = 60
SETTLE_SECONDS = 10
RECOVERIES = 5

DESC: dict[str, Any] = {
    "title": "Service bench",
    "runtime": "python",
    "triggers": {
        "poll": {
            "main": "./lib/poll.py",
            "title": "Poll",
            "fields": {"gate": {"label": "Gate file", "required": True}},
        }
    },
    "actions": {
        "pass": {"main": "./lib/pass.py", "title": "Pass"},
        "write": {
            "main": "./lib/write.py",
            "title": "Write",
            "fields": {"out": {"label": "Output file", "required": True}},
        },
    },
}
FILES: dict[str, Any] = {
    "component.json": DESC,
    "lib/poll.py": """\
import os, time

def process(msg, cfg, snapshot, ctx):
    if not os.path.exists(cfg["gate"]):
        return None  # nothing new: most calls of a real poller
    n = snapshot.get("n", 0) + 1
    ctx.emit("snapshot", {"n": n})
    return {"n": n, "t0": time.time()}
""",
    "lib/pass.py": """\
def process(msg, cfg):
    return msg["body"]
""",
    "lib/write.py": """\
import json, time

def process(msg, cfg):
    with open(cfg["out"], "a") as fh:
        fh.write(json.dumps({**msg["body"], "t": time.time()}) + "\\n")
""",
}


def _kind(pid: int) -> str:
    cmd = cmdline(pid)
    if "forkserver" in cmd:
        return "fork_server"
    if "sailor" in cmd or "deployd" in cmd or "python" in cmd:
        return "python_process"
    return cmd.split(" ", 1)[0] or "?"


def _footprint(daemon_pid: int) -> dict[str, Any]:
    own = memory_kb(daemon_pid)
    kids = children_of(daemon_pid)
    per = [memory_kb(pid) for pid in kids]
    per = [m for m in per if m["rss"]]
    return {
        "daemon_rss_mb": round(own["rss"] / 1024, 1),
        "daemon_pss_mb": round(own["pss"] / 1024, 1),
        "child_processes": len(per),
        "child_kinds": sorted({_kind(pid) for pid in kids}),
        "child_rss_mb": summary([m["rss"] / 1024 for m in per]) if per else None,
        "child_pss_mb": summary([m["pss"] / 1024 for m in per]) if per else None,
        "children_total_rss_mb": round(sum(m["rss"] for m in per) / 1024, 1),
        "children_total_pss_mb": round(sum(m["pss"] for m in per) / 1024, 1),
    }


def _tree_cpu(pid: int) -> float:
    total = 0.0
    for p in [pid, *children_of(pid)]:
        with contextlib.suppress(OSError):
            total += cpu_seconds(p)
    return total


def idle(b: FlowBench) -> dict[str, Any]:
    assert b.daemon.proc is not None
    pid = b.daemon.proc.pid
    time.sleep(SETTLE_SECONDS)
    cpu0, tree0, t0 = cpu_seconds(pid), _tree_cpu(pid), time.monotonic()
    time.sleep(IDLE_SECONDS)
    cpu1, tree1, t1 = cpu_seconds(pid), _tree_cpu(pid), time.monotonic()
    wall = t1 - t0
    result = {
        "seconds": round(wall, 1),
        "daemon_cpu_percent_of_a_core": round((cpu1 - cpu0) / wall * 100, 2),
        "daemon_and_children_cpu_percent": round((tree1 - tree0) / wall * 100, 2),
        **_footprint(pid),
        "target": "daemon <= 1 % of a core, <= 100 MB RSS",
    }
    return result


def recovery(b: FlowBench, outs: list[Path], gate: Path) -> dict[str, Any]:
    gate.touch()
    wait_until(lambda: all(read_jsonl(o) for o in outs), timeout=60)
    healthy, running, orphans = [], [], 0
    for _ in range(RECOVERIES):
        assert b.daemon.proc is not None
        old = children_of(b.daemon.proc.pid)
        killed = time.time()
        b.daemon.proc.send_signal(signal.SIGKILL)
        b.daemon.proc.wait(10)
        b.daemon.proc = None
        b.daemon.start(wait=False)
        wait_until(b.daemon._healthy, timeout=30, interval=0.01)
        healthy.append((time.time() - killed) * 1000)

        def all_back(killed: float = killed) -> bool:
            return all(any(r["t0"] > killed for r in read_jsonl(o)) for o in outs)

        wait_until(all_back, timeout=30, interval=0.01)
        running.append((time.time() - killed) * 1000)
        time.sleep(2)  # let the old processes notice and the idle pool refill
        orphans += sum(1 for p in old if Path(f"/proc/{p}").exists() and _alive(p))
    rows = [r["n"] for o in outs for r in read_jsonl(o)]
    per_flow = [[r["n"] for r in read_jsonl(o)] for o in outs]
    return {
        "flows": FLOWS,
        "kills": RECOVERIES,
        "kill_to_healthz_ms": summary(healthy),
        "kill_to_all_flows_running_ms": summary(running),
        "old_processes_alive_after_recovery": orphans,
        "messages": len(rows),
        "lost": sum(len(set(range(1, max(ns) + 1)) - set(ns)) for ns in per_flow if ns),
        "duplicated": sum(len(ns) - len(set(ns)) for ns in per_flow),
        "target": "all flows running <= 3000 ms after the kill (10 flows)",
    }


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def run() -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="deployd-bench-service-") as tmp:
        root = Path(tmp)
        names = [f"svc{i:02d}" for i in range(COMPONENTS)]
        b = FlowBench(root, [{"name": n} for n in names])
        work = b.work(names[0], FILES)
        b.daemon.start()
        try:
            for name in names:
                work.push(b.daemon.hosted(name))
            for name in names:
                wait_until(lambda name=name: b.daemon.recent_sha(name), timeout=60)
            gate = root / "gate"
            outs = []
            for i in range(FLOWS):
                comp, out = names[i], root / f"out{i}.jsonl"
                outs.append(out)
                steps = [
                    {"id": "poll", "component": comp, "function": "poll"},
                    {"id": "pass", "component": comp, "function": "pass"},
                    {"id": "write", "component": comp, "function": "write"},
                ]
                steps[0]["config"] = {"gate": str(gate)}
                steps[2]["config"] = {"out": str(out)}
                b.api("POST", "/api/v1/flows/apply", {"text": flow_toml(f"svc{i}", steps)})
            status = b.daemon.status()
            running = sum(1 for f in status["flows"] if f["state"] == "running")
            return {
                "cpus": os.cpu_count(),
                "loadavg_at_start": loadavg(),
                "components": COMPONENTS,
                "flows_running": running,
                "idle": idle(b),
                "recovery": recovery(b, outs, gate),
            }
        finally:
            b.close()


if __name__ == "__main__":
    print(json.dumps(run(), indent=2))
