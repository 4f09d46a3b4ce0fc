"""One running version of one flow: its step processes, their loops, their supervision.

The trigger loop calls `process()` again `interval` after each call ends; each action loop
takes the oldest message of its durable queue, hands it to its process and commits the
result through the `Router`. A step process that exits unexpectedly is restarted with
back-off (1 s doubling to 30 s) and its unfinished message is delivered again.

Loops can be stopped and started one step at a time: that is how a switch hands a flow from
the old runner to the new one with a gap of milliseconds (see `runtime.py`). A runner is the
embedded runtime's `FlowRun` (`runtime/base.py`).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from asyncio import Future
from pathlib import Path
from typing import Any

from ...store.queues import Queued
from ...types import FlowVersionToRun, RunStep, StepExit, StepKind, StepState, StepStatus
from ..base import StepFailed
from ..inputs import refusal
from ..stepenv import step_environment
from .process import Launcher, Result, StepDied, StepProcess, append_step_log, forget, log_tail
from .router import Router

log = logging.getLogger("deployd.runner")
BACKOFF_START = 1.0
BACKOFF_MAX = 30.0
STABLE_AFTER = 60.0
IDLE_POLL = 5.0  # an idle action loop's safety-net wake-up (seconds)
FETCH_CHUNK = 64  # queue rows read at once by a busy action loop
AHEAD_BUDGET = 0.005  # seconds of a step's work handed to it ahead (see _action_loop)
MAX_EXITS_KEPT = 100


async def _either(event: asyncio.Event, stop: asyncio.Event, timeout: float | None = None) -> None:
    """Wait until `event` or `stop` is set (or `timeout` seconds pass).

    On every message's path (an idle action loop waits here for its next input), so it is one
    future that either event resolves — `asyncio.Event.set()` resolves every future in the
    event's `_waiters`, which is how `Event.wait()` itself waits — instead of two tasks and an
    `asyncio.wait`, which took three turns of the loop to wake and cost a message ~0.2 ms
    more on a busy loop."""
    if event.is_set() or stop.is_set():
        return
    waiters = [getattr(e, "_waiters", None) for e in (event, stop)]
    if not all(isinstance(w, collections.deque) for w in waiters):  # not CPython's Event
        await _either_tasks(event, stop, timeout)
        return
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[bool] = loop.create_future()
    for w in waiters:
        w.append(fut)  # type: ignore[union-attr]
    handle = loop.call_later(timeout, _resolve, fut) if timeout is not None else None
    try:
        await fut
    finally:
        if handle is not None:
            handle.cancel()
        for w in waiters:
            with contextlib.suppress(ValueError):
                w.remove(fut)  # type: ignore[union-attr]


def _resolve(fut: asyncio.Future[bool]) -> None:
    if not fut.done():
        fut.set_result(False)


async def _either_tasks(
    event: asyncio.Event, stop: asyncio.Event, timeout: float | None = None
) -> None:
    waiter = asyncio.ensure_future(event.wait())
    stopper = asyncio.ensure_future(stop.wait())
    await asyncio.wait({waiter, stopper}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    waiter.cancel()
    stopper.cancel()


def low_water(limit: int) -> int:
    """A step held back by a full queue resumes once the queue is below this."""
    return max(0, min(limit - 1, int(limit * 0.9)))


class FlowRunner:
    def __init__(
        self,
        launcher: Launcher,
        router: Router,
        log_dir: Path,
        spec: FlowVersionToRun,
        drain_timeout: float = 20.0,
        max_queue: int = 10000,
    ) -> None:
        self.launcher = launcher
        self.router = router
        self.flows = router.flows
        self.log_dir = log_dir
        self._spec = spec
        self.flow = spec.flow
        self.version = spec.version
        self.steps = spec.steps
        self.procs: dict[str, StepProcess] = {}
        self.live: dict[str, asyncio.Event] = {s.id: asyncio.Event() for s in spec.steps}
        self.loops: dict[str, asyncio.Task[None]] = {}
        self.stop_flags: dict[str, asyncio.Event] = {}
        self.exit_times: list[float] = []
        self.backoff: dict[str, float] = {}
        self.restart_tasks: set[asyncio.Task[None]] = set()
        self.supervise = False
        self.stopping = False
        self.first_call_at: float | None = None
        self.first_call = asyncio.Event()
        self.last_call_end: float | None = None
        self.boundary_stop = False  # stop the trigger right after its next call ends
        self.sleeping_until: float | None = None
        self.last_error: str | None = None
        self.last_error_step: str | None = None  # the step whose log explains last_error
        self.drain_timeout = drain_timeout  # longest wait for a step to finish when stopping
        self._handled: set[str] = set()  # tokens of processes whose exit was supervised
        self._exits: asyncio.Queue[StepExit | None] = asyncio.Queue()
        self.default_max_queue = max_queue  # daemon.max_queue: steps without their own
        self.held_since: dict[str, float | None] = {}  # held back by a full queue, since
        self._by_id = {s.id: s for s in spec.steps}
        # The queue an action loop reads, when it is not its step's own: a canary's new
        # version reads `<step>:canary` (issue 16). Read as the loop starts.
        self.queues: dict[str, str] = {}

    # -- FlowRun (runtime/base.py) ---------------------------------------------------------

    @property
    def spec(self) -> FlowVersionToRun:
        return self._spec

    def last_error_log(self) -> str:
        if self.last_error_step is None:
            return ""
        return log_tail(self.log_path(self.last_error_step))

    async def next_exit(self) -> StepExit | None:
        if self.stopping and self._exits.empty():
            return None
        exit_ = await self._exits.get()
        if exit_ is None:
            self._exits.put_nowait(None)  # stopped: every later call returns None at once
        return exit_

    def log_path(self, step_id: str) -> Path:
        return self.log_dir / self.flow / f"{step_id}.log"

    # -- processes -------------------------------------------------------------------------

    def _config(self, step: RunStep) -> dict[str, Any]:
        """The step's cfg for a start of its process: its credential merged in anew (keys
        refreshed since the last start included), as the platform re-reads the account."""
        config = dict(step.config)
        if step.credential is None:
            return config
        creds = self.launcher.credentials
        warning = None
        if creds is None:
            warning = f"credential {step.credential} cannot be read here: started without it"
        else:
            config, warning = creds.cfg(step.credential, step.component, config)
        if warning is not None:
            append_step_log(self.log_path(step.id), "WARNING", warning)
            log.warning("flow %s step %s: %s", self.flow, step.id, warning)
        return config

    def _new_proc(self, step: RunStep) -> StepProcess:
        spec = {
            "flow": self.flow,
            "step": step.id,
            "kind": str(step.kind),
            "component": step.component,
            "version": step.version,
            "function": step.function,
            "config": self._config(step),
            "credential": step.credential,
            "artifact_dir": step.artifact_dir,
            "main": step.main,
            "runtime": step.runtime,
            # set by the sailor as it becomes the step (a pooled process started without it)
            "env": step_environment(
                self.flow, self.version, step, self.launcher.api_uri, self.launcher.object_key
            ),
            "variables": dict(self._spec.variables),
        }
        proc = StepProcess(self.launcher, spec, self.log_path(step.id), self._on_exit)
        self.procs[step.id] = proc
        return proc

    async def start(self, timeout: float) -> None:
        """Start every step process in parallel and wait until all are ready (a builtin
        trigger has none: it is ready at once)."""
        for builtin in self.steps:
            if builtin.builtin is not None:
                self.live[builtin.id].set()
        procs = [self._new_proc(s) for s in self.steps if s.builtin is None]
        await asyncio.gather(*(p.spawn() for p in procs))
        try:
            async with asyncio.timeout(timeout):
                for proc in procs:
                    # Shielded: the timeout's cancellation must not cancel `ready` itself,
                    # or the step that is not ready could no longer be told apart.
                    await asyncio.shield(proc.ready)
                    self.live[proc.step_id].set()
        except TimeoutError:
            slow = [p.step_id for p in procs if not p.ready.done()]
            await self.stop(timeout=2)
            step = slow[0] if slow else "?"
            raise StepFailed(
                step,
                f"not ready within warmup_timeout ({timeout:g}s)",
                log_tail(self.log_path(step)),
            ) from None
        except StepFailed as exc:
            await self.stop(timeout=2)
            exc.log_tail = exc.log_tail or log_tail(self.log_path(exc.step))
            raise
        finally:
            for p in procs:
                if p.ready.done() and not p.ready.cancelled():
                    p.ready.exception()  # mark retrieved

    def _on_exit(self, proc: StepProcess) -> None:
        if self.procs.get(proc.step_id) is not proc:
            return
        self.live[proc.step_id].clear()
        if proc.expected_exit or self.stopping or not self.supervise:
            return
        self._handled.add(proc.token)
        now = time.monotonic()
        self.exit_times.append(now)
        self.last_error = f"step {proc.step_id} exited (code {proc.exit_code})"
        self.last_error_step = proc.step_id
        self.flows.count(self.flow, proc.step_id, restarts=1, error=self.last_error)
        self.router.metrics.step_restarted(self.flow, proc.step_id)
        if self._exits.qsize() >= MAX_EXITS_KEPT:  # nobody watches after the rollback window
            self._exits.get_nowait()
        self._exits.put_nowait(StepExit(proc.step_id, now, self.last_error))
        delay = self.backoff.get(proc.step_id, 0.0)
        delay = (
            BACKOFF_START if now - proc.started_at > STABLE_AFTER else delay * 2 or BACKOFF_START
        )
        delay = min(delay, BACKOFF_MAX)
        self.backoff[proc.step_id] = delay
        log.warning(
            "flow %s step %s exited (code %s); restarting in %.0f s",
            self.flow,
            proc.step_id,
            proc.exit_code,
            delay,
        )
        task = asyncio.get_running_loop().create_task(self._restart(proc.step_id, delay))
        self.restart_tasks.add(task)
        task.add_done_callback(self.restart_tasks.discard)

    async def _restart(self, step_id: str, delay: float) -> None:
        await asyncio.sleep(delay)
        if self.stopping or not self.supervise:  # stopping, or handed over while crash-looping
            return
        step = next(s for s in self.steps if s.id == step_id)
        proc = self._new_proc(step)
        await proc.spawn()
        try:
            await proc.ready
        except StepFailed as exc:
            self.last_error = exc.reason
            return  # its exit schedules the next attempt
        self.live[step_id].set()

    async def _live_proc(self, step_id: str, stop: asyncio.Event) -> StepProcess | None:
        """The ready process of `step_id`, waiting through restarts; None once stopped."""
        while not stop.is_set():
            live = self.live[step_id]
            if live.is_set():
                return self.procs[step_id]
            await _either(live, stop)
        return None

    async def _gone(self, proc: StepProcess) -> None:
        """After StepDied: wait until the process's exit is handled (its live flag cleared).
        Between its socket closing and that, it still looks live; retrying at once would spin
        (hundreds of requests, each a write to a closed socket and a warning)."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(proc.exited.wait(), 5)

    # -- loops -----------------------------------------------------------------------------

    def start_loops(self, step_ids: list[str] | None = None) -> None:
        self.supervise = True
        for index, step in enumerate(self.steps):
            if step_ids is not None and step.id not in step_ids:
                continue
            if step.id in self.loops or step.builtin is not None:
                continue  # a builtin trigger has no loop: the intake commits its requests
            proc = self.procs.get(step.id)
            if proc is not None and proc.exited.is_set() and proc.token not in self._handled:
                # It died between its warm-up and now, while nobody supervised it.
                self._on_exit(proc)
            stop = asyncio.Event()
            self.stop_flags[step.id] = stop
            coro = self._trigger_loop(step, stop) if index == 0 else self._action_loop(index, stop)
            self.loops[step.id] = asyncio.get_running_loop().create_task(
                coro, name=f"flow:{self.flow}:{step.id}"
            )

    async def stop_loop(self, step_id: str) -> None:
        """Let the loop finish its current call or message, then end it."""
        flag = self.stop_flags.get(step_id)
        task = self.loops.pop(step_id, None)
        if flag is not None:
            flag.set()
        if task is not None:
            await self._finish(step_id, task)

    async def _finish(self, step_id: str, task: asyncio.Task[None]) -> None:
        """Wait for a stopping loop; past `drain_timeout` kill its process (a step stuck in
        process() must not hold a publish or a shutdown up). Its message stays queued."""
        done, _ = await asyncio.wait({task}, timeout=self.drain_timeout)
        if not done:
            proc = self.procs.get(step_id)
            log.warning(
                "flow %s step %s did not finish its work within %.0f s; killing it",
                self.flow,
                step_id,
                self.drain_timeout,
            )
            if proc is not None:
                proc.expected_exit = True
                proc.kill()
            done, _ = await asyncio.wait({task}, timeout=5)
            if not done:
                task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    async def _trigger_loop(self, step: RunStep, stop: asyncio.Event) -> None:
        interval = float(step.interval)
        while not stop.is_set():
            if self.first_call_at is None and self._full(0, 0):
                # Held back from the start: for the switch, it runs (its gap ends) now.
                self.first_call_at = time.monotonic()
                self.first_call.set()
            if not await self._room_for(0, 0, stop):
                return
            proc = await self._live_proc(step.id, stop)
            if proc is None:
                return
            snapshot = self.router.snapshot(self.flow, step.id)
            started = time.monotonic()
            if self.first_call_at is None:
                self.first_call_at = started
                self.first_call.set()
            try:
                res = await proc.request({"t": "call"}, snapshot)
            except StepDied:
                if self.boundary_stop:
                    return  # being replaced: the new trigger makes the next call
                await self._gone(proc)
                continue
            self.last_call_end = res.ended
            self.router.commit(self.spec, 0, res)
            if self.boundary_stop:
                return
            if interval > 0:
                self.sleeping_until = time.monotonic() + interval
                await _either(stop, stop, interval)
                self.sleeping_until = None
            # interval 0: the next call goes out at once (waiting one more turn of the loop,
            # behind every other step's batch and the group commit, halved the trigger's pace)

    # -- the HTTP intake (builtin = "http") ------------------------------------------------

    def input_full(self) -> bool:
        """Whether the first action's queue is at its limit for new requests (as for a held
        trigger: once full, requests are refused until it is below the low-water mark)."""
        trigger = self.steps[0].id
        if self._full(0, 0):
            if self.held_since.get(trigger) is None:
                self.held_since[trigger] = time.monotonic()
            else:
                self._account(trigger)
            return True
        self._release(trigger)
        return False

    # -- backpressure ----------------------------------------------------------------------

    def max_queue(self, index: int) -> int:
        """The input queue limit of step `index`."""
        return self.steps[index].max_queue or self.default_max_queue

    def _full(self, index: int, inflight: int) -> bool:
        """Whether step `index` must not be given more work: the next step's queue, with what
        the messages in flight may still add, is at its limit (or, once held, not yet below
        the low-water mark)."""
        if index + 1 >= len(self.steps):
            return False
        nxt = self.steps[index + 1]
        limit = self.max_queue(index + 1)
        depth = self.router.depth(self.flow, nxt.id) + inflight
        held = self.held_since.get(self.steps[index].id) is not None
        return depth >= (low_water(limit) if held else limit)

    def _space(self, index: int, inflight: int) -> int:
        """How many more messages step `index` may be given before the next step's queue (with
        one output per message in flight) reaches its limit."""
        if index + 1 >= len(self.steps):
            return 1 << 30
        nxt = self.steps[index + 1]
        return self.max_queue(index + 1) - self.router.depth(self.flow, nxt.id) - inflight

    async def _room_for(self, index: int, inflight: int, stop: asyncio.Event) -> bool:
        """Wait until step `index` may be given its next call or message (backpressure);
        False once stopped. Only waits with nothing in flight (else it says so at once)."""
        step_id = self.steps[index].id
        if not self._full(index, inflight):
            self._release(step_id)
            return True
        if step_id not in self.held_since or self.held_since[step_id] is None:
            self.held_since[step_id] = time.monotonic()
        if inflight:
            return False
        room = self.router.room(self.flow, self.steps[index + 1].id)
        while self._full(index, 0):
            if stop.is_set():
                return False
            room.clear()
            await _either(room, stop, IDLE_POLL)
            self._account(step_id)  # the counter grows while it is held, not only after
        self._release(step_id)
        return not stop.is_set()

    def _account(self, step_id: str) -> None:
        since = self.held_since.get(step_id)
        if since is not None:
            now = time.monotonic()
            self.router.metrics.backpressure(self.flow, step_id, now - since)
            self.held_since[step_id] = now

    def _release(self, step_id: str) -> None:
        since = self.held_since.get(step_id)
        if since is not None:
            self.held_since[step_id] = None
            self.router.metrics.backpressure(self.flow, step_id, time.monotonic() - since)

    async def stop_trigger_at_boundary(self, max_wait: float) -> None:
        """End the trigger loop right after a call ends, so the next trigger can start at once.

        If the trigger is waiting for its next call and that call is due within `max_wait`,
        the loop makes that call and then ends; otherwise it ends now.
        """
        trigger = self.steps[0].id
        self.boundary_stop = True
        if self.steps[0].builtin is not None:
            return  # no call to wait for: the intake belongs to the flow
        due = self.sleeping_until
        if due is not None and due - time.monotonic() > max_wait:
            self.stop_flags[trigger].set()
        elif not self.live[trigger].is_set() or self.held_since.get(trigger) is not None:
            # Its process is down (waiting for a restart, or crash-looping during a rollback),
            # or it is held back by a full queue: no call is in progress, so this is a
            # boundary too.
            self.stop_flags[trigger].set()
        task = self.loops.pop(trigger, None)
        if task is not None:
            await self._finish(trigger, task)
        self.stop_flags[trigger].set()

    async def _action_loop(self, index: int, stop: asyncio.Event) -> None:
        """Hand the step up to `prefetch` messages ahead (the sailor handles them in order)
        and commit each result as it comes; the queue is read again from its start whenever
        nothing is in flight (so a message deferred by a rebound, or not committed, is not
        skipped)."""
        inflight: collections.deque[tuple[Queued, asyncio.Future[Result]]] = collections.deque()
        try:
            await self._deliver(index, stop, inflight)
        finally:
            for _row, fut in inflight:  # cancelled (a stuck step): each stays queued
                forget(fut)

    async def _deliver(
        self,
        index: int,
        stop: asyncio.Event,
        inflight: collections.deque[tuple[Queued, asyncio.Future[Result]]],
    ) -> None:
        step = self.steps[index]
        queue = self.queues.get(step.id, step.id)
        wake = self.router.waker(self.flow, queue)
        prefetch = max(1, step.prefetch)
        # Messages handed ahead: what the step handles in AHEAD_BUDGET at the pace its sailor
        # reports (up to `prefetch`). A fast step gets many per write; a slow one gets one at
        # a time, so a stop or switch waits for one message and a kill repeats at most one.
        ahead = 1
        pace: float | None = None  # seconds of work per message, smoothed
        cursor = 0  # row id of the newest message read (0: read from the start)
        fetched: collections.deque[Queued] = collections.deque()  # read, not handed yet
        # When the earliest message deferred by a rebound is due (None: there is none).
        due = self.flows.next_due(self.flow, queue, after=time.time())
        generation = self.router.generation
        proc: StepProcess | None = None
        while True:
            # Deferred messages that are due now, or a group commit that failed: take the
            # queue from its start again, once what is in flight is done.
            draining = generation != self.router.generation or (
                due is not None and time.time() >= due
            )
            if not inflight:
                if stop.is_set():
                    return
                self.router.flush()  # what was handled has left the queue
                cursor = 0
                fetched.clear()
                if draining:
                    generation = self.router.generation
                    due = self.flows.next_due(self.flow, queue, after=time.time())
                    draining = False
            if (
                not stop.is_set()
                and not draining
                and len(inflight) <= ahead // 2
                and await self._room_for(index, len(inflight), stop)
            ):
                if not inflight:  # only then may it be a new process (after a restart)
                    proc = await self._live_proc(step.id, stop)
                if proc is not None and proc is self.procs.get(step.id):
                    room = min(ahead, len(inflight) + self._space(index, len(inflight)))
                    cursor = await self._hand(proc, step.id, cursor, room, inflight, fetched, queue)
            if not inflight:
                if not stop.is_set() and self.held_since.get(step.id) is None:
                    await self._wait_for_work(wake, stop, queue)
                continue
            try:
                await inflight[0][1]  # the oldest; then every one done with it, in order
                while inflight and inflight[0][1].done():
                    row, fut = inflight.popleft()
                    res = fut.result()
                    pace = res.took if pace is None else pace * 0.8 + res.took * 0.2
                    again = self.router.commit(self.spec, index, res, row)
                    if again is not None:
                        due = again if due is None else min(due, again)
            except StepDied:
                for _row, other in inflight:
                    forget(other)  # each stays queued and is delivered again
                inflight.clear()
                if proc is not None:
                    await self._gone(proc)
                continue
            if pace is not None:
                ahead = max(1, min(prefetch, int(AHEAD_BUDGET / max(pace, 1e-6))))

    async def _hand(
        self,
        proc: StepProcess,
        step_id: str,
        cursor: int,
        target: int,
        inflight: collections.deque[tuple[Queued, asyncio.Future[Result]]],
        fetched: collections.deque[Queued],
        queue: str | None = None,
    ) -> int:
        """Send `proc` the next messages until `target` are in flight, reading the queue
        (`queue`, else the step's own) after row `cursor` in chunks (`fetched` keeps what was
        read ahead); the new cursor."""
        want = target - len(inflight)
        if want <= 0:
            return cursor
        if len(fetched) < want:
            rows = self.flows.fetch(self.flow, queue or step_id, cursor, max(want, FETCH_CHUNK))
            if rows:
                fetched.extend(rows)
                cursor = rows[-1].id
        if not fetched:
            return cursor
        snapshot = self.router.snapshot(self.flow, step_id)
        sent = len(inflight)
        try:
            for _ in range(min(want, len(fetched))):
                row = fetched.popleft()
                inflight.append((row, self.submit(proc, row, snapshot)))
            await proc.drain()
        except StepDied:
            # What was sent fails when awaited; the messages stay queued. With nothing in
            # flight, wait until the exit is handled (retrying at once would spin).
            if len(inflight) == sent:
                await self._gone(proc)
        return cursor

    def submit(self, proc: StepProcess, row: Queued, snapshot: dict[str, Any]) -> Future[Result]:
        """Hand `row` to `proc`, unless its step checks its input (`validate_input`) and the
        body does not match: then it is not sent, and fails with the schema error (the
        router makes it a dead letter, in order with the results around it)."""
        step = self._by_id.get(proc.step_id)
        error = None if step is None else refusal(step, row.body)
        if error is None:
            return proc.submit_msg(row, snapshot)
        fut: Future[Result] = asyncio.get_running_loop().create_future()
        fut.set_result(Result(errors=[error], ended=time.monotonic()))
        return fut

    async def _wait_for_work(self, wake: asyncio.Event, stop: asyncio.Event, queue: str) -> None:
        wake.clear()
        if self.flows.fetch(self.flow, queue, 0, 1):
            return  # arrived between the last read and now
        # The router wakes this loop when it commits a message for the step; the timeout is
        # when a message deferred by a rebound is due (a fixed 0.5 s poll of every idle
        # action step was most of an idle daemon's CPU).
        await _either(wake, stop, self._idle_wait(queue))

    def _idle_wait(self, queue: str) -> float:
        """Seconds an idle action loop may sleep: until its next deferred message is due."""
        due = self.flows.next_due(self.flow, queue)
        if due is None:
            return IDLE_POLL
        return min(IDLE_POLL, max(0.01, due - time.time()))

    # -- flow start/stop hooks -------------------------------------------------------------

    async def trigger_hook(self, name: str, data: Any = None) -> Any:
        """Run the trigger's startup() or shutdown(); returns what it returned."""
        if self.steps[0].builtin is not None:
            return None
        proc = self.procs.get(self.steps[0].id)
        if proc is None or not self.live[proc.step_id].is_set():
            return None
        try:
            res = await proc.request({"t": name, "data": data}, None)
        except StepDied:
            return None
        if res.errors:
            log.warning("flow %s: %s", self.flow, res.errors[-1])
        return res.data

    async def stop(self, timeout: float = 10.0) -> None:
        """Stop every loop (current work finishes) and every process."""
        self.stopping = True
        self._exits.put_nowait(None)
        for task in list(self.restart_tasks):
            task.cancel()
        await asyncio.gather(*(self.stop_loop(sid) for sid in list(self.loops)))
        self.router.flush()
        await asyncio.gather(*(p.stop(timeout) for p in self.procs.values()))

    def status(self) -> list[StepStatus]:
        """Every step, mapper steps included, as `status --json` shows it."""
        out: list[StepStatus] = []
        for step in self.steps:
            proc = self.procs.get(step.id)
            if step.mapping:
                mapper_state = StepState.RUNNING if self.supervise and not self.stopping else None
                out.append(
                    StepStatus(
                        f"{step.id}:mapper",
                        StepKind.MAPPER,
                        None,
                        None,
                        None,
                        mapper_state or StepState.STOPPED,
                    )
                )
            if step.builtin is not None:
                state = (
                    StepState.STOPPED
                    if self.stopping
                    else StepState.RUNNING
                    if self.supervise
                    else StepState.READY
                )
            elif proc is None:
                state = StepState.STOPPED
            elif self.live[step.id].is_set():
                state = StepState.RUNNING if self.supervise else StepState.READY
            elif proc.state == "starting":
                state = StepState.STARTING
            elif self.stopping:
                state = StepState.STOPPED
            else:
                state = StepState.RESTARTING if self.supervise else StepState(proc.state)
            pid = proc.pid if proc is not None and not proc.exited.is_set() else None
            out.append(
                StepStatus(
                    step.id,
                    step.kind,
                    step.component or None,
                    step.function,
                    step.version if step.builtin is None else None,
                    state,
                    pid,
                    backpressure=self.held_since.get(step.id) is not None,
                )
            )
        return out
