"""The runtime contract: one suite of behaviour tests run against every `Runtime`.

Written purely against `runtime/base.py` (as huey's storage tests are against its storage
interface): the `contract` fixture is parametrised over every implementation, each built by a
small factory in `RUNTIMES`. A new runtime adds one entry there and must pass unchanged.
What a test observes is only what the interface reports (`status()`, `queue_depths()`,
`next_exit()`, what `warm_up` and `switch` return or raise) and what the steps themselves do:
a sink step appends every message it handles to a file, tagged with its code's version and
process id; every step module appends its pid to a `pids` file in its own folder at import.

Component versions are plain folders (a RunStep's `artifact_dir` with its `main` module):
no git or build is needed here. The tests are async; with no pytest async plugin, each one
drives its scenario with `asyncio.run` (bounded by `SCENARIO_TIMEOUT`) and waits only with
bounded polls (`until`), never fixed sleeps.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import textwrap
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from deployd.config import Config, DaemonConfig, RabbitConfig, RuntimeConfig
from deployd.metrics import Metrics
from deployd.paths import Paths
from deployd.runtime.base import FlowRun, RunNotSupported, RunOutcome, Runtime, StepFailed
from deployd.runtime.factory import create_runtime
from deployd.store import Store
from deployd.types import FlowVersionToRun, RunStep, StepExit, StepKind, StepState
from tests.conftest import dead_letter_rows
from tests.flows.conftest import read_out

FLOW = "contract"
WAIT = 30.0  # the longest any condition is waited for (a loaded 2-core box)
WARMUP = 30.0  # warm-up timeout for versions that should come up
SCENARIO_TIMEOUT = 100.0  # below pytest-timeout's 120 s, so teardown still runs


# -- one factory per implementation ---------------------------------------------------------

RuntimeFactory = Callable[[Path], AbstractAsyncContextManager[Runtime]]


@asynccontextmanager
async def embedded(state: Path) -> AsyncIterator[Runtime]:
    """The embedded runtime on a real state dir (SQLite queues, forked step processes)."""
    paths = Paths(state)
    for folder in paths.dirs():
        folder.mkdir(parents=True, exist_ok=True)
    store = Store.open(paths.db)
    # node_pool = 0: this suite runs Python steps only; no idle Node sailors to start.
    config = Config(daemon=DaemonConfig(state_dir=state, node_pool=0))
    runtime = create_runtime(config, store, paths, Metrics())
    try:
        await runtime.start()
        yield runtime
    finally:
        await runtime.close()
        store.close()


# The broker (its own vhost) each state dir's RabbitMQ runtime uses: set by `contract`.
AMQP_URLS: dict[Path, str] = {}


@asynccontextmanager
async def rabbitmq(state: Path) -> AsyncIterator[Runtime]:
    """The RabbitMQ runtime on a real broker (a vhost of its own) and a real state dir: step
    processes forked here, queues in quorum queues, snapshots and letters in SQLite."""
    paths = Paths(state)
    for folder in paths.dirs():
        folder.mkdir(parents=True, exist_ok=True)
    store = Store.open(paths.db)
    config = Config(
        daemon=DaemonConfig(state_dir=state, node_pool=0),
        runtime=RuntimeConfig(
            default="rabbitmq", rabbitmq=RabbitConfig(url=SecretStr(AMQP_URLS[state]))
        ),
    )
    runtime = create_runtime(config, store, paths, Metrics())
    try:
        await runtime.start()
        yield runtime
    finally:
        await runtime.close()
        store.close()


# Each factory yields a started runtime and closes it afterwards. Two runtimes made for the
# same `state` share its durable part (queues, snapshots): a daemon restarted on its state.
RUNTIMES: dict[str, RuntimeFactory] = {"embedded": embedded, "rabbitmq": rabbitmq}


# -- component code -------------------------------------------------------------------------

# Every module records the pid of the process that imported it (to prove none is left).
PRELUDE = """\
import json, os, sys, time
with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "pids"), "a") as _fh:
    _fh.write(f"{os.getpid()}\\n")
TAG = {tag!r}
"""

# Counts through its snapshot; emits {"n", "trigger": TAG} until cfg["limit"] (if any).
TRIGGER = """\
def startup(cfg):
    return {"token": 42, "by": TAG}


def shutdown(cfg, data):
    with open(cfg["shutdown_out"], "w") as fh:
        fh.write(json.dumps(data))


def process(msg, cfg, snapshot, ctx):
    n = snapshot.get("n", 0) + 1
    if cfg.get("limit") is not None and n > int(cfg["limit"]):
        return None
    ctx.emit("snapshot", {"n": n})
    print(f"{TAG}: emitting {n}")
    return {"n": n, "trigger": TAG}
"""

PASS = """\
def process(msg, cfg):
    return {**msg["body"], "work": TAG}
"""

# Records each attempt, crashes / holds / lingers as configured, then writes the message.
SINK = """\
def process(msg, cfg):
    body = msg["body"]
    if cfg.get("attempts"):
        with open(cfg["attempts"], "a") as fh:
            fh.write(json.dumps(body["n"]) + "\\n")
    if cfg.get("crash"):
        print(f"{TAG}: crashing on {body['n']}", flush=True)
        os._exit(1)
    while cfg.get("hold") and os.path.exists(cfg["hold"]):
        time.sleep(0.01)
    if cfg.get("delay"):
        time.sleep(float(cfg["delay"]))
    with open(cfg["out"], "a") as fh:
        fh.write(json.dumps({**body, "by": TAG, "pid": os.getpid()}) + "\\n")
"""

BROKEN_IMPORT = """\
print("loading the broken module", flush=True)
raise RuntimeError("marker-IMPORT: this module cannot be imported")
"""

HANGING_INIT = """\
def init(cfg):
    print("init: waiting for marker-HANG forever", flush=True)
    time.sleep(3600)


def process(msg, cfg):
    return msg["body"]
