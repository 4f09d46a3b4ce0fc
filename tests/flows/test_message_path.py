"""The message path end to end (issue 11): dead letters, bounded queues, kills with full queues.

Real daemon, real pushes, real step processes, the real state database (read-only from here).
The component: a trigger emitting `burst` counted messages per call (its snapshot holds the
count), a `work` action that fails a known subset (raises for n % fail_every == 0, asks for n
in `rebound_on` to be delivered again, records every delivery in `attempts`), and a `sink`
appending {n, id, by, pid} lines to its `out` file (optionally slow, `delay`). So "the n
values at the sink plus the dead letters are exactly 1..N" proves nothing was lost, and the
message ids tell a redelivered side effect (same id) from a message queued twice (new id).
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import HTTP, Daemon, Work, db_rows, dead_letter_rows, wait_until
from tests.flows.conftest import FlowEnv, flow_toml, read_out

DESC: dict[str, Any] = {
    "title": "Message path",
    "runtime": "python",
    "triggers": {"burst": {"main": "./lib/burst.py"}},
    "actions": {
        "work": {"main": "./lib/work.py"},
        "sink": {"main": "./lib/sink.py", "fields": {"out": {"required": True}}},
    },
}

BURST = """\
def process(msg, cfg, snapshot, ctx):
    n = snapshot.get("n", 0)
    burst = int(cfg.get("burst") or 1)
    if cfg.get("limit"):
        burst = min(burst, int(cfg["limit"]) - n)
    if burst <= 0:
        return None
    ctx.emit("snapshot", {"n": n + burst})
    return [{"n": n + i} for i in range(1, burst + 1)]
"""

WORK = """\
import json


def _check(n, every):
    if every and n % every == 0:
        raise ValueError(f"marker-FAIL {n}")


def process(msg, cfg, snapshot, ctx):
    n = int(msg["body"]["n"])
    if cfg.get("attempts"):
        with open(cfg["attempts"], "a") as fh:
            fh.write(f"{n}\\n")
    _check(n, int(cfg.get("fail_every") or 0))
    if str(n) in str(cfg.get("rebound_on") or "").split(","):
        ctx.emit("rebound", f"marker-REBOUND {n}")
        return None
    return {**msg["body"], "src": msg["id"]}
"""

SINK = """\
import json, os, time
TAG = "v1"


def process(msg, cfg):
    if cfg.get("delay"):
        time.sleep(float(cfg["delay"]))
    line = {"n": msg["body"]["n"], "id": msg["id"], "by": TAG, "pid": os.getpid()}
    with open(cfg["out"], "a") as fh:
        fh.write(json.dumps(line) + "\\n")
"""

FILES: dict[str, Any] = {
    "component.json": DESC,
    "lib/burst.py": BURST,
    "lib/work.py": WORK,
    "lib/sink.py": SINK,
}

# The daemon's wall clock (`time.time()`, read only by the rebound back-off and log retention)
# made to run faster, through a sitecustomize on the daemon's PYTHONPATH: the back-off (1 s
# doubling to 60 s, 10 tries: about 4 minutes) has no setting a test could shorten.
FAST_CLOCK = """\
import os, time

_speed = float(os.environ.get("DEPLOYD_TEST_CLOCK_SPEED") or 0)
if _speed > 1:
    _mono, _start = time.monotonic, time.time()
    _origin = _mono()
    time.time = lambda: _start + (_mono() - _origin) * _speed
