"""Helpers shared by the issue 5 and 7 bench modules (bench_compare, bench_scale, bench_service).

A real `deployd serve` is `tests.conftest.Daemon`; this adds what the benches repeat: a working
clone per component with a push helper, flow files, read-only views of the state database,
medians and percentiles, and /proc readings (RSS, PSS, CPU time) of a process tree. Everything
talks to 127.0.0.1 only.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.conftest import (  # noqa: E402
    Daemon,
    Work,
    db_rows,
    free_port,
    git,
    make_component,
    wait_until,
)
from tests.flows.conftest import read_out as read_jsonl  # noqa: E402, F401 (re-exported)

__all__ = ["Daemon", "FlowBench", "Work", "db_rows", "free_port", "git", "wait_until"]


# -- numbers ----------------------------------------------------------------------------------


def pct(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..1)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def summary(values: list[float], digits: int = 1) -> dict[str, float]:
    return {
        "p50": round(statistics.median(values), digits),
        "p95": round(pct(values, 0.95), digits),
        "min": round(min(values), digits),
        "max": round(max(values), digits),
        "n": len(values),
    }


def ts(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()


def loadavg() -> list[float]:
    return [round(x, 1) for x in os.getloadavg()]


# -- flows ------------------------------------------------------------------------------------


def _toml_value(value: Any) -> str:
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + " }"
    if isinstance(value, str) and "\n" not in value and "'" not in value:
        return f"'{value}'"  # literal string: JSONata keeps its quotes and backslashes
    return json.dumps(value)


def flow_toml(name: str, steps: list[dict[str, Any]], update: str = "auto") -> str:
    """A flow file: `steps` are the [[steps]] tables (id, component, function, ...)."""
    lines = [f'name = "{name}"', 'type = "realtime"', f'update = "{update}"']
    for step in steps:
        lines.append("[[steps]]")
        lines += [f"{key} = {_toml_value(value)}" for key, value in step.items()]
    return "\n".join(lines) + "\n"


class FlowBench:
    """A daemon (not started) plus one working clone per hosted component."""

    def __init__(self, root: Path, components: list[dict[str, Any]], **daemon_extra: Any) -> None:
        self.root = root
        self.daemon = Daemon(
            root=root / "deployd",
            port=free_port(),
            components=components,
            daemon_extra=daemon_extra,
        )
        self.daemon.root.mkdir(parents=True, exist_ok=True)
        self.works: dict[str, Work] = {}
        self.pushes = 0

    def work(self, name: str, files: dict[str, Any]) -> Work:
        """A working clone of component `name` whose first commit holds `files`."""
        work = make_component(self.root / "work" / name, None, **{})
        work.commit("bench component", files)
        self.works[name] = work
        return work

    def push(
        self, name: str, files: dict[str, Any] | None = None, remote: Path | None = None
    ) -> tuple[float, str]:
        """Commit `files` (or an empty commit), push; (time.time() just before the push, sha)."""
        self.pushes += 1
        work = self.works[name]
        work.commit(f"push {self.pushes}", files)
        started = time.time()
        sha = work.push(remote or self.daemon.hosted(name))
        return started, sha

    def rows(self, sql: str, *params: Any) -> list[dict[str, Any]]:
        return db_rows(self.daemon.state_dir, sql, *params)

    def deployment(self, flow: str, to_version: int) -> dict[str, Any] | None:
        rows = self.rows(
            "SELECT * FROM deployments"
            " WHERE flow = ? AND to_version = ? AND finished_at IS NOT NULL",
            flow,
            to_version,
        )
        return rows[0] if rows else None

    def wait_deploy(self, flow: str, to_version: int, timeout: float = 60) -> dict[str, Any]:
        return dict(
            wait_until(lambda: self.deployment(flow, to_version), timeout=timeout, interval=0.02)
        )

    def active_version(self, flow: str) -> int | None:
        rows = self.rows("SELECT active_version FROM flows WHERE name = ?", flow)
        return rows[0]["active_version"] if rows else None

    def apply(self, name: str, text: str) -> None:
        path = self.root / f"{name}.toml"
        path.write_text(text)
        self.daemon.cli("flow", "apply", str(path))

    def api(self, method: str, path: str, body: Any = None, timeout: float = 60) -> Any:
        """A call to the daemon's HTTP API with its bearer token (what the CLI does)."""
        import httpx

        token = (self.daemon.state_dir / "api-token").read_text().strip()
        resp = httpx.request(
            method,
            self.daemon.url + path,
            json=body,
            headers={"Authorization": f"Bearer {token}"},
            timeout=timeout,
        )
        resp.raise_for_status()
        return resp.json()

    def close(self) -> None:
        """Stop the daemon (SIGTERM, then SIGKILL if it hangs); never raises."""
        proc = self.daemon.proc
        if proc is None:
            return
        try:
            self.daemon.stop(timeout=30)
        except AssertionError:
            pass
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)


# -- processes --------------------------------------------------------------------------------

_TICK = os.sysconf("SC_CLK_TCK")


def children_of(pid: int) -> list[int]:
    """Every live descendant of `pid` (from /proc/*/stat)."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        parents.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def memory_kb(pid: int) -> dict[str, int]:
    """{"rss": kB, "pss": kB} of `pid` (PSS counts shared pages once, split among sharers)."""
    out = {"rss": 0, "pss": 0}
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("Rss", "Pss"):
                out[key.lower()] = int(rest.split()[0])
    except OSError:
        pass
    return out


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of `pid` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except OSError:
        return ""