"""


# -- the harness ----------------------------------------------------------------------------


class Session:
    """One runtime; tracks the runs it warmed up, so teardown stops every one of them."""

    def __init__(self, runtime: Runtime) -> None:
        self.rt = runtime
        self.runs: list[FlowRun] = []

    async def warm_up(self, spec: FlowVersionToRun, timeout: float = WARMUP) -> FlowRun:
        run = await self.rt.warm_up(spec, timeout)
        self.runs.append(run)
        return run

    async def start(self, spec: FlowVersionToRun) -> FlowRun:
        """Warm `spec` up and run it (no other version of the flow runs)."""
        run = await self.warm_up(spec)
        await self.rt.run(run)
        return run

    def depth(self, step: str) -> int:
        return self.rt.queue_depths().get((FLOW, step), 0)


class Contract:
    """Builds component versions and flow versions in tmp_path; opens runtimes on one state."""

    def __init__(self, name: str, tmp: Path) -> None:
        self.name = name
        self.tmp = tmp
        self.state = tmp / "state"
        self.hold = tmp / "hold"  # sinks configured with it wait while it exists
        self.out = tmp / "out.jsonl"
        self.attempts = tmp / "attempts"
        self._folders = 0

    @asynccontextmanager
    async def session(self) -> AsyncIterator[Session]:
        async with RUNTIMES[self.name](self.state) as runtime:
            session = Session(runtime)
            try:
                yield session
            finally:
                self.hold.unlink(missing_ok=True)  # a held sink must not hold the stop up
                for run in reversed(session.runs):
                    await run.stop()

    def step(
        self,
        sid: str,
        kind: StepKind,
        code: str,
        tag: str = "v1",
        *,
        interval: float = 0.02,
        mapping: str | None = None,
        max_queue: int | None = None,
        prefetch: int = 16,
        **config: Any,
    ) -> RunStep:
        """A step running `code` (with PRELUDE) from a new component version folder."""
        self._folders += 1
        folder = self.tmp / "versions" / f"{self._folders:03d}-{sid}-{tag}"
        folder.mkdir(parents=True)
        source = PRELUDE.replace("{tag!r}", repr(tag)) + "\n" + textwrap.dedent(code)
        (folder / "main.py").write_text(source)
        return RunStep(
            id=sid,
            kind=kind,
            component="contract",
            version=self._folders,
            function=sid,
            artifact_dir=str(folder),
            main="main.py",
            config={k: str(v) if isinstance(v, Path) else v for k, v in config.items()},
            mapping=mapping,
            interval=interval,
            max_queue=max_queue,
            prefetch=prefetch,
        )

    def trigger(self, tag: str = "v1", interval: float = 0.02, **config: Any) -> RunStep:
        config.setdefault("shutdown_out", self.tmp / "shutdown.json")
        return self.step("tick", StepKind.TRIGGER, TRIGGER, tag, interval=interval, **config)

    def sink(self, tag: str = "v1", sid: str = "sink", **config: Any) -> RunStep:
        return self.step(sid, StepKind.ACTION, SINK, tag, out=self.out, **config)

    @staticmethod
    def spec(version: int, *steps: RunStep) -> FlowVersionToRun:
        return FlowVersionToRun(flow=FLOW, version=version, steps=steps)

    def rows(self) -> list[dict[str, Any]]:
        return read_out(self.out)

    def tried(self) -> list[int]:
        if not self.attempts.exists():
            return []
        return [int(line) for line in self.attempts.read_text().split()]


@pytest.fixture(params=sorted(RUNTIMES))
def contract(request: pytest.FixtureRequest, tmp_path: Path) -> Contract:
    if request.param == "rabbitmq":
        AMQP_URLS[tmp_path / "state"] = request.getfixturevalue("amqp_url")
    return Contract(str(request.param), tmp_path)


def scenario(coro: Coroutine[Any, Any, None]) -> None:
    asyncio.run(asyncio.wait_for(coro, SCENARIO_TIMEOUT))


async def until(cond: Callable[[], Any], what: str, timeout: float = WAIT) -> Any:
    """Poll `cond` until it returns something truthy; fail after `timeout` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = cond()
        if value:
            return value
        if loop.time() > deadline:
            raise AssertionError(f"not within {timeout:g}s: {what} (last value: {value!r})")
        await asyncio.sleep(0.02)


async def bounded(awaitable: Awaitable[Any], what: str, timeout: float = WAIT) -> Any:
    try:
        return await asyncio.wait_for(awaitable, timeout)
    except TimeoutError:
        raise AssertionError(f"not within {timeout:g}s: {what}") from None