"""
CLOCK_SPEED = 100


@pytest.fixture
def mp_env(
    daemon_factory: Callable[..., Daemon], component: Callable[..., Work], tmp_path: Path
) -> Callable[..., FlowEnv]:
    """mp_env(fast_clock=False, **daemon_keys) → a daemon with this module's component as
    hello v1."""

    def make(fast_clock: bool = False, **daemon_keys: Any) -> FlowEnv:
        work = component("hello")
        work.commit("message path component", FILES)
        d = daemon_factory(**daemon_keys)
        if fast_clock:
            site = tmp_path / "fastclock"
            site.mkdir()
            (site / "sitecustomize.py").write_text(FAST_CLOCK)
            path = os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))
            d.env = {"PYTHONPATH": path, "DEPLOYD_TEST_CLOCK_SPEED": str(CLOCK_SPEED)}
        d.start()
        env = FlowEnv(d, work, tmp_path)
        d.wait_recent("hello", work.push(d.hosted("hello")), timeout=30)
        return env

    return make


def steps(
    out: Path,
    *,
    tick: dict[str, Any] | None = None,
    work: dict[str, Any] | None = None,
    sink: dict[str, Any] | None = None,
    with_work: bool = True,
) -> list[dict[str, Any]]:
    """tick (burst) → work → write (sink), or tick → write; each dict adds step keys,
    "config" merged."""

    def step(
        sid: str, function: str, extra: dict[str, Any] | None, **config: Any
    ) -> dict[str, Any]:
        extra = dict(extra or {})
        merged = {**config, **extra.pop("config", {})}
        return {"id": sid, "component": "hello", "function": function, **extra} | (
            {"config": merged} if merged else {}
        )

    return [
        step("tick", "burst", {"interval": "20ms", **(tick or {})}),
        *([step("work", "work", work)] if with_work else []),
        step("write", "sink", sink, out=out),
    ]


def letters(env: FlowEnv, flow: str) -> list[dict[str, Any]]:
    return dead_letter_rows(env.daemon.state_dir, flow)


def produced(env: FlowEnv, flow: str) -> int:
    rows = db_rows(
        env.daemon.state_dir,
        "SELECT data FROM snapshots WHERE flow = ? AND step = 'tick'",
        flow,
    )
    return int(json.loads(rows[0]["data"]).get("n", 0)) if rows else 0


def depth(env: FlowEnv, flow: str, step: str | None = None) -> int:
    sql = "SELECT COUNT(*) AS n FROM messages WHERE flow = ?"
    args: tuple[Any, ...] = (flow,)
    if step is not None:
        sql += " AND step = ?"
        args += (step,)
    return int(db_rows(env.daemon.state_dir, sql, *args)[0]["n"])


def step_status(env: FlowEnv, flow: str, step: str) -> dict[str, Any]:
    return next(s for s in env.flow(flow)["steps"] if s["id"] == step)


def ns(rows: list[dict[str, Any]]) -> list[int]:
    return [int(r["n"]) for r in rows]


class DepthSampler(threading.Thread):
    """Samples one queue's depth from the state database every few ms (read-only, from this
    process): the most it ever held."""

    def __init__(self, state_dir: Path, flow: str, step: str) -> None:
        super().__init__(daemon=True)
        self.db = state_dir / "deployd.db"
        self.flow, self.step = flow, step
        self.max = 0
        self.samples = 0
        self.done = threading.Event()

    def run(self) -> None:
        conn = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=5)
        try:
            while not self.done.is_set():
                try:
                    (n,) = conn.execute(
                        "SELECT COUNT(*) FROM messages WHERE flow = ? AND step = ?",
                        (self.flow, self.step),
                    ).fetchone()
                except sqlite3.OperationalError:  # the daemon restarting, a busy moment
                    continue
                self.max = max(self.max, int(n))
                self.samples += 1
                self.done.wait(0.003)
        finally:
            conn.close()

    def __enter__(self) -> DepthSampler:
        self.start()
        wait_until(lambda: self.samples > 0, timeout=30)
        return self

    def __exit__(self, *exc: object) -> None:
        self.done.set()
        self.join(10)


@pytest.fixture
def samplers() -> Iterator[list[DepthSampler]]:
    made: list[DepthSampler] = []
    yield made
    for sampler in made:
        sampler.done.set()


# -- dead letters -----------------------------------------------------------------------------


def test_a_python_step_that_raises_makes_dead_letters_with_the_traceback(
    mp_env: Callable[..., FlowEnv],
) -> None:
    env = mp_env()
    out = env.out("raises")
    env.apply(
        flow_toml(
            "raises",
            out,
            steps=steps(out, tick={"config": {"limit": 21}}, work={"config": {"fail_every": 7}}),
        )
    )
    wait_until(lambda: len(letters(env, "raises")) >= 3, timeout=60)
    wait_until(lambda: len(read_out(out)) >= 18, timeout=60)
    wait_until(lambda: depth(env, "raises") == 0, timeout=30)
    assert ns(read_out(out)) == [n for n in range(1, 22) if n % 7], "the others flowed on"
    got = letters(env, "raises")
    assert [r["body"]["n"] for r in got] == [7, 14, 21]
    for row in got:
        n = row["body"]["n"]
        assert row["step"] == "work"
        assert row["body"] == {"n": n}  # the input message, as it came
        assert row["headers"] == {}
        assert row["msg_id"]
        assert (row["flow_version"], row["component"], row["component_version"]) == (
            1,
            "hello",
            1,
        )
        assert row["attempts"] == 1
        assert row["emitted"] == []
        lines = row["error"].splitlines()
        assert lines[0] == f"ValueError: marker-FAIL {n}", row["error"]
        assert lines[1] == ""
        assert lines[2] == "Traceback (most recent call last):", row["error"]
        assert 'lib/work.py", line' in row["error"]
        assert "in process" in row["error"] and "in _check" in row["error"]
        assert lines[-1] == f"ValueError: marker-FAIL {n}"
    stats = db_rows(
        env.daemon.state_dir, "SELECT * FROM step_stats WHERE flow = 'raises' AND step = 'work'"
    )
    assert stats[0]["failed"] == 3 and stats[0]["processed"] == 21


def test_a_mapping_error_and_the_rebound_limit_both_dead_letter(
    mp_env: Callable[..., FlowEnv],
) -> None:
    """The daemon's clock runs CLOCK_SPEED times faster, so the ten rebounds take seconds (an
    endless trigger keeps the step busy meanwhile, as a real flow would)."""
    env = mp_env(fast_clock=True)
    out = env.out("mapped")
    attempts = env.tmp / "attempts"
    failing = 'n % 5 = 0 ? $error("marker-MAP " & $string(n)) : {"n": n}'
    env.apply(
        flow_toml(
            "mapped",
            out,
            steps=steps(
                out,
                tick={"interval": "10ms"},
                work={"config": {"rebound_on": "3", "attempts": attempts}},
                sink={"mapping": failing},
            ),
        )
    )

    def tried(n: int) -> int:
        return attempts.read_text().split().count(str(n)) if attempts.exists() else 0

    wait_until(lambda: any(r["step"] == "work" for r in letters(env, "mapped")), timeout=90)
    rows = read_out(out)
    got = letters(env, "mapped")
    [rebound] = [r for r in got if r["step"] == "work"]
    assert rebound["body"] == {"n": 3}
    first = rebound["error"].splitlines()[0]
    assert "rebound" in first and "marker-REBOUND 3" in first, rebound["error"]
    assert (rebound["attempts"], rebound["flow_version"]) == (1, 1)
    assert tried(3) == 10, "README: after 10 tries it is an error"
    mapper = [r for r in got if r["step"] == "write:mapper"]
    fives = [r["body"]["n"] for r in mapper]
    assert fives == list(range(5, 5 * len(fives) + 1, 5)), fives  # every one, in order
    assert len(fives) >= 5
    for row in mapper:
        n = row["body"]["n"]
        assert set(row["body"]) == {"n", "src"}  # work's output, before the mapping
        assert f"marker-MAP {n}" in row["error"].splitlines()[0], row["error"]
        assert (row["flow_version"], row["attempts"]) == (1, 1)
    last = ns(rows)[-1]
    assert ns(rows) == [n for n in range(1, last + 1) if n != 3 and n % 5], "the rest flowed"
    assert fives[-1] >= last - 5


# -- backpressure -----------------------------------------------------------------------------


def test_a_trigger_ten_times_faster_than_its_sink_is_held_back_and_resumes(
    mp_env: Callable[..., FlowEnv], samplers: list[DepthSampler]
) -> None:
    """5 messages every 5 ms offered (~1000/s), a sink taking 10 ms a message (<100/s), its
    queue limited to 50: the queue never holds more than 50 + one call's output, the trigger
    shows backpressure while held, and resumes as the sink drains the queue; all 400 are
    handled once, in order."""
    env = mp_env()
    out = env.out("fast")
    limit, burst, total = 50, 5, 400
    flow = steps(
        out,
        tick={"interval": "5ms", "config": {"burst": burst, "limit": total}},
        sink={"max_queue": limit, "config": {"delay": 0.01}},
        with_work=False,
    )
    sampler = DepthSampler(env.daemon.state_dir, "fast", "write")
    samplers.append(sampler)
    with sampler:
        env.apply(flow_toml("fast", out, steps=flow))
        wait_until(lambda: step_status(env, "fast", "tick")["backpressure"], timeout=60)
        held_at = produced(env, "fast")
        assert held_at < total, "held back before it could emit everything"
        assert depth(env, "fast", "write") >= limit - burst - 16  # full (less the sink's hand)
        wait_until(lambda: produced(env, "fast") > held_at, timeout=60)  # it resumed
        wait_until(lambda: len(read_out(out)) >= total, timeout=120)
        wait_until(lambda: depth(env, "fast") == 0, timeout=30)
        wait_until(lambda: not step_status(env, "fast", "tick")["backpressure"], timeout=30)
    assert sampler.max <= limit + burst, f"the queue held {sampler.max} (limit {limit})"
    assert sampler.max >= limit - burst, sampler.max
    rows = read_out(out)
    assert ns(rows) == list(range(1, total + 1)), "nothing lost or handled twice"
    assert produced(env, "fast") == total


# -- kills with full queues and dead letters --------------------------------------------------

KILL_TOTAL = 500


def _kill_flow(env: FlowEnv, out: Path, prefetch: int) -> str:
    """A fast trigger → work failing n % 7 == 0 → a slow sink, queues limited to 50: the
    queues stay full and dead letters accumulate while the test kills things."""
    flow = steps(
        out,
        tick={"interval": "5ms", "config": {"burst": 5, "limit": KILL_TOTAL}},
        work={"max_queue": 50, "config": {"fail_every": 7}},
        sink={"max_queue": 50, "prefetch": prefetch, "config": {"delay": 0.01}},
    )
    env.apply(flow_toml("kills", out, steps=flow))
    return "kills"


def _full_with_letters(env: FlowEnv, flow: str, out: Path, more_than: int = 0) -> None:
    wait_until(lambda: len(letters(env, flow)) > more_than + 2, timeout=90)
    wait_until(lambda: depth(env, flow, "write") >= 30, timeout=60)
    wait_until(lambda: read_out(out), timeout=60)


def _intact(before: list[dict[str, Any]], after: list[dict[str, Any]]) -> None:
    """Every letter there before is still there, unchanged."""
    now = {r["id"]: r for r in after}
    for row in before:
        assert now.get(row["id"]) == row, f"letter {row['id']} changed or gone"


def _check_exactly_once(env: FlowEnv, flow: str, out: Path, kills: int, prefetch: int) -> None:
    """n = 1..KILL_TOTAL each handled at the sink or (n % 7 == 0) a dead letter, exactly once
    in the queues; a side effect repeated only for messages in hand at a kill."""
    wait_until(lambda: produced(env, flow) == KILL_TOTAL, timeout=120)
    wait_until(lambda: depth(env, flow) == 0, timeout=120)
    got = letters(env, flow)
    dead = Counter(int(r["body"]["n"]) for r in got)
    assert {r["step"] for r in got} == {"work"}
    assert dead == Counter(range(7, KILL_TOTAL + 1, 7)), "each failing message dead once"
    rows = read_out(out)
    ids: dict[int, set[str]] = {}
    for r in rows:
        ids.setdefault(int(r["n"]), set()).add(r["id"])
    assert sorted(ids) == [n for n in range(1, KILL_TOTAL + 1) if n % 7], "nothing lost"
    queued_twice = {n: i for n, i in ids.items() if len(i) > 1}
    assert not queued_twice, f"messages queued twice (new ids): {queued_twice}"
    repeated = len(rows) - len(ids)  # the same message (same id) written again
    assert repeated <= kills * prefetch, f"{repeated} side effects repeated after {kills} kills"


def test_kill_9_of_the_daemon_with_full_queues_and_dead_letters(
    mp_env: Callable[..., FlowEnv],
) -> None:
    env = mp_env()
    out = env.out("kills")
    flow = _kill_flow(env, out, prefetch=1)
    kills = 0
    seen = 0
    for _ in range(2):
        _full_with_letters(env, flow, out, more_than=seen)
        before = letters(env, flow)
        seen = len(before)
        env.daemon.kill()
        kills += 1
        _intact(before, letters(env, flow))
        env.daemon.start()
        _intact(before, letters(env, flow))  # the restart changed none of them
    _check_exactly_once(env, flow, out, kills, prefetch=1)


def test_kill_9_of_step_processes_with_full_queues_and_dead_letters(
    mp_env: Callable[..., FlowEnv],
) -> None:
    """The sink killed in the middle of its prefetched messages (prefetch 16) while its queue
    is full, `work` killed while held back by that queue, dead letters accumulating all the
    while."""
    env = mp_env()
    out = env.out("kills")
    prefetch = 16
    flow = _kill_flow(env, out, prefetch=prefetch)
    seen = 0
    sink_kills = 0
    for step in ("write", "work", "write", "work"):
        _full_with_letters(env, flow, out, more_than=seen)
        before = letters(env, flow)
        seen = len(before)
        pid = wait_until(lambda step=step: step_status(env, flow, step)["pid"], timeout=30)
        os.kill(pid, signal.SIGKILL)
        sink_kills += step == "write"
        wait_until(
            lambda step=step, pid=pid: step_status(env, flow, step)["pid"] not in (None, pid),
            timeout=60,
        )
        _intact(before, letters(env, flow))
    _check_exactly_once(env, flow, out, sink_kills, prefetch=prefetch)
    assert "never retrieved" not in env.daemon.log()


def _parent(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("PPid:"):
            return int(line.split()[1])
    raise AssertionError(f"no parent of {pid}")


def _answers(daemon: Daemon) -> bool:
    try:
        return HTTP.get(daemon.url + "/healthz", timeout=3).status_code == 200
    except httpx.HTTPError:
        return False


def test_a_step_process_killed_while_idle_does_not_freeze_the_daemon(
    mp_env: Callable[..., FlowEnv],
) -> None:
    """An idle sink (a message every 50 ms, handled at once) is killed; its exit report is
    held up (the fork server stopped for the moment, as a loaded machine delays it), and the
    next message arrives before it: the daemon must go on answering and restart the sink.
    (Its action loop once spun on the dead process without yielding: the daemon froze.)"""
    env = mp_env()
    out = env.out("idle")
    env.apply(flow_toml("idle", out, steps=steps(out, tick={"interval": "50ms"}, with_work=False)))
    wait_until(lambda: len(read_out(out)) >= 3, timeout=60)
    assert env.daemon.proc is not None
    pid = int(step_status(env, "idle", "write")["pid"])
    forkserver = _parent(pid)
    assert _parent(forkserver) == env.daemon.proc.pid, "the fork server is this daemon's child"
    os.kill(forkserver, signal.SIGSTOP)
    try:
        os.kill(pid, signal.SIGKILL)
        had = len(read_out(out))
        wait_until(lambda: depth(env, "idle", "write") > 0, timeout=30)  # work arrived
        answered = _answers(env.daemon)
    finally:
        os.kill(forkserver, signal.SIGCONT)
    assert answered, "the daemon stopped answering after the step was killed"
    wait_until(lambda: step_status(env, "idle", "write")["pid"] not in (None, pid), timeout=60)
    wait_until(lambda: len(read_out(out)) > had, timeout=60)
