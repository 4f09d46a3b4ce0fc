"""Issue 3 figures: push → new code handling messages, switch-over gap, flat warm-up.

All against a real `deployd serve` with real pushes to its hosted repository and real step
processes; the component has no build/test commands.

1. push → first message handled by the new version: a 3-step flow whose two actions have
   a mapping (5 real steps), trigger interval 100 ms. Each push changes the code's tag; the
   time is from just before `git push` to the wall-clock time the new code wrote its first
   line (the action records time.time()). Target p50 ≤ 1 s.
2. switch-over gap: 20 redeploys of a counter flow (interval 20 ms, a steady ~50 msg/s),
   `gap_ms` of each deployment; the counter goes through the trigger's snapshot, so the out
   file's n values must be exactly 1..N (0 lost, 0 duplicated). Target p50 ≤ 50 ms.
3. warm-up (`warmup_ms` of the deployment) of a 3-, a 10- and a 30-step flow (trigger interval
   1 s, so the old version's own traffic does not load the daemon), each over several
   redeploys, the flows measured one at a time. Target: ratio of the p50s ≤ 1.5.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.conftest import wait_until  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import read_jsonl as _read  # noqa: E402
from common import summary as _summary  # noqa: E402
from flowbench import ComponentBench, push_to_first_message, switch_gap  # noqa: E402

WARMUP_PUSHES = 8

DESC: dict[str, Any] = {
    "title": "Bench",
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
def process(msg, cfg, snapshot, ctx):
    n = snapshot.get("n", 0) + 1
    ctx.emit("snapshot", {"n": n})
    return {"n": n, "text": "hi"}
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
    line = {{"n": msg["body"].get("n"), "by": TAG, "t": time.time()}}
    with open(cfg["out"], "a") as fh:
        fh.write(json.dumps(line) + "\\n")
"""


def _files(tag: str) -> dict[str, Any]:
    return {
        "component.json": DESC,
        "lib/ticker.py": TICKER,
        "lib/pass.py": PASS.format(tag=tag),
        "lib/write.py": WRITE.format(tag=tag),
    }


def warmup(b: ComponentBench) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for steps in (3, 10, 30):
        name = f"warm{steps}"
        out = b.root / f"{name}.jsonl"
        b.apply(name, b.flow(name, out, "1s", middle=steps - 2))
        wait_until(lambda out=out: _read(out), timeout=60)
        # The first publish finds the idle pool at its base size (it then grows to the flow).
        result[f"first_publish_warmup_ms_{steps}_steps"] = b.wait_deploy(name, 1)["warmup_ms"]
        samples = []
        for i in range(WARMUP_PUSHES):
            b.push_tag(f"{name}-{i}")
            dep = b.wait_deploy(name, i + 2)
            assert dep["status"] == "done", dep
            samples.append(dep["warmup_ms"])
        b.daemon.cli("flow", "stop", name)
        result[f"warmup_ms_{steps}_steps"] = _summary(samples)
    ratio = result["warmup_ms_30_steps"]["p50"] / max(result["warmup_ms_3_steps"]["p50"], 0.001)
    result["ratio_30_to_3"] = round(ratio, 2)
    ratio10 = result["warmup_ms_10_steps"]["p50"] / max(result["warmup_ms_3_steps"]["p50"], 0.001)
    result["ratio_10_to_3"] = round(ratio10, 2)
    result["target"] = "ratio <= 1.5"
    return result


def run() -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="deployd-bench-flows-") as tmp:
        os.environ.setdefault("GIT_CONFIG_NOSYSTEM", "1")
        b = ComponentBench(Path(tmp), "hello", _files)
        b.start()
        try:
            load = [round(x, 1) for x in os.getloadavg()]
            return {
                "cpus": os.cpu_count(),
                "loadavg_at_start": load,
                "push_to_first_message": push_to_first_message(b, "latency"),
                "switch_over": switch_gap(b),
                "warmup": warmup(b),
            }
        finally:
            b.daemon.stop()


if __name__ == "__main__":
    print(json.dumps(run(), indent=2))