def alive(pid: int) -> bool:
    """Whether `pid` is a live process (a zombie, already dead, is not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def recorded_pids(*steps: RunStep) -> list[int]:
    pids: list[int] = []
    for step in steps:
        path = Path(step.artifact_dir) / "pids"
        if path.exists():
            pids += [int(p) for p in path.read_text().split()]
    return pids


def real_steps(run: FlowRun) -> dict[str, Any]:
    """Step id → StepStatus, mapper steps left out."""
    return {s.id: s for s in run.status() if s.kind != StepKind.MAPPER}


def states(run: FlowRun) -> dict[str, StepState]:
    return {sid: s.state for sid, s in real_steps(run).items()}


def all_in(run: FlowRun, state: StepState) -> bool:
    return all(s == state for s in states(run).values())


def stopped_and_gone(run: FlowRun) -> bool:
    return all(s.state == StepState.STOPPED and s.pid is None for s in real_steps(run).values())


def ns(rows: list[dict[str, Any]]) -> list[int]:
    return [int(r["n"]) for r in rows]


def assert_contiguous(rows: list[dict[str, Any]], start: int = 1) -> None:
    """Exactly start..N, each once, in order: nothing lost, nothing handled twice."""
    got = ns(rows)
    assert got == list(range(start, start + len(got))), f"not contiguous: {got}"


def assert_one_handover(tags: list[str], old: str, new: str) -> None:
    """`old` then `new`, never back: the versions did not interleave."""
    assert set(tags) <= {old, new}, tags
    if new in tags:
        first = tags.index(new)
        assert all(t == new for t in tags[first:]), f"{old} after {new}: {tags}"


# -- 1. warm-up -----------------------------------------------------------------------------


def test_warm_up_reports_every_step_ready_then_running(contract: Contract) -> None:
    """Warmed steps are ready (with local pids) and handle nothing until `run`; the trigger's
    startup()/shutdown() hooks run through `trigger_hook`; mapper steps are in `status`."""

    async def main() -> None:
        async with contract.session() as s:
            spec = contract.spec(
                1,
                contract.trigger(interval=0.05),
                contract.step(
                    "work",
                    StepKind.ACTION,
                    PASS,
                    mapping='{"n": n, "trigger": trigger, "mapped": true}',
                ),
                contract.sink(),
            )
            run = await s.warm_up(spec)
            assert run.spec == spec
            steps = real_steps(run)
            assert list(steps) == ["tick", "work", "sink"]  # flow order
            assert [st.kind for st in steps.values()] == [
                StepKind.TRIGGER,
                StepKind.ACTION,
                StepKind.ACTION,
            ]
            for st in steps.values():
                assert st.state == StepState.READY, st
                assert (st.component, st.function) == ("contract", st.id)
                if st.location in (None, "local"):
                    assert st.pid is not None and alive(st.pid), st
            mappers = [st for st in run.status() if st.kind == StepKind.MAPPER]
            assert [m.id for m in mappers] == ["work:mapper"]

            # Warmed up, not yet handling work: the trigger makes no call before `run`.
            assert await run.trigger_hook("startup") == {"token": 42, "by": "v1"}
            assert contract.rows() == []
            assert s.depth("work") == 0

            await s.rt.run(run)
            assert all_in(run, StepState.RUNNING), run.status()
            await until(lambda: len(contract.rows()) >= 3, "three messages through the flow")
            rows = contract.rows()
            assert_contiguous(rows)
            assert all(r["mapped"] is True and "work" in r for r in rows), rows
            assert run.last_error is None
            assert run.last_error_log() == ""

            await run.trigger_hook("shutdown", {"token": 42})
            assert json.loads((contract.tmp / "shutdown.json").read_text()) == {"token": 42}
            pids = recorded_pids(*spec.steps)
            await run.stop()
            assert stopped_and_gone(run), run.status()
            await until(lambda: not any(alive(p) for p in pids), "every step process gone")
            assert await bounded(run.next_exit(), "next_exit after stop") is None

    scenario(main())


@pytest.mark.parametrize("failure", ["import", "init_timeout"])
def test_warm_up_failure_names_the_step_and_leaves_no_process(
    contract: Contract, failure: str
) -> None:
    """A step whose module raises at import, or whose init() never returns within the
    timeout: StepFailed names it, with its log tail; no process of the version is left;
    the runtime still warms a good version up afterwards."""

    async def main() -> None:
        async with contract.session() as s:
            code, marker = (
                (BROKEN_IMPORT, "marker-IMPORT")
                if failure == "import"
                else (HANGING_INIT, "marker-HANG")
            )
            spec = contract.spec(
                1,
                contract.trigger(),
                contract.step("bad", StepKind.ACTION, code),
                contract.sink(),
            )
            timeout = WARMUP if failure == "import" else 6.0
            with pytest.raises(StepFailed) as info:
                await s.warm_up(spec, timeout=timeout)
            exc = info.value
            assert exc.step == "bad"
            assert "bad" in str(exc)
            assert marker in exc.log_tail, exc.log_tail
            if failure == "import":
                assert "RuntimeError" in str(exc) + exc.log_tail
            pids = recorded_pids(*spec.steps)
            assert pids, "the modules were imported (their pids recorded)"
            await until(lambda: not any(alive(p) for p in pids), "no process left behind", 10)

            good = contract.spec(2, contract.trigger(), contract.sink())
            run = await s.warm_up(good)
            assert all_in(run, StepState.READY), run.status()

    scenario(main())


# -- 3. switch under load -------------------------------------------------------------------


def test_switch_under_load_loses_and_duplicates_nothing(contract: Contract) -> None:
    """trigger → action → sink at a steady rate; a switch to new code while messages flow:
    ids contiguous, each once; a gap in ms; the versions hand over once, never back."""

    async def main() -> None:
        async with contract.session() as s:

            def version(tag: str, number: int) -> FlowVersionToRun:
                return contract.spec(
                    number,
                    contract.trigger(tag, interval=0.02),
                    contract.step("work", StepKind.ACTION, PASS, tag),
                    contract.sink(tag),
                )

            old = await s.start(version("v1", 1))
            await until(lambda: len(contract.rows()) >= 10, "messages flowing through v1")
            new = await s.warm_up(version("v2", 2))
            assert all_in(new, StepState.READY)
            old_pids = recorded_pids(*old.spec.steps)

            gap = await s.rt.switch(old, new)
            assert isinstance(gap, float) and gap >= 0, gap
            assert all_in(new, StepState.RUNNING), new.status()
            await until(
                lambda: sum(r["trigger"] == "v2" for r in contract.rows()) >= 10,
                "messages from the new trigger through the new steps",
            )
            await until(lambda: stopped_and_gone(old), "the old version stopped")
            await until(lambda: not any(alive(p) for p in old_pids), "old processes gone")
            await new.stop()

            rows = contract.rows()
            assert_contiguous(rows)
            assert sum(r["by"] == "v1" for r in rows) >= 10
            for column in ("trigger", "work", "by"):
                assert_one_handover([r[column] for r in rows], "v1", "v2")
            # What the new trigger emitted was handled by new code only.
            assert all(r["work"] == r["by"] == "v2" for r in rows if r["trigger"] == "v2")
            new_pids = set(recorded_pids(*new.spec.steps))
            assert {r["pid"] for r in rows if r["by"] == "v2"} <= new_pids

    scenario(main())


# -- 4. stop drains -------------------------------------------------------------------------


def test_stop_finishes_in_flight_work_and_keeps_the_queue(contract: Contract) -> None:
    """stop() while a slow action (0.5 s a message) handles one: that message completes,
    nothing is half-done; what was queued stays queued, across a new runtime on the same
    state, and a later version handles exactly those messages."""

    async def main() -> None:
        async with contract.session() as s:
            run = await s.start(
                contract.spec(
                    1,
                    contract.trigger(interval=0.05),
                    contract.sink(attempts=contract.attempts, delay=0.5),
                )
            )

            def busy_with_a_queue() -> bool:
                return len(contract.tried()) > len(contract.rows()) and s.depth("sink") >= 3

            await until(busy_with_a_queue, "the sink in the middle of a message, more queued")
            await run.stop()
            started, done = contract.tried(), contract.rows()
            assert ns(done) == started, "every message started was finished, none twice"
            assert_contiguous(done)
            left = s.depth("sink")
            assert left >= 1, "queued messages stay queued"

        async with contract.session() as s:
            assert s.depth("sink") == left
            await s.start(contract.spec(2, contract.trigger("v2", limit=0), contract.sink("v2")))
            total = len(done) + left
            await until(lambda: len(contract.rows()) >= total, "the queued messages handled")
            await until(lambda: s.depth("sink") == 0, "the queue drained")
            rows = contract.rows()
            assert_contiguous(rows)
            assert len(rows) == total
            assert [r["by"] for r in rows] == ["v1"] * len(done) + ["v2"] * left

    scenario(main())


def test_run_once_calls_the_trigger_once_and_drains_every_queue(contract: Contract) -> None:
    """An ordinary flow's run: process() once, every queue drained, then the caller stops it;
    the trigger's snapshot carries to the next run; past the timeout the steps are stopped
    and what is still queued becomes dead letters. A runtime that cannot run ordinary flows
    says so with RunNotSupported."""

    async def main() -> None:
        async with contract.session() as s:

            def spec(version: int, **sink: Any) -> FlowVersionToRun:
                return contract.spec(
                    version,
                    contract.trigger(f"v{version}"),
                    contract.step("pass", StepKind.ACTION, PASS, f"v{version}"),
                    contract.sink(f"v{version}", **sink),
                )

            first = await s.warm_up(spec(1, delay=0.05))
            if contract.name == "rabbitmq":
                with pytest.raises(RunNotSupported):
                    await s.rt.run_once(first, WAIT)
                return
            outcome = await bounded(s.rt.run_once(first, WAIT), "the first run")
            assert outcome == RunOutcome()
            assert ns(contract.rows()) == [1], "one trigger call, its message handled"
            assert s.depth("pass") == 0 and s.depth("sink") == 0
            await first.stop()

            second = await s.warm_up(spec(2))
            assert await bounded(s.rt.run_once(second, WAIT), "the second run") == RunOutcome()
            assert ns(contract.rows()) == [1, 2], "the trigger's snapshot carried over"
            assert [r["by"] for r in contract.rows()] == ["v1", "v2"]
            await second.stop()

            contract.hold.write_text("")  # the sink holds its message: the run cannot finish
            third = await s.warm_up(spec(3, hold=contract.hold))
            outcome = await bounded(s.rt.run_once(third, 1.0), "the timed-out run")
            assert outcome.timed_out and outcome.lettered == 1, outcome
            assert s.depth("sink") == 0 and s.depth("pass") == 0
            letters = dead_letters(contract)
            assert [x["body"]["n"] for x in letters] == [3], letters
            assert "run_timeout" in letters[0]["error"]

    scenario(main())


# -- 5. exits -------------------------------------------------------------------------------


def test_a_killed_step_is_reported_restarted_and_gets_its_message_again(
    contract: Contract,
) -> None:
    async def main() -> None:
        async with contract.session() as s:
            contract.hold.touch()
            run = await s.start(
                contract.spec(
                    1,
                    contract.trigger(interval=0.05, limit=3),
                    contract.sink(attempts=contract.attempts, hold=contract.hold),
                )
            )
            await until(lambda: contract.tried() == [1], "the sink holding message 1")
            pid = real_steps(run)["sink"].pid
            assert pid is not None
            os.kill(pid, signal.SIGKILL)  # Unix signal 9: no clean-up, no goodbye.

            exit_: StepExit | None = await bounded(run.next_exit(), "the exit reported")
            assert exit_ is not None and exit_.step == "sink", exit_
            assert isinstance(exit_.at, float) and exit_.reason
            assert run.last_error and "sink" in run.last_error

            def restarted() -> int | None:
                st = real_steps(run)["sink"]
                ok = st.state == StepState.RUNNING and st.pid not in (None, pid)
                return st.pid if ok else None

            new_pid = await until(restarted, "the sink restarted")
            await until(lambda: contract.tried() == [1, 1], "message 1 delivered again")
            contract.hold.unlink()
            await until(lambda: len(contract.rows()) >= 3, "all three messages handled")
            rows = contract.rows()
            assert ns(rows) == [1, 2, 3]
            assert {r["pid"] for r in rows} == {new_pid}
            assert not alive(pid)
            assert isinstance(run.last_error_log(), str)

    scenario(main())


# -- 6. snapshots ---------------------------------------------------------------------------


def test_snapshots_are_kept_across_a_switch_and_a_runtime_restart(contract: Contract) -> None:
    """The trigger counts in its snapshot: v2 (after a switch) and v3 (warmed up on a new
    runtime over the same state) go on from the previous count."""

    async def main() -> None:
        async with contract.session() as s:
            v1 = await s.start(contract.spec(1, contract.trigger("v1", 0.05), contract.sink("v1")))
            await until(lambda: len(contract.rows()) >= 3, "v1 counting")
            v2 = await s.warm_up(contract.spec(2, contract.trigger("v2", 0.05), contract.sink()))
            await s.rt.switch(v1, v2)
            await until(
                lambda: sum(r["trigger"] == "v2" for r in contract.rows()) >= 3, "v2 counting"
            )
            await v2.stop()

        async with contract.session() as s:
            await s.start(contract.spec(3, contract.trigger("v3", 0.05), contract.sink()))
            await until(
                lambda: sum(r["trigger"] == "v3" for r in contract.rows()) >= 3, "v3 counting"
            )
        rows = contract.rows()
        assert_contiguous(rows)
        tags = [r["trigger"] for r in rows]
        assert tags == sorted(tags), tags  # v1…, v2…, v3…
        for tag in ("v2", "v3"):  # each went on from the count before it, not from 1
            assert rows[tags.index(tag)]["n"] > 1

    scenario(main())


# -- 7. queue depth -------------------------------------------------------------------------


def test_queue_depth_grows_behind_a_held_consumer_and_drains(contract: Contract) -> None:
    async def main() -> None:
        async with contract.session() as s:
            contract.hold.touch()
            await s.start(
                contract.spec(
                    1,
                    contract.trigger(interval=0.02, limit=20),
                    contract.sink(attempts=contract.attempts, hold=contract.hold),
                )
            )
            await until(lambda: contract.tried() == [1], "the sink holding message 1")
            await until(lambda: s.depth("sink") >= 5, "messages waiting")
            await until(lambda: s.depth("sink") >= 15, "more messages waiting")
            assert contract.tried() == [1]  # still held on the first one
            contract.hold.unlink()
            await until(lambda: s.depth("sink") == 0, "the queue drained")
            await until(lambda: len(contract.rows()) >= 20, "every message handled")
            assert_contiguous(contract.rows())
            assert len(contract.rows()) == 20

    scenario(main())


# -- 8. rollback switch ---------------------------------------------------------------------


def test_switch_away_from_a_failing_version(contract: Contract) -> None:
    """switch(old, new, old_failing=True), the rollback path: `old` crash-loops; afterwards
    `new` runs (and handles what `old` never could) and `old` is stopped, its exits ended."""

    async def main() -> None:
        async with contract.session() as s:
            bad = await s.start(
                contract.spec(1, contract.trigger("v1", 0.05), contract.sink("v1", crash=True))
            )
            exit_ = await bounded(bad.next_exit(), "the crashing sink's exit")
            assert exit_ is not None and exit_.step == "sink"
            good = await s.warm_up(
                contract.spec(2, contract.trigger("v2", 0.05), contract.sink("v2"))
            )
            gap = await s.rt.switch(bad, good, old_failing=True)
            assert gap is None or gap >= 0
            assert all_in(good, StepState.RUNNING), good.status()

            await until(lambda: stopped_and_gone(bad), "the failing version stopped")
            bad_pids = recorded_pids(*bad.spec.steps)
            await until(lambda: not any(alive(p) for p in bad_pids), "its processes gone")
            while (ended := await bounded(bad.next_exit(), "exits end")) is not None:
                assert ended.step == "sink"

            await until(lambda: len(contract.rows()) >= 5, "the new version handling messages")
            rows = contract.rows()
            assert_contiguous(rows)  # message 1, which crashed v1 each time, included
            assert {r["by"] for r in rows} == {"v2"}
            assert all_in(good, StepState.RUNNING), good.status()

    scenario(main())


# -- 9. dead letters ------------------------------------------------------------------------

# An action that fails some messages: raises for n % fail_every == 0 (from a helper, so the
# traceback has two frames), emits one output then an `error` event for n in `error_on`,
# asks for every n in `rebound_on` to be delivered again later; passes the rest on with the
# id of the message it came from. Records every delivery in `attempts`.
FLAKY = """\
def _check(n, every):
    if every and n % every == 0:
        raise ValueError(f"marker-FAIL {n} by {TAG}")


