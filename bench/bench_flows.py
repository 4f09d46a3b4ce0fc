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
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.conftest import Daemon, free_port, make_component, wait_until  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import read_jsonl as _read  # noqa: E402
from common import summary as _summary  # noqa: E402
from common import ts as _ts  # noqa: E402

LATENCY_PUSHES = 10
GAP_PUSHES = 20
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


def _flow(name: str, out: Path, interval: str, middle: int = 1, mappers: bool = False) -> str:
    lines = [f'name = "{name}"', 'type = "realtime"', 'update = "auto"']
    steps = [f'id = "tick"\ncomponent = "hello"\nfunction = "ticker"\ninterval = "{interval}"']
    mapping = '\nmapping = \'{"n": n, "text": $uppercase(text)}\'' if mappers else ""
    for i in range(middle):
        steps.append(f'id = "pass{i}"\ncomponent = "hello"\nfunction = "pass"{mapping}')
    steps.append(
        f'id = "write"\ncomponent = "hello"\nfunction = "write"{mapping}\n'
        f'config = {{ out = "{out}" }}'
    )
    for s in steps:
        lines += ["[[steps]]", s]
    return "\n".join(lines) + "\n"


class Bench:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.daemon = Daemon(
            root=root / "deployd", port=free_port(), components=[{"name": "hello"}]
        )
        self.daemon.root.mkdir(parents=True)
        self.work = make_component(root / "work" / "hello")
        self.pushes = 0

    def push(self, tag: str) -> tuple[float, str]:
        """Commit new code tagged `tag`, push it; returns (time.time() before push, sha)."""
        self.pushes += 1
        self.work.commit(f"push {self.pushes}", _files(tag))
        started = time.time()
        sha = self.work.push(self.daemon.hosted("hello"))
        return started, sha

    def deploys(self, flow: str) -> list[dict[str, Any]]:
        rows = json.loads(self.daemon.cli("deploys", "--json", "--limit", "500").stdout)
        return [d for d in rows if d["flow"] == flow]

    def wait_deploy(self, flow: str, to_version: int) -> dict[str, Any]:
        def done() -> dict[str, Any] | None:
            for d in self.deploys(flow):
                if d["to_version"] == to_version and d["finished_at"]:
                    return d
            return None

        return dict(wait_until(done, timeout=60, interval=0.05))

    def apply(self, name: str, text: str) -> None:
        path = self.root / f"{name}.toml"
        path.write_text(text)
        self.daemon.cli("flow", "apply", str(path))


def push_to_first_message(b: Bench) -> dict[str, Any]:
    out = b.root / "latency.jsonl"
    b.apply("latency", _flow("latency", out, "100ms", middle=1, mappers=True))
    wait_until(lambda: _read(out), timeout=30)
    steps = len(json.loads(b.daemon.cli("flow", "show", "latency", "--json").stdout)["steps"])
    lat, to_start, deploy = [], [], []
    for i in range(LATENCY_PUSHES):
        tag = f"lat{i}"
        started, sha = b.push(tag)
        row = wait_until(
            lambda tag=tag: next((r for r in _read(out) if r["by"] == tag), None),
            timeout=30,
            interval=0.005,
        )
        lat.append((row["t"] - started) * 1000)
        dep = b.wait_deploy("latency", i + 2)
        assert dep["status"] == "done" and dep["sha"] == sha, dep
        began, ended = _ts(dep["started_at"]), _ts(dep["finished_at"])
        to_start.append((began - started) * 1000)
        deploy.append((ended - began) * 1000)
    b.daemon.cli("flow", "stop", "latency")
    ns = [r["n"] for r in _read(out)]
    return {
        "push_to_first_new_message_ms": _summary(lat),
        "real_steps": steps,
        "trigger_interval_ms": 100,
        "lost_or_duplicated": ns != list(range(1, len(ns) + 1)),
        "push_to_deploy_start_ms": _summary(to_start),
        "deploy_start_to_done_ms": _summary(deploy),
        "target": "p50 <= 1000 ms",
    }


def switch_gap(b: Bench) -> dict[str, Any]:
    out = b.root / "gap.jsonl"
    b.apply("gap", _flow("gap", out, "20ms", middle=0))
    wait_until(lambda: len(_read(out)) >= 5, timeout=30)
    gaps, warm = [], []
    for i in range(GAP_PUSHES):
        tag = f"gap{i}"
        b.push(tag)
        dep = b.wait_deploy("gap", i + 2)
        assert dep["status"] == "done", dep
        gaps.append(dep["gap_ms"])
        warm.append(dep["warmup_ms"])
        wait_until(lambda tag=tag: any(r["by"] == tag for r in _read(out)), timeout=30)
    have = len(_read(out))
    wait_until(lambda: len(_read(out)) >= have + 5, timeout=30)
    b.daemon.cli("flow", "stop", "gap")
    ns = [r["n"] for r in _read(out)]
    expected = set(range(1, max(ns) + 1))
    return {
        "gap_ms": _summary(gaps),
        "warmup_ms_2_steps": _summary(warm),
        "messages": len(ns),
        "lost": len(expected - set(ns)),
        "duplicated": len(ns) - len(set(ns)),
        "in_order": ns == sorted(ns),
        "rate_per_s": 50,
        "target": "p50 <= 50 ms, 0 lost, 0 duplicated",
    }


def warmup(b: Bench) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for steps in (3, 10, 30):
        name = f"warm{steps}"
        out = b.root / f"{name}.jsonl"
        b.apply(name, _flow(name, out, "1s", middle=steps - 2))
        wait_until(lambda out=out: _read(out), timeout=60)
        # The first publish finds the idle pool at its base size (it then grows to the flow).
        result[f"first_publish_warmup_ms_{steps}_steps"] = b.wait_deploy(name, 1)["warmup_ms"]
        samples = []
        for i in range(WARMUP_PUSHES):
            b.push(f"{name}-{i}")
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
        b = Bench(Path(tmp))
        b.work.commit("bench component", _files("v0"))
        b.daemon.start()
        try:
            b.work.push(b.daemon.hosted("hello"))
            b.daemon.wait_recent("hello", b.work.push(b.daemon.hosted("hello")), timeout=30)
            load = [round(x, 1) for x in os.getloadavg()]
            return {
                "cpus": os.cpu_count(),
                "loadavg_at_start": load,
                "push_to_first_message": push_to_first_message(b),
                "switch_over": switch_gap(b),
                "warmup": warmup(b),
            }
        finally:
            b.daemon.stop()


if __name__ == "__main__":
    print(json.dumps(run(), indent=2))
