"""What the Python and Node flow benchmarks share: a daemon with one hosted component, the
benchmark flow (tick → pass* → write), push → first new message, and the switch-over gap.

The component's `write` action records {"n", "by": tag, "t": time.time()} lines, so the out
file tells which code handled which message, and when.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from common import FlowBench, read_jsonl, summary, ts, wait_until

LATENCY_PUSHES = 10
GAP_PUSHES = 20


def flow_text(
    component: str, name: str, out: Path, interval: str, middle: int = 1, mappers: bool = False
) -> str:
    """tick → `middle` pass steps → write(out); every action mapped when `mappers`."""
    lines = [f'name = "{name}"', 'type = "realtime"', 'update = "auto"']
    steps = [
        f'id = "tick"\ncomponent = "{component}"\nfunction = "ticker"\ninterval = "{interval}"'
    ]
    mapping = '\nmapping = \'{"n": n, "text": $uppercase(text)}\'' if mappers else ""
    for i in range(middle):
        steps.append(f'id = "pass{i}"\ncomponent = "{component}"\nfunction = "pass"{mapping}')
    steps.append(
        f'id = "write"\ncomponent = "{component}"\nfunction = "write"{mapping}\n'
        f'config = {{ out = "{out}" }}'
    )
    for s in steps:
        lines += ["[[steps]]", s]
    return "\n".join(lines) + "\n"


class ComponentBench(FlowBench):
    """A daemon hosting one component, whose code for a given tag `files(tag)` writes."""

    def __init__(
        self,
        root: Path,
        component: str,
        files: Callable[[str], dict[str, Any]],
        wait: float = 60.0,
        **daemon_extra: Any,
    ) -> None:
        super().__init__(root, [{"name": component}], **daemon_extra)
        self.component = component
        self.files = files
        self.wait = wait

    def start(self) -> None:
        self.work(self.component, self.files("v0"))
        self.daemon.start()
        _, sha = self.push_tag(None)
        self.daemon.wait_recent(self.component, sha, timeout=self.wait)

    def push_tag(self, tag: str | None) -> tuple[float, str]:
        """Commit the code tagged `tag` (None: as it is), push; (time before push, sha)."""
        return self.push(self.component, self.files(tag) if tag else None)

    def flow(
        self, name: str, out: Path, interval: str, middle: int = 1, mappers: bool = False
    ) -> str:
        return flow_text(self.component, name, out, interval, middle, mappers)

    def wait_deploy(
        self, flow: str, to_version: int, timeout: float | None = None
    ) -> dict[str, Any]:
        return super().wait_deploy(flow, to_version, timeout or self.wait)


def push_to_first_message(b: ComponentBench, name: str) -> dict[str, Any]:
    """A 3-step flow with two mapped actions (5 real steps): push → first line by new code."""
    out = b.root / f"{name}.jsonl"
    b.apply(name, b.flow(name, out, "100ms", middle=1, mappers=True))
    wait_until(lambda: read_jsonl(out), timeout=b.wait)
    steps = len(json.loads(b.daemon.cli("flow", "show", name, "--json").stdout)["steps"])
    lat, to_start, deploy, warm = [], [], [], []
    for i in range(LATENCY_PUSHES):
        tag = f"{name}{i}"
        started, sha = b.push_tag(tag)
        row = wait_until(
            lambda tag=tag: next((r for r in read_jsonl(out) if r["by"] == tag), None),
            timeout=b.wait,
            interval=0.005,
        )
        lat.append((row["t"] - started) * 1000)
        dep = b.wait_deploy(name, i + 2)
        assert dep["status"] == "done" and dep["sha"] == sha, dep
        began, ended = ts(dep["started_at"]), ts(dep["finished_at"])
        to_start.append((began - started) * 1000)
        deploy.append((ended - began) * 1000)
        warm.append(dep["warmup_ms"])
    b.daemon.cli("flow", "stop", name)
    ns = [r["n"] for r in read_jsonl(out)]
    return {
        "push_to_first_new_message_ms": summary(lat),
        "real_steps": steps,
        "trigger_interval_ms": 100,
        "lost_or_duplicated": ns != list(range(1, len(ns) + 1)),
        "push_to_deploy_start_ms": summary(to_start),
        "deploy_start_to_done_ms": summary(deploy),
        "warmup_ms": summary(warm),
        "target": "p50 <= 1000 ms",
    }


def switch_gap(b: ComponentBench) -> dict[str, Any]:
    """20 redeploys of a counter flow at ~50 msg/s: `gap_ms`, and nothing lost or doubled."""
    out = b.root / "gap.jsonl"
    b.apply("gap", b.flow("gap", out, "20ms", middle=0))
    wait_until(lambda: len(read_jsonl(out)) >= 5, timeout=b.wait)
    gaps, warm = [], []
    for i in range(GAP_PUSHES):
        tag = f"gap{i}"
        b.push_tag(tag)
        dep = b.wait_deploy("gap", i + 2)
        assert dep["status"] == "done", dep
        gaps.append(dep["gap_ms"])
        warm.append(dep["warmup_ms"])
        wait_until(lambda tag=tag: any(r["by"] == tag for r in read_jsonl(out)), timeout=b.wait)
    have = len(read_jsonl(out))
    wait_until(lambda: len(read_jsonl(out)) >= have + 5, timeout=b.wait)
    b.daemon.cli("flow", "stop", "gap")
    ns = [r["n"] for r in read_jsonl(out)]
    expected = set(range(1, max(ns) + 1))
    return {
        "gap_ms": summary(gaps),
        "warmup_ms_2_steps": summary(warm),
        "messages": len(ns),
        "lost": len(expected - set(ns)),
        "duplicated": len(ns) - len(set(ns)),
        "in_order": ns == sorted(ns),
        "rate_per_s": 50,
        "target": "p50 <= 50 ms, 0 lost, 0 duplicated",
    }