def _ns(value):
    return [int(x) for x in str(value or "").split(",") if x]


def process(msg, cfg, snapshot, ctx):
    body = msg["body"]
    n = int(body["n"])
    if cfg.get("attempts"):
        with open(cfg["attempts"], "a") as fh:
            fh.write(json.dumps(n) + "\\n")
    _check(n, int(cfg.get("fail_every") or 0))
    out = {**body, "work": TAG, "src": msg["id"]}
    if n in _ns(cfg.get("error_on")):
        ctx.emit("data", {**out, "partial": True})
        ctx.emit("error", f"marker-ERR {n} by {TAG}")
        return None
    if n in _ns(cfg.get("rebound_on")):
        ctx.emit("rebound", f"marker-REBOUND {n}")
        return None
    return out
"""

# Emits `burst` messages per call (n counted in its snapshot) until cfg["limit"] (if any),
# recording what it emitted in cfg["emitted"]: a trigger as fast as a burst of events.
BURSTY = """\
def process(msg, cfg, snapshot, ctx):
    n = snapshot.get("n", 0)
    burst = int(cfg.get("burst") or 1)
    if cfg.get("limit") is not None:
        burst = min(burst, int(cfg["limit"]) - n)
    if burst <= 0:
        return None
    out = [{"n": n + i, "trigger": TAG} for i in range(1, burst + 1)]
    ctx.emit("snapshot", {"n": n + burst})
    if cfg.get("emitted"):
        with open(cfg["emitted"], "a") as fh:
            fh.write("".join(f"{m['n']}\\n" for m in out))
    return out
