"""Flow fixtures: a daemon hosting a counting component, flow files, and the flow's output.

The counter component's trigger counts through its step snapshot; its `write` action
appends one JSON line per message to the file named by its `out` field, tagged with the
code's `TAG`. So "the n values in the out file are exactly 1..N" proves no message was lost
or duplicated, and the tags show which code version handled each message.
"""

from __future__ import annotations

import json
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import Daemon, SharedDaemons, Work, db_rows, wait_until

COUNTER_DESC: dict[str, Any] = {
    "title": "Counter",
    "runtime": "python",
    "triggers": {
        "ticker": {
            "main": "./lib/ticker.py",
            "title": "Ticker",
            "fields": {"prefix": {"label": "Prefix", "required": False}},
        }
    },
    "actions": {
        "write": {
            "main": "./lib/write.py",
            "title": "Write",
            "fields": {"out": {"label": "Output file", "required": True}},
        },
        "upper": {"main": "./lib/upper.py", "title": "Upper"},
    },
}

TICKER = """\
def process(msg, cfg, snapshot, ctx):
    n = snapshot.get("n", 0) + 1
    ctx.emit("snapshot", {"n": n})
    return {"text": f"{cfg.get('prefix', 'hi')} {n}", "n": n}
"""


def writer(tag: str, extra: str = "") -> str:
    """An action appending {**body, "by": tag} lines to cfg["out"]; `extra` is module code."""
    return textwrap.dedent(
        """\
        import json, os
        TAG = {tag!r}
        {extra}

        def process(msg, cfg):
            body = msg["body"]
            line = {{**body, "by": TAG}}
            with open(cfg["out"], "a") as fh:
                fh.write(json.dumps(line) + "\\n")
            return line
        """
    ).format(tag=tag, extra=textwrap.dedent(extra))


UPPER = """\
def process(msg, cfg):
    return {**msg["body"], "text": str(msg["body"].get("text", "")).upper()}
"""


# An action that records every attempt, waits while a "hold" file exists, then writes
# (config: attempts, hold, out; optional pause, tag).
HOLDING_WRITER = """\
import json, os, time

def process(msg, cfg):
    body = msg["body"]
    with open(cfg["attempts"], "a") as fh:
        fh.write(f"{body['n']}\\n")
    while os.path.exists(cfg["hold"]):
        time.sleep(0.01)
    if cfg.get("pause"):
        time.sleep(float(cfg["pause"]))
    with open(cfg["out"], "a") as fh:
        fh.write(json.dumps({**body, "by": cfg.get("tag", "v1")}) + "\\n")
"""


def counter_files(tag: str = "v1", **overrides: Any) -> dict[str, Any]:
    files: dict[str, Any] = {
        "component.json": COUNTER_DESC,
        "lib/ticker.py": TICKER,
        "lib/write.py": writer(tag),
        "lib/upper.py": UPPER,
    }
    files.update(overrides)
    return files


def flow_toml(
    name: str,
    out: Path | str,
    *,
    interval: str = "50ms",
    update: str = "auto",
    steps: list[dict[str, Any]] | None = None,
    component: str = "hello",
    retry_errors: str | None = None,
    type_: str = "realtime",
    keys: dict[str, str] | None = None,
) -> str:
    """A flow file: tick (ticker) → write (write, out=`out`), unless `steps` is given;
    `keys`: more top-level keys (an ordinary flow's `every`, `overlap`, …), as strings."""
    if steps is None:
        steps = [
            {"id": "tick", "component": component, "function": "ticker", "interval": interval},
            {"id": "write", "component": component, "function": "write", "config": {"out": out}},
        ]
    lines = [f'name = "{name}"', f'type = "{type_}"', f'update = "{update}"']
    lines += [f"{key} = {json.dumps(value)}" for key, value in (keys or {}).items()]
    if retry_errors is not None:
        lines.append(f'retry_errors = "{retry_errors}"')
    for step in steps:
        lines.append("[[steps]]")
        for key, value in step.items():
            if isinstance(value, dict):
                inner = ", ".join(f"{k} = {json.dumps(str(v))}" for k, v in value.items())
                lines.append(f"{key} = {{ {inner} }}")
            elif isinstance(value, int):
                lines.append(f"{key} = {value}")
            else:
                lines.append(f"{key} = {json.dumps(str(value))}")
    return "\n".join(lines) + "\n"


