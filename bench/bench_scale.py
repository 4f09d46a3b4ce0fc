"""Issue 7 scale figures: 500 components and 200 running flows on the 2-core machine.

A real `deployd serve` whose config lists 500 hosted components. The flows need only a few of
them, so HOT components get real code with real `git push`es (the other 496 stay empty
repositories, as components nobody pushed yet); each HOT component is used by 50 flows.
Every flow has 2 small steps (a trigger polling every 10 s that finds nothing, and an
action), so 200 flows run 400 step processes. Flows are applied through the HTTP API (what
`deployd flow apply` calls), one after another; if the machine can't take all of them, the
largest number that started is reported.

1. `deployd status` (the installed console script) wall and CPU time with everything running,
   table and --json, STATUS_RUNS runs each. Target <= 300 ms.
2. One push to a component used by 50 running flows → all 50 republished (every deployment
   of the push done), from just before `git push`. Target <= 10 s.
3. Daemon RSS/PSS, and the RSS/PSS of all the processes it started (PSS counts the pages
   forked sailors share once).
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    FlowBench,
    children_of,
    flow_toml,
    loadavg,
    memory_kb,
    summary,
    ts,
    wait_until,
)

COMPONENTS = 500
HOT = 4
FLOWS_PER_HOT = 50
STATUS_RUNS = 7
APPLY_BUDGET_S = 240  # stop adding flows past this (the machine can't take more in time)

DESC: dict[str, Any] = {
    "title": "Scale bench",
    "runtime": "python",
    "triggers": {"poll": {"main": "./lib/poll.py", "title": "Poll"}},
    "actions": {"sink": {"main": "./lib/sink.py", "title": "Sink"}},
}


def files(tag: str) -> dict[str, Any]:
    return {
        "component.json": DESC,
        "lib/poll.py": f"TAG = {tag!r}\n\ndef process(msg, cfg, snapshot, ctx):\n    return None\n",
        "lib/sink.py": f"TAG = {tag!r}\n\ndef process(msg, cfg):\n    return None\n",
    }


def _deployd() -> list[str]:
    script = Path(sys.executable).parent / "deployd"
    return [str(script)] if script.exists() else [sys.executable, "-m", "deployd"]


def _status_times(b: FlowBench, *flags: str) -> dict[str, Any]:
    wall, cpu = [], []
    for _ in range(STATUS_RUNS):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.perf_counter()
        proc = subprocess.run(
            [*_deployd(), "status", *flags, "-c", str(b.daemon.config_path)],
            capture_output=True,
            timeout=60,
        )
        wall.append((time.perf_counter() - started) * 1000)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu.append((after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime) * 1000)
        assert proc.returncode == 0, proc.stderr
    return {"wall_ms": summary(wall), "cpu_ms": summary(cpu)}


def run() -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="deployd-bench-scale-") as tmp:
        root = Path(tmp)
        names = [f"c{i:03d}" for i in range(COMPONENTS)]
        b = FlowBench(root, [{"name": n} for n in names])
        hot = names[:HOT]
        for name in hot:
            b.work(name, files("v0"))
        started = time.monotonic()
        b.daemon.start()
        result: dict[str, Any] = {
            "cpus": os.cpu_count(),
            "loadavg_at_start": loadavg(),
            "components": COMPONENTS,
            "daemon_start_s": round(time.monotonic() - started, 1),
        }
        try:
            for name in hot:
                b.push(name)
            for name in hot:
                wait_until(lambda name=name: b.daemon.recent_sha(name), timeout=60)
            applied, apply_ms = 0, []
            deadline = time.monotonic() + APPLY_BUDGET_S
            stopped_because = None
            for i in range(HOT * FLOWS_PER_HOT):
                if time.monotonic() > deadline:
                    stopped_because = f"apply budget of {APPLY_BUDGET_S} s spent"
                    break
                comp = hot[i % HOT]
                steps = [
                    {"id": "poll", "component": comp, "function": "poll", "interval": "10s"},
                    {"id": "sink", "component": comp, "function": "sink"},
                ]
                t0 = time.perf_counter()
                try:
                    b.api("POST", "/api/v1/flows/apply", {"text": flow_toml(f"f{i:03d}", steps)})
                except Exception as exc:
                    stopped_because = f"flow {i}: {type(exc).__name__}: {exc}"
                    break
                apply_ms.append((time.perf_counter() - t0) * 1000)
                applied += 1
            status = b.daemon.status()
            running = sum(1 for f in status["flows"] if f["state"] == "running")
            assert b.daemon.proc is not None
            pid = b.daemon.proc.pid
            own = memory_kb(pid)
            kids = [memory_kb(p) for p in children_of(pid)]
            result.update(
                {
                    "flows_applied": applied,
                    "flows_running": running,
                    "stopped_adding_flows": stopped_because,
                    "apply_one_flow_ms": summary(apply_ms),
                    "step_processes_and_helpers": len(kids),
                    "daemon_rss_mb": round(own["rss"] / 1024, 1),
                    "daemon_pss_mb": round(own["pss"] / 1024, 1),
                    "children_total_rss_mb": round(sum(k["rss"] for k in kids) / 1024, 1),
                    "children_total_pss_mb": round(sum(k["pss"] for k in kids) / 1024, 1),
                    "child_pss_mb_p50": summary([k["pss"] / 1024 for k in kids if k["rss"]])["p50"],
                }
            )
            time.sleep(3)  # let the last starts and the idle pool settle
            result["status_table"] = _status_times(b)
            result["status_json"] = _status_times(b, "--json")
            result["status_target"] = "<= 300 ms wall"

            # A push to a component used by FLOWS_PER_HOT running flows.
            users = [f"f{i:03d}" for i in range(0, applied, HOT)]
            pushed, sha = b.push(hot[0], files("v1"))

            def republished() -> list[dict[str, Any]] | None:
                rows = b.rows(
                    "SELECT flow, status, started_at, finished_at FROM deployments"
                    " WHERE sha = ? AND finished_at IS NOT NULL",
                    sha,
                )
                return rows if len(rows) >= len(users) else None

            rows = wait_until(republished, timeout=120, interval=0.1)
            done = [r for r in rows if r["status"] == "done"]
            last = max(ts(r["finished_at"]) for r in rows)
            result["push_to_all_republished"] = {
                "flows_using_the_component": len(users),
                "republished_done": len(done),
                "statuses": sorted({r["status"] for r in rows}),
                "seconds": round(last - pushed, 2),
                "first_deploy_started_s": round(min(ts(r["started_at"]) for r in rows) - pushed, 2),
                "target": "<= 10 s",
            }
            own = memory_kb(pid)
            result["daemon_rss_mb_after_republish"] = round(own["rss"] / 1024, 1)
            return result
        finally:
            b.close()


if __name__ == "__main__":
    print(json.dumps(run(), indent=2))