"""


def dead_letters(contract: Contract) -> list[dict[str, Any]]:
    """The flow's dead letters, oldest first, as the state database holds them.

    The one place this suite looks past the interface: every runtime keeps its dead letters
    in the state database (`runtime/base.py`), so the look is the same for all of them. It
    opens the file read-only, from outside the runtime."""
    if not Paths(contract.state).db.exists():
        return []
    return dead_letter_rows(contract.state, FLOW)


def letters_by_n(contract: Contract) -> dict[int, dict[str, Any]]:
    letters = dead_letters(contract)
    by_n = {int(r["body"]["n"]): r for r in letters}
    assert len(by_n) == len(letters), f"a message is a dead letter twice: {letters}"
    return by_n


def counts(s: Session) -> dict[tuple[str, str], int]:
    """`dead_letter_counts()` of this suite's flow, zero counts left out."""
    return {k: n for k, n in s.rt.dead_letter_counts().items() if k[0] == FLOW and n}


def test_failed_messages_become_dead_letters_and_the_rest_flow_on(contract: Contract) -> None:
    """A step that raises for some messages and emits an error event for another: each of
    those leaves its queue as a dead letter (its input, the error's first line, a blank line
    and the traceback, attempts 1, the versions that failed it, what it emitted before
    failing — still delivered); every other message flows on, in order."""

    async def main() -> None:
        async with contract.session() as s:
            work = contract.step(
                "work",
                StepKind.ACTION,
                FLAKY,
                fail_every=3,
                error_on="4",
                attempts=contract.attempts,
            )
            sink = contract.sink()
            spec = contract.spec(7, contract.trigger(limit=12), work, sink)
            await s.start(spec)
            await until(lambda: len(contract.tried()) >= 12, "every message tried by work")
            await until(lambda: len(dead_letters(contract)) >= 5, "five dead letters")
            await until(lambda: s.depth("work") == 0 and s.depth("sink") == 0, "queues empty")
            await until(lambda: len(contract.rows()) >= 8, "the other messages handled")

            rows = contract.rows()
            assert ns(rows) == [1, 2, 4, 5, 7, 8, 10, 11], rows  # in order, none twice
            assert [r["n"] for r in rows if r.get("partial")] == [4]
            assert sorted(contract.tried()) == list(range(1, 13))  # each delivered once

            by_n = letters_by_n(contract)
            assert sorted(by_n) == [3, 4, 6, 9, 12]
            for n, letter in by_n.items():
                assert letter["step"] == "work"
                assert letter["body"] == {"n": n, "trigger": "v1"}  # the input, as it came
                assert letter["headers"] == {}
                assert letter["msg_id"]
                assert letter["attempts"] == 1
                assert letter["flow_version"] == 7
                assert (letter["component"], letter["component_version"]) == (
                    work.component,
                    work.version,
                )
                assert letter["created_at"]
            for n in (3, 6, 9, 12):
                error = by_n[n]["error"]
                lines = error.splitlines()
                assert lines[0] == f"ValueError: marker-FAIL {n} by v1", error
                assert lines[1] == "", error  # the first line, a blank line, the traceback
                assert "Traceback (most recent call last)" in error
                assert "in process" in error and "in _check" in error
                assert "main.py" in error
                assert by_n[n]["emitted"] == []
            # An error event: its text, no traceback; what was emitted first is delivered and
            # recorded with the letter.
            assert by_n[4]["error"].splitlines()[0] == "marker-ERR 4 by v1"
            [partial] = by_n[4]["emitted"]
            assert partial["body"]["partial"] is True and partial["body"]["n"] == 4
            assert partial["body"]["src"] == by_n[4]["msg_id"]
            assert counts(s) == {(FLOW, "work"): 5}

    scenario(main())