def read_out(path: Path) -> list[dict[str, Any]]:
    """The JSON lines of an out file (a partly written last line is ignored)."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            break
    return rows


def assert_contiguous(rows: list[dict[str, Any]]) -> None:
    """The n values are exactly 1..N, in order: nothing lost, nothing duplicated."""
    ns = [r["n"] for r in rows]
    assert ns == list(range(1, len(ns) + 1)), f"not contiguous: {ns}"


# The fields of one deployment in `deployd deploys --json` (store/flows.py).
DEPLOYMENT_FIELDS = (
    "id, flow, from_version, to_version, trigger, component, component_version, sha, status,"
    " reason, log_tail, warmup_ms, gap_ms, started_at, finished_at, redriven"
)


@dataclass
class FlowEnv:
    """A running daemon hosting component `hello`, and helpers to drive flows on it."""

    daemon: Daemon
    work: Work
    tmp: Path
    name: str = "hello"  # the component's

    def push(self, files: dict[str, Any] | None = None, message: str = "change") -> str:
        """Commit `files`, push to the hosted repository, wait until it is the recent version."""
        sha = self.work.commit(message, files)
        self.work.push(self.daemon.hosted(self.name))
        self.daemon.wait_recent(self.name, sha, timeout=30)
        return sha

    def out(self, name: str = "out") -> Path:
        return self.tmp / f"{name}.jsonl"

    def queued(self, step: str) -> float:
        """The queue depth of `step`, as /metrics reports it (on either runtime)."""
        text = httpx.get(self.daemon.url + "/metrics", timeout=5).text
        for line in text.splitlines():
            if line.startswith("deployd_step_queue_depth{") and f'step="{step}"' in line:
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    def write_flow(self, text: str, name: str = "flow") -> Path:
        path = self.tmp / f"{name}.toml"
        path.write_text(text)
        return path

    def apply(self, text: str, *args: str, check: bool = True) -> Any:
        return self.daemon.cli("flow", "apply", str(self.write_flow(text)), *args, check=check)

    def counter(self, name: str = "counter", **kw: Any) -> Path:
        """Apply the standard counter flow; returns its out file once it has output."""
        out = self.out(name)
        self.apply(flow_toml(name, out, **kw))
        wait_until(lambda: read_out(out), timeout=30)
        return out

    def flow(self, name: str) -> dict[str, Any]:
        for f in self.daemon.status()["flows"]:
            if f["name"] == name:
                return dict(f)
        raise AssertionError(f"flow {name} not in status")

    def show(self, name: str) -> dict[str, Any]:
        return dict(json.loads(self.daemon.cli("flow", "show", name, "--json").stdout))

    def wait_draft(self, name: str, timeout: float = 30) -> dict[str, Any]:
        """The draft of flow `name` (from `flow show --json`), once it has one.

        Polled on the state database (read-only), then the CLI is asked: a `flow show` per
        poll round is a Python start, ~0.5 s of CPU taken from the daemon under test.
        """
        sql = "SELECT 1 FROM drafts WHERE flow = ?"
        wait_until(lambda: db_rows(self.daemon.state_dir, sql, name), timeout=timeout)
        return dict(wait_until(lambda: self.show(name)["draft"], timeout=timeout))

    def deploys(self) -> list[dict[str, Any]]:
        return list(json.loads(self.daemon.cli("deploys", "--json").stdout))

    def wait_deploy(self, flow: str, to_version: int, timeout: float = 30) -> dict[str, Any]:
        """The deployment of `flow` to `to_version` (from `deploys --json`), once finished.

        The wait polls the state database (read-only); the CLI is asked once, at the end:
        a CLI call per poll round is a Python start, ~0.5 s of CPU taken from the daemon.
        """

        def finished() -> bool:
            return bool(
                db_rows(
                    self.daemon.state_dir,
                    "SELECT 1 FROM deployments WHERE flow = ? AND to_version = ?"
                    " AND finished_at IS NOT NULL",
                    flow,
                    to_version,
                )
            )

        wait_until(finished, timeout=timeout, interval=0.05)
        for d in self.deploys():
            if d["flow"] == flow and d["to_version"] == to_version and d["finished_at"]:
                return dict(d)
        raise AssertionError(f"finished deployment of {flow} to v{to_version} not in deploys")

    def wait_deploys(self, pred: Callable[[list[dict[str, Any]]], Any], timeout: float = 30) -> Any:
        """Until `pred(deploys)` holds on `deploys --json` (newest first); returns its value.

        The wait runs on the state database's rows (the same fields), then the CLI is asked:
        a CLI call per poll round is a Python start, ~0.5 s of CPU taken from the daemon.
        """
        sql = f"SELECT {DEPLOYMENT_FIELDS} FROM deployments ORDER BY id DESC LIMIT 50"
        wait_until(lambda: pred(db_rows(self.daemon.state_dir, sql)), timeout=timeout)
        return wait_until(lambda: pred(self.deploys()), timeout=timeout)

    def wait_by(self, out: Path, tag: str, count: int = 1, timeout: float = 30) -> None:
        """Until `count` lines written by code tagged `tag` are in `out`."""
        wait_until(
            lambda: sum(1 for r in read_out(out) if r["by"] == tag) >= count, timeout=timeout
        )

    def wait_more(self, out: Path, more: int = 3, timeout: float = 30) -> list[dict[str, Any]]:
        """Until `out` has grown by `more` lines; returns all of them."""
        have = len(read_out(out))
        wait_until(lambda: len(read_out(out)) >= have + more, timeout=timeout)
        return read_out(out)


@pytest.fixture
def make_env(
    daemon_factory: Callable[..., Daemon],
    component: Callable[..., Work],
    tmp_path: Path,
) -> Callable[..., FlowEnv]:
    """make_env(files=None, **daemon_keys) → a started daemon with `hello` v1 registered."""

    def make(files: dict[str, Any] | None = None, **daemon_keys: Any) -> FlowEnv:
        work = component("hello")
        work.commit("counter component", files or counter_files())
        d = daemon_factory(**daemon_keys).start()
        env = FlowEnv(d, work, tmp_path)
        sha = work.push(d.hosted("hello"))
        d.wait_recent("hello", sha, timeout=30)
        return env

    return make


@pytest.fixture
def shared_make_env(shared_daemon: SharedDaemons, tmp_path: Path) -> Callable[..., FlowEnv]:
    """shared_make_env(files=None, name="hello", env=None, **daemon_keys) → make_env's FlowEnv,
    on the test module's shared daemon (tests/conftest.py's SharedDaemons): for tests that
    neither stop, restart or kill the daemon nor change its config. Component `name` is at
    v1 (`files`) and shared by the module's tests asking for it: a test that pushes takes a
    `name` of its own. `env`: more environment for the daemon (the same for every test of
    the module). The test's flows are stopped at its end; its files are in its tmp_path."""

    def make(
        files: dict[str, Any] | None = None,
        name: str = "hello",
        env: dict[str, str] | None = None,
        **daemon_keys: Any,
    ) -> FlowEnv:
        d = shared_daemon.daemon(env, **daemon_keys)
        work = shared_daemon.component(d, name, files or counter_files())
        return FlowEnv(d, work, tmp_path, name)

    return make


@pytest.fixture
def env(make_env: Callable[..., FlowEnv]) -> FlowEnv:
    """A daemon with the counter component registered as hello v1 (no flow yet)."""
    return make_env()
