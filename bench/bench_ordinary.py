"""Issue 14 figures: a scheduled (ordinary) flow's run overhead, for 3 and 10 steps.

A real `deployd serve` hosting one component; an ordinary flow tick → pass* → write whose
trigger emits one message per call (stamped with the time of the call) and whose `write`
stamps the time it wrote it. Each run is asked for through the HTTP API (`POST
/api/v1/flows/NAME/run`, what `deployd flow run` does) and read back from `flow_runs`:

- `run_ms`: the whole run, started_at → finished_at as recorded: resolve the versions, start
  every step process, startup(), process() once, drain every queue, shutdown(), stop;
- `to_trigger_ms`: started_at → the trigger's process() was called (resolve + warm-up);
- `drain_ms`: the trigger's call → the last step wrote the message;
- `stop_ms`: the last step wrote → the run was recorded finished (shutdown and stop).

No target is set by the issue; the figures show what a run costs beyond the component's work.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import FlowBench, read_jsonl, summary, ts, wait_until  # noqa: E402

RUNS = 10

DESC: dict[str, Any] = {
    "title": "Bench",
    "runtime": "python",
    "triggers": {"once": {"main": "./lib/once.py", "title": "Once"}},
    "actions": {
        "pass": {"main": "./lib/pass.py", "title": "Pass"},
        "write": {
            "main": "./lib/write.py",
            "title": "Write",
            "fields": {"out": {"label": "Output file", "required": True}},
        },
    },
}
ONCE = """\
import time

def process(msg, cfg, snapshot, ctx):
    run = snapshot.get("run", 0) + 1
    ctx.emit("snapshot", {"run": run})
    return {"run": run, "called": time.time()}
"""
PASS = """\
def process(msg, cfg):
    return msg["body"]
"""
WRITE = """\
import json, time

def process(msg, cfg):
    with open(cfg["out"], "a") as fh:
        fh.write(json.dumps({**msg["body"], "t": time.time()}) + "\\n")
"""


def _flow(name: str, out: Path, steps: int) -> str:
    lines = [f'name = "{name}"', 'type = "ordinary"', 'every = "24h"', 'catch_up = "none"']
    parts = ['id = "tick"\ncomponent = "bench"\nfunction = "once"']
    parts += [f'id = "pass{i}"\ncomponent = "bench"\nfunction = "pass"' for i in range(steps - 2)]
    parts.append(
        f'id = "write"\ncomponent = "bench"\nfunction = "write"\nconfig = {{ out = "{out}" }}'
    )
    for part in parts:
        lines += ["[[steps]]", part]
    return "\n".join(lines) + "\n"


def _runs(b: FlowBench, name: str, steps: int) -> dict[str, Any]:
    out = b.root / f"{name}.jsonl"
    b.apply(name, _flow(name, out, steps))
    phases: dict[str, list[float]] = {
        "run_ms": [],
        "to_trigger_ms": [],
        "drain_ms": [],
        "stop_ms": [],
    }
    for i in range(RUNS + 1):  # the first run warms the pools; it is not counted
        res = b.api("POST", f"/api/v1/flows/{name}/run")
        run_id = int(res["run"])

        def done(run_id: int = run_id) -> dict[str, Any] | None:
            rows = b.rows("SELECT * FROM flow_runs WHERE id = ?", run_id)
            return rows[0] if rows and rows[0]["status"] != "running" else None

        row = wait_until(done, timeout=120, interval=0.02)
        assert row["status"] == "succeeded", row
        line = next(r for r in read_jsonl(out) if r["run"] == i + 1)
        if i == 0:
            continue
        start, end = ts(row["started_at"]), ts(row["finished_at"])
        phases["run_ms"].append((end - start) * 1000)
        phases["to_trigger_ms"].append((line["called"] - start) * 1000)
        phases["drain_ms"].append((line["t"] - line["called"]) * 1000)
        phases["stop_ms"].append((end - line["t"]) * 1000)
        time.sleep(0.2)  # let the idle pools refill between runs, as between scheduled runs
    return {key: summary(values) for key, values in phases.items()}


def run() -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="deployd-bench-ordinary-") as tmp:
        os.environ.setdefault("GIT_CONFIG_NOSYSTEM", "1")
        b = FlowBench(Path(tmp), [{"name": "bench"}])
        b.work(
            "bench",
            {
                "component.json": DESC,
                "lib/once.py": ONCE,
                "lib/pass.py": PASS,
                "lib/write.py": WRITE,
            },
        )
        b.daemon.start()
        try:
            _, sha = b.push("bench", None)
            b.daemon.wait_recent("bench", sha, timeout=120)
            return {
                "cpus": os.cpu_count(),
                "loadavg_at_start": [round(x, 1) for x in os.getloadavg()],
                "runs_each": RUNS,
                "steps_3": _runs(b, "sched3", 3),
                "steps_10": _runs(b, "sched10", 10),
            }
        finally:
            b.daemon.stop()


if __name__ == "__main__":
    print(json.dumps(run(), indent=2))