def test_retried_dead_letters_are_handled_by_the_fixed_version_once(contract: Contract) -> None:
    """retry_dead_letters: into a version that still fails, the letter comes back with
    attempts 2 (same message id); into a spec without the step, letters are skipped; into a
    version that no longer fails, each is handled once, by it, with its message id, nothing
    else is handled again, and the letters are gone."""

    async def main() -> None:
        async with contract.session() as s:

            def version(number: int, tag: str, fail_every: int) -> FlowVersionToRun:
                return contract.spec(
                    number,
                    contract.trigger(tag, limit=12),
                    contract.step("work", StepKind.ACTION, FLAKY, tag, fail_every=fail_every),
                    contract.sink(tag),
                )

            v1 = await s.start(version(1, "v1", 3))
            await until(lambda: len(dead_letters(contract)) >= 4, "four dead letters")
            await until(lambda: len(contract.rows()) >= 8, "the other eight handled")
            first = letters_by_n(contract)
            assert sorted(first) == [3, 6, 9, 12]
            assert {r["attempts"] for r in first.values()} == {1}

            # A step the spec does not have: nothing moves.
            other = contract.spec(9, contract.trigger("v9"), contract.sink("v9"))
            skipped = await s.rt.retry_dead_letters(other, None, None)
            assert (skipped.retried, skipped.failed) == (0, 0)
            assert sorted(skipped.skipped) == sorted(r["id"] for r in first.values())
            assert letters_by_n(contract) == first

            # Into the version that still fails it: back, with one attempt more.
            again = await s.rt.retry_dead_letters(v1.spec, "work", [first[3]["id"]])
            assert (again.retried, again.failed, again.skipped) == (1, 0, [])

            def failed_twice() -> dict[str, Any] | None:
                letter = letters_by_n(contract).get(3)
                return letter if letter is not None and letter["attempts"] == 2 else None

            twice = await until(failed_twice, "message 3 failed again")
            assert twice["msg_id"] == first[3]["msg_id"]
            assert twice["error"].splitlines()[0] == "ValueError: marker-FAIL 3 by v1"
            assert {n: r["attempts"] for n, r in letters_by_n(contract).items()} == {
                3: 2,
                6: 1,
                9: 1,
                12: 1,
            }
            assert counts(s) == {(FLOW, "work"): 4}

            # The fixed version: each letter handled once, by it.
            v2 = await s.warm_up(version(2, "v2", 0))
            await s.rt.switch(v1, v2)
            done = await s.rt.retry_dead_letters(v2.spec, "work", None)
            assert (done.retried, done.failed, done.skipped) == (4, 0, [])
            await until(lambda: len(contract.rows()) >= 12, "the retried messages handled")
            await until(lambda: not dead_letters(contract), "no dead letter left")
            await until(lambda: s.depth("work") == 0 and s.depth("sink") == 0, "queues empty")
            rows = contract.rows()
            assert sorted(ns(rows)) == list(range(1, 13)), rows  # nothing twice downstream
            retried = {r["n"]: r for r in rows if r["n"] % 3 == 0}
            assert {r["work"] for r in retried.values()} == {"v2"}
            assert {n: r["src"] for n, r in retried.items()} == {
                n: first[n]["msg_id"] for n in (3, 6, 9, 12)
            }
            assert all(r["work"] == "v1" for r in rows if r["n"] % 3)
            assert counts(s) == {}
            nothing = await s.rt.retry_dead_letters(v2.spec, None, None)
            assert (nothing.retried, nothing.failed, nothing.skipped) == (0, 0, [])

    scenario(main())


