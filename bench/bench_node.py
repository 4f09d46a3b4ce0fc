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

from tests.conftest import wait_until  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import read_jsonl as _read  # noqa: E402
from common import summary as _summary  # noqa: E402
from flowbench import ComponentBench, push_to_first_message, switch_gap  # noqa: E402

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


class Bench(ComponentBench):
    """The Node component's bench; `npm = False` pushes it without package.json (no npm)."""

    def __init__(self, root: Path, **daemon_extra: Any) -> None:
        super().__init__(
            root, "nodebench", lambda tag: _files(tag, self.npm), wait=90.0, **daemon_extra
        )
        self.npm = True

    def push_tag(self, tag: str | None) -> tuple[float, str]:
        if not self.npm:
            for name in ("package.json", "package-lock.json"):
                (self.works[self.component].path / name).unlink(missing_ok=True)
        return super().push_tag(tag)


def warmup(b: Bench, pushes: int = WARMUP_PUSHES) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for steps in (3, 30):
        name = f"warm{steps}"
        out = b.root / f"{name}.jsonl"
        b.apply(name, b.flow(name, out, "50ms", middle=steps - 2))
        wait_until(lambda out=out: _read(out), timeout=90)
        first = b.wait_deploy(name, 1)["warmup_ms"]
        samples = []
        for i in range(pushes):
            # the pool refills in the background after a redeploy took from it
            time.sleep(0.3 + steps * 0.12)
            b.push_tag(f"{name}-{i}")
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
