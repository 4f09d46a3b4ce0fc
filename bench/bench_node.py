"""Issue 6 figures: the issue 3 benchmarks with Node.js components, and the Node warm-up pool.

All against a real `deployd serve` with real pushes to its hosted repository and real node
step processes. The component is in the platform's style (package.json + package-lock.json,
no dependencies, `this.emit`, `messages.newMessageWithBody`), so every push runs the default
build `npm ci --omit=dev` — that is part of push → live.

1. push → first message handled by the new version: a 3-step flow whose two actions have a
   mapping (5 real steps), trigger interval 100 ms; from just before `git push` to the
   wall-clock time the new code wrote its first line. Target p50 <= 1 s. The same without
   package.json (no npm run) is reported beside it.
2. switch-over gap: 20 redeploys of a counter flow (interval 20 ms), `gap_ms` of each; the
   counter goes through the trigger's snapshot, so n must be exactly 1..N. Target p50 <= 50 ms.
3. warm-up (`warmup_ms`) of a 3-step and a 30-step Node flow over several redeploys, with the
   idle pool (default) and without it (`node_pool = 0`). Target: ratio of the p50s <= 1.5.
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
WARMUP_PUSHES = 5

DESC: dict[str, Any] = {
    "title": "Bench (Node)",
    "runtime": "node",
    "triggers": {"ticker": {"main": "./lib/triggers/ticker.js", "title": "Ticker"}},
    "actions": {
        "pass": {"main": "./lib/actions/pass.js", "title": "Pass"},
        "write": {
            "main": "./lib/actions/write.js",
            "title": "Write",
            "fields": {"out": {"label": "Output file", "required": True}},
        },
    },
}
PACKAGE = {"name": "bench", "version": "1.0.0", "dependencies": {}}
LOCK = {
    "name": "bench",
    "version": "1.0.0",
    "lockfileVersion": 3,
    "requires": True,
    "packages": {"": {"name": "bench", "version": "1.0.0"}},
}
TICKER = """\
const { messages } = require('elasticio-node');
exports.process = function (msg, cfg, snapshot) {
  const n = (snapshot.n || 0) + 1;
  this.emit('snapshot', { n });
  this.emit('data', messages.newMessageWithBody({ n, text: 'hi' }));
  this.emit('end');
};
"""
PASS = """\
const { messages } = require('elasticio-node');
const TAG = %s;
exports.process = async function (msg) {
  return messages.newMessageWithBody(Object.assign({}, msg.body, { via: TAG }));
};
"""
WRITE = """\
const fs = require('fs');
const TAG = %s;
exports.process = async function (msg, cfg) {
  const line = { n: msg.body.n, by: TAG, t: Date.now() / 1000 };
  fs.appendFileSync(cfg.out, JSON.stringify(line) + '\\n');
};
"""


def _files(tag: str, npm: bool = True) -> dict[str, Any]:
    files: dict[str, Any] = {
        "component.json": DESC,
        "lib/triggers/ticker.js": TICKER,
        "lib/actions/pass.js": PASS % json.dumps(tag),
        "lib/actions/write.js": WRITE % json.dumps(tag),
    }
    if npm:
        files["package.json"] = PACKAGE
        files["package-lock.json"] = LOCK
    return files


def _flow(name: str, out: Path, interval: str, middle: int = 1, mappers: bool = False) -> str:
    lines = [f'name = "{name}"', 'type = "realtime"', 'update = "auto"']
    steps = [f'id = "tick"\ncomponent = "nodebench"\nfunction = "ticker"\ninterval = "{interval}"']
    mapping = '\nmapping = \'{"n": n, "text": $uppercase(text)}\'' if mappers else ""
    for i in range(middle):
        steps.append(f'id = "pass{i}"\ncomponent = "nodebench"\nfunction = "pass"{mapping}')
    steps.append(
        f'id = "write"\ncomponent = "nodebench"\nfunction = "write"{mapping}\n'
        f'config = {{ out = "{out}" }}'
    )
    for s in steps:
        lines += ["[[steps]]", s]
    return "\n".join(lines) + "\n"


class Bench:
    def __init__(self, root: Path, **daemon_extra: Any) -> None:
        self.root = root
        self.daemon = Daemon(
            root=root / "deployd",
            port=free_port(),
            components=[{"name": "nodebench"}],
            daemon_extra=daemon_extra,
        )
        self.daemon.root.mkdir(parents=True)
        self.work = make_component(root / "work" / "nodebench")
        self.pushes = 0
        self.npm = True

    def push(self, tag: str) -> tuple[float, str]:
        """Commit new code tagged `tag`, push it; returns (time.time() before push, sha)."""
        self.pushes += 1
        if not self.npm:
            for name in ("package.json", "package-lock.json"):
                (self.work.path / name).unlink(missing_ok=True)
        self.work.commit(f"push {self.pushes}", _files(tag, self.npm))
        started = time.time()
        sha = self.work.push(self.daemon.hosted("nodebench"))
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

        return dict(wait_until(done, timeout=90, interval=0.05))

    def apply(self, name: str, text: str) -> None:
        path = self.root / f"{name}.toml"
        path.write_text(text)
        self.daemon.cli("flow", "apply", str(path))

    def start(self) -> None:
        self.work.commit("bench component", _files("v0"))
        self.daemon.start()
        sha = self.work.push(self.daemon.hosted("nodebench"))
        self.daemon.wait_recent("nodebench", sha, timeout=60)


def push_to_first_message(b: Bench, name: str) -> dict[str, Any]:
    out = b.root / f"{name}.jsonl"
    b.apply(name, _flow(name, out, "100ms", middle=1, mappers=True))
    wait_until(lambda: _read(out), timeout=60)
    steps = len(json.loads(b.daemon.cli("flow", "show", name, "--json").stdout)["steps"])
    lat, to_start, deploy, warm = [], [], [], []
    for i in range(LATENCY_PUSHES):
        tag = f"{name}{i}"
        started, sha = b.push(tag)
        row = wait_until(
            lambda tag=tag: next((r for r in _read(out) if r["by"] == tag), None),
            timeout=60,
            interval=0.005,
        )
        lat.append((row["t"] - started) * 1000)
        dep = b.wait_deploy(name, i + 2)
        assert dep["status"] == "done" and dep["sha"] == sha, dep
        began, ended = _ts(dep["started_at"]), _ts(dep["finished_at"])
        to_start.append((began - started) * 1000)
        deploy.append((ended - began) * 1000)
        warm.append(dep["warmup_ms"])
    b.daemon.cli("flow", "stop", name)
    ns = [r["n"] for r in _read(out)]
    return {
        "push_to_first_new_message_ms": _summary(lat),
        "real_steps": steps,
        "trigger_interval_ms": 100,
        "lost_or_duplicated": ns != list(range(1, len(ns) + 1)),
        "push_to_deploy_start_ms": _summary(to_start),
        "deploy_start_to_done_ms": _summary(deploy),
        "warmup_ms": _summary(warm),
        "target": "p50 <= 1000 ms",
    }


def switch_gap(b: Bench) -> dict[str, Any]:
    out = b.root / "gap.jsonl"
    b.apply("gap", _flow("gap", out, "20ms", middle=0))
    wait_until(lambda: len(_read(out)) >= 5, timeout=60)
    gaps, warm = [], []
    for i in range(GAP_PUSHES):
        tag = f"gap{i}"
        b.push(tag)
        dep = b.wait_deploy("gap", i + 2)
        assert dep["status"] == "done", dep
        gaps.append(dep["gap_ms"])
        warm.append(dep["warmup_ms"])
        wait_until(lambda tag=tag: any(r["by"] == tag for r in _read(out)), timeout=60)
    have = len(_read(out))
    wait_until(lambda: len(_read(out)) >= have + 5, timeout=60)
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


def warmup(b: Bench, pushes: int = WARMUP_PUSHES) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for steps in (3, 30):
        name = f"warm{steps}"
        out = b.root / f"{name}.jsonl"
        b.apply(name, _flow(name, out, "50ms", middle=steps - 2))
        wait_until(lambda out=out: _read(out), timeout=90)
        first = b.wait_deploy(name, 1)["warmup_ms"]
        samples = []
        for i in range(pushes):
            # the pool refills in the background after a redeploy took from it
            time.sleep(0.3 + steps * 0.12)
            b.push(f"{name}-{i}")
            dep = b.wait_deploy(name, i + 2)
            assert dep["status"] == "done", dep
            samples.append(dep["warmup_ms"])
        b.daemon.cli("flow", "stop", name)
        result[f"warmup_ms_{steps}_steps"] = _summary(samples)
        result[f"first_start_warmup_ms_{steps}_steps"] = round(first, 1)
    ratio = result["warmup_ms_30_steps"]["p50"] / max(result["warmup_ms_3_steps"]["p50"], 0.001)
    result["ratio_30_to_3"] = round(ratio, 2)
    result["target"] = "ratio <= 1.5"
    return result


def run() -> dict[str, Any]:
    os.environ.setdefault("GIT_CONFIG_NOSYSTEM", "1")
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="deployd-bench-node-") as tmp:
        b = Bench(Path(tmp) / "pool")
        b.start()
        try:
            results["push_to_first_message_npm_ci"] = push_to_first_message(b, "latency")
            b.npm = False
            results["push_to_first_message_no_npm"] = push_to_first_message(b, "latnonpm")
            b.npm = True
            results["switch_over"] = switch_gap(b)
            results["warmup_with_pool"] = warmup(b)
        finally:
            b.daemon.stop()
        nopool = Bench(Path(tmp) / "nopool", node_pool=0)
        nopool.start()
        try:
            results["warmup_without_pool"] = warmup(nopool, pushes=3)
        finally:
            nopool.daemon.stop()
    return results


if __name__ == "__main__":
    print(json.dumps(run(), indent=2))