def test_a_failed_mapping_is_a_dead_letter_of_the_mapper_step(contract: Contract) -> None:
    """An output that fails the next step's mapping: a letter of "ID:mapper" holding the output
    as it was before the mapping; a retry through a mapping that still fails keeps it (one
    attempt more); through a fixed mapping it is mapped and handled once."""
    failing = (
        'n % 3 = 0 ? $error("marker-MAP " & $string(n))'
        ' : {"n": n, "trigger": trigger, "mapped": "m1"}'
    )
    fixed = '{"n": n, "trigger": trigger, "mapped": "m2"}'

    async def main() -> None:
        async with contract.session() as s:
            v1 = await s.start(
                contract.spec(1, contract.trigger(limit=9), contract.sink(mapping=failing))
            )
            await until(lambda: len(dead_letters(contract)) >= 3, "three dead letters")
            await until(lambda: len(contract.rows()) >= 6, "the other six handled")
            rows = contract.rows()
            assert ns(rows) == [1, 2, 4, 5, 7, 8]
            assert {r["mapped"] for r in rows} == {"m1"}
            by_n = letters_by_n(contract)
            assert sorted(by_n) == [3, 6, 9]
            for n, letter in by_n.items():
                assert letter["step"] == "sink:mapper"
                assert letter["body"] == {"n": n, "trigger": "v1"}  # before the mapping
                assert f"marker-MAP {n}" in letter["error"].splitlines()[0]
                assert letter["attempts"] == 1
                assert letter["flow_version"] == 1
            assert counts(s) == {(FLOW, "sink:mapper"): 3}

            again = await s.rt.retry_dead_letters(v1.spec, "sink", None)
            assert (again.retried, again.failed, again.skipped) == (0, 3, [])
            assert {n: r["attempts"] for n, r in letters_by_n(contract).items()} == {
                3: 2,
                6: 2,
                9: 2,
            }

            v2 = await s.warm_up(
                contract.spec(
                    2, contract.trigger("v2", limit=9), contract.sink("v2", mapping=fixed)
                )
            )
            await s.rt.switch(v1, v2)
            done = await s.rt.retry_dead_letters(v2.spec, "sink", None)
            assert (done.retried, done.failed, done.skipped) == (3, 0, [])
            await until(lambda: len(contract.rows()) >= 9, "the retried outputs handled")
            await until(lambda: not dead_letters(contract), "no dead letter left")
            rows = contract.rows()
            assert sorted(ns(rows)) == list(range(1, 10)), rows
            assert {r["n"]: r["mapped"] for r in rows if r["n"] % 3 == 0} == {
                3: "m2",
                6: "m2",
                9: "m2",
            }
            assert counts(s) == {}

    scenario(main())


# The rebound back-off (1 s doubling, 60 s at most: about 4 minutes for 10 tries) has no
# setting, so each runtime names how this suite shortens it: a clock that runs faster.
REBOUND_SPEEDUP = 100.0


def _fast_wall_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    """The embedded runtime runs in this process and times rebounds by `time.time()` (which
    nothing else in it reads, bar log retention): make that clock run REBOUND_SPEEDUP times
    faster. The event loop keeps its own monotonic clock."""
    mono, start = time.monotonic, time.time()
    origin = mono()
    monkeypatch.setattr(time, "time", lambda: start + (mono() - origin) * REBOUND_SPEEDUP)


def _short_rebound_delays(monkeypatch: pytest.MonkeyPatch) -> None:
    """The RabbitMQ runtime holds a rebound in the broker (a per-message TTL, timed by the
    broker's own clock): shorten the delays it asks for by REBOUND_SPEEDUP."""
    from deployd.runtime.embedded import router

    monkeypatch.setattr(router, "REBOUND_DELAY", router.REBOUND_DELAY / REBOUND_SPEEDUP)
    monkeypatch.setattr(router, "REBOUND_DELAY_MAX", router.REBOUND_DELAY_MAX / REBOUND_SPEEDUP)


FAST_REBOUNDS: dict[str, Callable[[pytest.MonkeyPatch], None]] = {
    "embedded": _fast_wall_clock,
    "rabbitmq": _short_rebound_delays,
}


def test_the_rebound_limit_makes_a_dead_letter(
    contract: Contract, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A message the step asks to have delivered again every time: after REBOUND_LIMIT (10)
    tries it is a dead letter naming the rebounds; the messages after it flow on."""
    FAST_REBOUNDS[contract.name](monkeypatch)

    async def main() -> None:
        async with contract.session() as s:
            work = contract.step(
                "work", StepKind.ACTION, FLAKY, rebound_on="2", attempts=contract.attempts
            )
            # An endless trigger: its messages keep the step busy while message 2 waits.
            await s.start(contract.spec(1, contract.trigger(interval=0.02), work, contract.sink()))
            [letter] = await until(
                lambda: dead_letters(contract), "message 2 dead-lettered", timeout=60
            )
            assert letter["step"] == "work"
            assert letter["body"] == {"n": 2, "trigger": "v1"}
            assert "rebound" in letter["error"].splitlines()[0]
            assert "marker-REBOUND 2" in letter["error"]
            assert contract.tried().count(2) == 10  # README: "after 10 tries it is an error"
            assert counts(s) == {(FLOW, "work"): 1}
            rows = contract.rows()
            assert 2 not in ns(rows)
            assert ns(rows) == sorted(ns(rows))
            assert ns(rows) == [1, *range(3, len(rows) + 2)], rows  # nothing else lost

    scenario(main())


# -- 10. backpressure -----------------------------------------------------------------------

LIMIT = 50  # the small max_queue of the backpressure cases
BURST = 5  # messages per trigger call


class DepthSampler:
    """Samples queue depths every few milliseconds while the scenario runs (the maximum seen
    per step, and how many samples were taken)."""

    def __init__(self, s: Session, *steps: str) -> None:
        self.s = s
        self.steps = steps
        self.max = dict.fromkeys(steps, 0)
        self.samples = 0
        self.task: asyncio.Task[None] | None = None

    def __enter__(self) -> DepthSampler:
        self.task = asyncio.get_running_loop().create_task(self._run())
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.task is not None
        self.task.cancel()

    async def _run(self) -> None:
        while True:
            depths = self.s.rt.queue_depths()
            for step in self.steps:
                self.max[step] = max(self.max[step], depths.get((FLOW, step), 0))
            self.samples += 1
            await asyncio.sleep(0.003)

    async def more(self, n: int, what: str) -> None:
        """Wait until `n` more samples were taken (an observation window, bounded)."""
        target = self.samples + n
        await until(lambda: self.samples >= target, what)


def emitted(contract: Contract) -> list[int]:
    path = contract.tmp / "emitted"
    return [int(x) for x in path.read_text().split()] if path.exists() else []


def burst_trigger(contract: Contract, tag: str = "v1", **config: Any) -> RunStep:
    config.setdefault("burst", BURST)
    config.setdefault("emitted", contract.tmp / "emitted")
    return contract.step("tick", StepKind.TRIGGER, BURSTY, tag, interval=0.002, **config)


def held(run: FlowRun, step: str) -> bool:
    return bool(real_steps(run)[step].backpressure)


def test_a_full_queue_holds_the_trigger_back_until_it_drains(contract: Contract) -> None:
    """A trigger emitting 5 messages every 2 ms into a sink's queue limited to 50: while the
    sink is held the queue never exceeds the limit plus one call's output, the trigger makes
    no call and shows backpressure; once the sink drains the queue it resumes; all 300 are
    handled once, in order."""
    total = 300

    async def main() -> None:
        async with contract.session() as s:
            contract.hold.touch()
            sink = contract.sink(hold=contract.hold, delay=0.003, max_queue=LIMIT)
            run = await s.start(contract.spec(1, burst_trigger(contract, limit=total), sink))
            with DepthSampler(s, "sink") as sampler:
                await until(lambda: held(run, "tick"), "the trigger held back")
                assert LIMIT <= s.depth("sink") <= LIMIT + BURST
                calls = len(emitted(contract))
                await sampler.more(100, "an observation window while held")
                assert held(run, "tick")
                assert len(emitted(contract)) == calls, "no call while held back"
                assert calls <= LIMIT + BURST
                assert not held(run, "sink")  # the last step feeds no queue

                contract.hold.unlink()
                await until(lambda: len(emitted(contract)) > calls, "the trigger resumed")
                await until(lambda: len(contract.rows()) >= total, "every message handled")
                await until(lambda: not held(run, "tick"), "backpressure released")
                await until(lambda: s.depth("sink") == 0, "the queue drained")
            assert sampler.max["sink"] <= LIMIT + BURST, sampler.max
            assert sampler.max["sink"] >= LIMIT
            rows = contract.rows()
            assert_contiguous(rows)
            assert len(rows) == total

    scenario(main())


def test_a_full_queue_holds_an_action_back_and_the_hold_reaches_the_trigger(
    contract: Contract,
) -> None:
    """trigger → work (pass-through) → sink, both queues limited to 50, the sink held: the
    sink's queue stays within its limit plus one message's output of work, work shows
    backpressure, then its own queue fills and the trigger is held too; after the release
    everything is handled once, in order."""
    total, burst = 600, 20  # bursts larger than work's prefetch (16), several fills

    async def main() -> None:
        async with contract.session() as s:
            contract.hold.touch()
            run = await s.start(
                contract.spec(
                    1,
                    burst_trigger(contract, limit=total, burst=burst),
                    contract.step("work", StepKind.ACTION, PASS, max_queue=LIMIT),
                    contract.sink(hold=contract.hold, max_queue=LIMIT),
                )
            )
            with DepthSampler(s, "work", "sink") as sampler:
                await until(lambda: held(run, "work"), "work held back")
                await until(lambda: held(run, "tick"), "the trigger held back in turn")
                await sampler.more(100, "an observation window while held")
                assert held(run, "work") and held(run, "tick")
                contract.hold.unlink()
                await until(lambda: len(contract.rows()) >= total, "every message handled")
            rows = contract.rows()
            assert_contiguous(rows)
            assert len(rows) == total
            assert sampler.max["work"] <= LIMIT + burst, sampler.max
            assert sampler.max["sink"] <= LIMIT + 1, sampler.max

    scenario(main())


def test_switch_and_stop_with_a_full_queue_lose_and_duplicate_nothing(contract: Contract) -> None:
    """A fast trigger held back by a slow sink's full queue: a switch to new code, then a stop
    and a new runtime on the same state, all while the queue is full; the queue stays within
    its limit plus one call; every message emitted is handled exactly once, in order, and
    the versions hand over once."""

    async def main() -> None:
        async with contract.session() as s:

            def version(number: int, tag: str) -> FlowVersionToRun:
                sink = contract.sink(tag, delay=0.02, max_queue=LIMIT)
                return contract.spec(number, burst_trigger(contract, tag), sink)

            v1 = await s.start(version(1, "v1"))
            with DepthSampler(s, "sink") as sampler:
                await until(lambda: held(v1, "tick"), "v1's trigger held back")
                v2 = await s.warm_up(version(2, "v2"))
                gap = await s.rt.switch(v1, v2)
                assert gap is None or gap >= 0, gap
                await until(
                    lambda: any(r["trigger"] == "v2" for r in contract.rows()),
                    "messages of the new trigger handled",
                )
                await until(lambda: held(v2, "tick"), "v2's trigger held back")
                await until(lambda: stopped_and_gone(v1), "v1 stopped")
                await v2.stop()
            left = s.depth("sink")
            # What was queued stays queued (less what the sinks had in hand and finished).
            assert left >= LIMIT // 2, left
            assert sampler.max["sink"] <= LIMIT + BURST, sampler.max
            done = len(contract.rows())

        async with contract.session() as s:
            assert s.depth("sink") == left
            with DepthSampler(s, "sink") as sampler:
                await s.start(
                    contract.spec(3, burst_trigger(contract, "v3", limit=0), contract.sink("v3"))
                )
                await until(lambda: s.depth("sink") == 0, "the queue drained")
                await until(lambda: len(contract.rows()) >= done + left, "all handled")
            assert sampler.max["sink"] <= LIMIT + BURST, sampler.max
        rows = contract.rows()
        assert_contiguous(rows)
        assert ns(rows) == emitted(contract), "every message emitted handled, once"
        assert_one_handover([r["trigger"] for r in rows], "v1", "v2")
        tags = [r["by"] for r in rows]
        assert tags == sorted(tags), "v1, then v2, then v3 handled them"
        assert tags.count("v3") == left

    scenario(main())


@pytest.fixture(autouse=True)
def _no_step_left(contract: Contract) -> Iterator[None]:
    """After each test (its runtimes closed), no step process of it may still be alive."""
    yield
    pids: list[int] = []
    folders = contract.tmp / "versions"
    for pidfile in folders.glob("*/pids") if folders.is_dir() else []:
        pids += [int(p) for p in pidfile.read_text().split()]
    deadline = time.monotonic() + 10
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    leaked = [p for p in pids if alive(p)]
    for pid in leaked:
        os.kill(pid, signal.SIGKILL)
    assert not leaked, f"step processes outlived their test: {leaked}"
