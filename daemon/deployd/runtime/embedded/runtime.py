"""The embedded runtime: step processes on this machine, queues in the state's SQLite file.

Python steps are forked by a pre-warmed fork server (or taken from a pool of idle forked
sailors), Node steps come from a pool of idle Node sailors; each step process talks to the
daemon over one abstract Unix socket (`process.Launcher`). Each running flow version is a
`FlowRunner`; the `Router` commits what steps produce. The switch from one version to the
next happens here, so the deployer only ever sees `runtime/base.py`:

    old trigger ends right after a call ─┐                 ┌─ new trigger's first call (gap)
    old actions finish their message ────┼─ queues handed ─┼─ new actions take the queues
                                         └─ (orphans → first action)

A canary (issue 16, `canary`): the old version keeps running whole, and the new version's
loops of the changed action steps read their canary queues, which the `Router` fills with the
new version's share of those steps' messages. Promoting ends the split, stops those loops,
puts what is left in the canary queues back into the steps' own queues, then switches as
above; rolling back does the same but stops the new version instead (the old one handles the
rest). A daemon killed meanwhile leaves canary queues behind: `merge_canary_queues` at the
next start puts their messages back, so nothing waits in a queue nobody reads.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Iterable
from typing import Any

from ...config import DaemonConfig, redact_url
from ...errors import FlowError
from ...metrics import Metrics
from ...objects import ensure_key
from ...paths import Paths
from ...store import Store
from ...store.db import Row
from ...store.queues import Queued, canary_queue, fold_canary
from ...types import CanaryCount, CanaryTally, FlowVersionToRun, RetryResult
from .. import mapper
from ..base import (
    Accepted,
    CanaryRun,
    FlowRun,
    InputClosed,
    InputFull,
    MethodCall,
    RunOutcome,
)
from ..credentials import Credentials
from ..stepenv import api_uri
from . import once, oneoff
from .node_pool import NodeSettings
from .process import Launcher
from .router import Router, Split
from .runner import FlowRunner

log = logging.getLogger("deployd.runtime")
BOUNDARY_WAIT = 5.0  # a trigger call due within this long is made by the old version first


class EmbeddedRuntime:
    """The default runtime (`runtime/base.py`'s `Runtime`)."""

    name = "embedded"

    def __init__(
        self,
        store: Store,
        paths: Paths,
        settings: DaemonConfig,
        metrics: Metrics,
        router: Router | None = None,
        launcher: Launcher | None = None,
        credentials: Credentials | None = None,
    ) -> None:
        self.router = router or Router(store, metrics)
        self.router.max_passthrough = settings.max_passthrough_bytes
        self.router.log_dir = paths.step_logs
        self.flows = self.router.flows
        self.store = store
        # A runtime given a launcher shares it (and its fork server) with another runtime,
        # which starts and stops it.
        self.owns_launcher = launcher is None
        self.launcher = launcher or Launcher(paths.root, _node_settings(settings))
        self.launcher.api_uri = api_uri(settings.host, settings.port)
        self.launcher.object_key = ensure_key(paths)
        if credentials is not None:  # else: a shared launcher's, or none
            self.launcher.credentials = credentials
        self.log_dir = paths.step_logs
        self.settings = settings
        self._background: set[asyncio.Task[None]] = set()
        # HTTP-fed flows: the version whose first queue takes each flow's requests (the one
        # running, or the one a switch goes to).
        self.inputs: dict[str, FlowRunner] = {}
        if self.owns_launcher:
            self.launcher.replies = self.router.replies

    async def start(self) -> None:
        if self.owns_launcher:
            await self.launcher.start()

    async def resumed(self) -> None:
        return None  # everything it runs is this daemon's processes: nothing left outside

    def shutting_down(self) -> None:
        return None  # its step processes are this daemon's children: they stop with it

    async def close(self) -> None:
        """Give replaced versions still draining `stop_timeout` to finish, then stop the
        socket, the fork server and the pools (whatever still runs is killed with them)."""
        try:
            if self._background:
                await asyncio.wait(set(self._background), timeout=self.settings.stop_timeout)
        finally:
            if self.owns_launcher:
                await self.launcher.stop()

    def reload(self, settings: DaemonConfig) -> None:
        """New daemon settings (node binary, pool, timeouts) apply to the next warm-up; the
        passthrough bound to the next output."""
        self.launcher.node.settings = _node_settings(settings)
        self.launcher.api_uri = api_uri(settings.host, settings.port)
        self.router.max_passthrough = settings.max_passthrough_bytes
        self.settings = settings

    async def warm_up(self, spec: FlowVersionToRun, timeout: float) -> FlowRun:
        runner = self._runner_for(spec)
        await runner.start(timeout)
        return runner

    def _runner_for(self, spec: FlowVersionToRun) -> FlowRunner:
        return FlowRunner(
            self.launcher,
            self.router,
            self.log_dir,
            spec,
            self.settings.stop_timeout,
            self.settings.max_queue,
        )

    async def run(self, new: FlowRun) -> None:
        runner = _runner(new)
        if runner.spec.http_fed:
            self.inputs[runner.flow] = runner
        runner.start_loops()

    async def accept(
        self, flow: str, body: str, headers: dict[str, str], reply: bool = False
    ) -> Accepted:
        runner = self.inputs.get(flow)
        if runner is None or runner.stopping:
            raise InputClosed(f"flow {flow} is not running (deployd flow start {flow})")
        if runner.input_full():
            nxt = runner.steps[1]
            raise InputFull(
                f"flow {flow}: the queue of step {nxt.id} is full "
                f"({runner.max_queue(1)} messages, max_queue); retry later"
            )
        msg_id = self.router.accept(runner.spec, body, headers)
        replies = self.router.replies
        waiter = replies.wait(msg_id) if reply else None
        try:
            await self.router.committed()
        except BaseException:
            replies.forget(msg_id)
            raise
        return Accepted(msg_id, waiter, lambda: replies.forget(msg_id))

    async def switch(
        self,
        old: FlowRun,
        new: FlowRun,
        *,
        old_failing: bool = False,
        source: EmbeddedRuntime | None = None,
    ) -> float | None:
        """`Runtime.switch`; `source`: the runtime `old` runs on when it is another one (a
        flow moving between runtimes: its queues are carried across)."""
        source = source or self
        if not (isinstance(old, FlowRunner) and isinstance(new, FlowRunner)):
            # One side's steps are not this daemon's processes (pods on Kubernetes): no
            # overlap of the two versions' loops, see `switch_across`.
            return await self.switch_across(old, new, source, old_failing=old_failing)
        old_r, new_r = _runner(old), _runner(new)
        if old_failing:
            old_r.supervise = False  # a crash-looping version is not restarted while it goes
        trigger_new = new_r.steps[0].id
        actions_old = [s.id for s in old_r.steps[1:]]
        flow = new_r.flow
        http_fed = new_r.spec.http_fed
        if http_fed:  # requests from now on go to the new version's first queue
            self.inputs[flow] = new_r
        else:
            self.inputs.pop(flow, None)
        idle: list[float] = []  # HTTP-fed: when the old actions stopped, the new ones started

        async def switch_trigger() -> float | None:
            await old_r.stop_trigger_at_boundary(BOUNDARY_WAIT)
            if http_fed:
                return None  # its gap is the actions' (below)
            end = old_r.last_call_end
            if source is not self:
                # The new trigger starts from the snapshot the old one left: durable on the
                # other runtime's router first, then read here anew (not from this router's
                # memory of an earlier stay of the flow here).
                await source.router.settle()
                self.router.forget_snapshots(flow)
            new_r.start_loops([trigger_new])
            try:  # a new trigger that died before its first call is restarted (or rolled back)
                await asyncio.wait_for(new_r.first_call.wait(), self.settings.warmup_timeout)
            except TimeoutError:
                return None
            if end is None or new_r.first_call_at is None:
                return None
            return max(0.0, (new_r.first_call_at - end) * 1000)

        async def switch_actions() -> None:
            await asyncio.gather(*(old_r.stop_loop(sid) for sid in actions_old))
            idle.append(time.monotonic())
            new_ids = [s.id for s in new_r.steps[1:]]
            if source is not self:
                # The trigger must have made its last call on `source` before its queues move.
                await old_r.stop_trigger_at_boundary(BOUNDARY_WAIT)
            await self._carry(source, flow, [s.id for s in new_r.steps])
            new_r.start_loops(new_ids)
            idle.append(time.monotonic())

        if source is self:
            gap_ms, _ = await asyncio.gather(switch_trigger(), switch_actions())
        else:  # queues move once the old trigger is done, before the new trigger starts
            await switch_actions()
            gap_ms = await switch_trigger()
        if http_fed and len(idle) == 2:
            # No trigger to hand over: the gap is the time no action step was consuming.
            gap_ms = (idle[1] - idle[0]) * 1000
        self.retire(old_r)
        return gap_ms

    async def switch_across(
        self, old: FlowRun, new: FlowRun, source: EmbeddedRuntime, *, old_failing: bool = False
    ) -> float | None:
        """A flow moving between runtimes where one side's steps are not this daemon's
        processes (pods on Kubernetes), so the two versions' loops cannot overlap: the old
        version stops wholly — its trigger at a call boundary, its actions after their current
        message, everything it produced durable (`quiesce`) — its queued messages are carried
        here, and then the new version starts, its trigger from the old one's last snapshot
        (`start_moved`). The gap: from the old trigger's last call to the new one's start."""
        flow = new.spec.flow
        end = await source.quiesce(old, failing=old_failing)
        await self._carry(source, flow, [s.id for s in new.spec.steps])
        started = await self.start_moved(new)
        source.retire(old)
        return None if started is None else max(0.0, (started - end) * 1000)

    async def _carry(self, source: EmbeddedRuntime, flow: str, steps: list[str]) -> None:
        """A switch's queue hand-over: from `source` when the flow moves here from another
        runtime (what this router remembers of the flow's snapshots is forgotten: the other
        one wrote them meanwhile), then to the new version's steps. Moving messages can fail
        (a broker that went away meanwhile): the new version runs all the same, and what was
        not moved stays queued where it was (a later switch or move takes it), rather than
        leaving the flow with nothing running."""
        try:
            if source is not self:
                moved = await source.move_queues_to(self, flow)
                self.router.forget_snapshots(flow)
                log.info(
                    "flow %s: %d queued message(s) carried from %s to %s",
                    flow,
                    moved,
                    source.name,
                    self.name,
                )
            await self.hand_queues(flow, steps)
        except Exception as exc:
            log.error(
                "flow %s: moving its queued messages failed (%s); they stay queued on %s",
                flow,
                _reason(exc),
                source.name,
            )

    async def quiesce(self, run: FlowRun, *, failing: bool = False) -> float:
        """Stop `run` for a move (see `switch_across`); when its trigger's last call ended."""
        runner = _runner(run)
        if failing:
            runner.supervise = False  # a crash-looping version is not restarted while it goes
        await runner.stop_trigger_at_boundary(BOUNDARY_WAIT)
        await asyncio.gather(*(runner.stop_loop(s.id) for s in runner.steps[1:]))
        await self.router.settle()  # its last results and snapshots are durable
        return runner.last_call_end or time.monotonic()

    async def start_moved(self, new: FlowRun) -> float | None:
        """Start `new` after a move (see `switch_across`); when its trigger's first call
        began (None: not within the warm-up timeout)."""
        runner = _runner(new)
        self.router.forget_snapshots(runner.flow)  # written by the other runtime meanwhile
        await self.run(new)
        try:
            await asyncio.wait_for(runner.first_call.wait(), self.settings.warmup_timeout)
        except TimeoutError:
            return None
        return runner.first_call_at

    def retire(self, old: FlowRun) -> None:
        """Stop a version that was switched away from, in the background."""
        task = asyncio.get_running_loop().create_task(old.stop(), name=f"stop-old:{old.spec.flow}")
        self._background.add(task)
        task.add_done_callback(self._stopped)

    async def hand_queues(self, flow: str, steps: list[str]) -> None:
        """Between the old actions stopping and the new ones starting: messages queued for
        steps the new version does not have go to its first action."""
        self.router.flush()  # what the old actions handled has left their queues
        with self.store.tx():
            moved = self.flows.requeue_orphans(flow, steps, steps[1])
        if moved:
            self.router.forget_depths(flow)
            log.info("flow %s: %d queued message(s) moved to step %s", flow, moved, steps[1])

    async def import_queues(self, flow: str, rows: list[tuple[str, Queued]]) -> None:
        """Queue (step, message) pairs that come from another runtime, in order, keeping
        their ids and attempts."""
        with self.store.tx():
            self.flows.insert_messages(flow, rows)
        self.router.forget_depths(flow)

    async def move_queues_to(self, target: EmbeddedRuntime, flow: str) -> int:
        """Carry every message queued for `flow` here to `target` (a flow moving between
        runtimes): queued there first, then removed here, so a crash between leaves a
        message in both places, never in neither."""
        self.router.flush()
        rows = self.flows.flow_messages(flow)
        if rows:
            await target.import_queues(flow, rows)
            with self.store.tx():
                self.flows.delete_messages([row.id for _step, row in rows])
            self.router.forget_depths(flow)
        return len(rows)

    def _stopped(self, task: asyncio.Task[None]) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("stopping a replaced flow version failed", exc_info=task.exception())

    async def run_once(self, run: FlowRun, timeout: float) -> RunOutcome:
        runner = _runner(run)
        # Messages queued for steps this version does not have go to its first action.
        await self.hand_queues(runner.flow, [s.id for s in runner.steps])
        return await once.run_once(runner, timeout)

    async def call_method(self, call: MethodCall, timeout: float) -> Any:
        return await oneoff.call_method(self.launcher, self.log_dir, call, timeout)

    def queue_depths(self) -> dict[tuple[str, str], int]:
        return fold_canary(self.flows.queue_depths())

    # -- canary publishes (issue 16) -------------------------------------------------------

    def canary_refusal(self, spec: FlowVersionToRun) -> str | None:
        return None

    async def canary(
        self, old: FlowRun, new: FlowRun, steps: tuple[str, ...], share: float
    ) -> CanaryRun:
        old_r, new_r = _runner(old), _runner(new)
        refusal = self.canary_refusal(new_r.spec)
        if refusal is not None:
            raise FlowError(refusal)
        actions = {s.id for s in new_r.steps[1:]}
        if not steps or not set(steps) <= actions or old_r.flow != new_r.flow:
            raise FlowError(f"flow {new_r.flow}: a canary splits action steps of one flow only")
        splits = [self.router.split(old_r.spec, new_r.spec, step, share) for step in steps]
        for step in steps:
            new_r.queues[step] = canary_queue(step)
        self.router.forget_depths(new_r.flow)
        new_r.start_loops(list(steps))
        return EmbeddedCanary(self, old_r, new_r, tuple(steps), splits)

    def dead_letter_counts(self) -> dict[tuple[str, str], int]:
        return self.router.letters.counts()

    async def retry_dead_letters(
        self, spec: FlowVersionToRun, step: str | None, ids: list[int] | None
    ) -> RetryResult:
        self.router.flush()
        letters = self.router.letters.select(spec.flow, step, ids)
        steps = {s.id: s for s in spec.actions}
        back: list[Row] = []
        bodies: list[str] = []
        again: list[tuple[str, int, int, int]] = []
        skipped: list[int] = []
        for letter in letters:
            target = steps.get(str(letter["step"]).removesuffix(":mapper"))
            if target is None:
                skipped.append(int(letter["id"]))
                continue
            body = letter["body"]
            if str(letter["step"]).endswith(":mapper") and target.mapping:
                try:
                    mapped = mapper.apply(
                        target.mapping, json.loads(body), letter["passthrough"], spec.variables
                    )
                    body = json.dumps(mapped)
                except FlowError as exc:
                    again.append((str(exc), spec.version, target.version, int(letter["id"])))
                    continue
            back.append(letter)
            bodies.append(body)
        await self.put_back(spec.flow, back, bodies, again)
        return RetryResult(len(back), len(again), skipped)

    async def put_back(
        self,
        flow: str,
        letters: list[Row],
        bodies: list[str],
        again: list[tuple[str, int, int, int]],
    ) -> None:
        """Letters to retry go back at the end of their step's queue (`bodies`: a mapper
        letter's body mapped anew); those whose mapping failed again get one attempt more."""
        with self.store.tx():
            self.router.letters.requeue(letters, bodies)
            self.router.letters.failed_again(again)
        if letters:
            self.router.forget_depths(flow)


class EmbeddedCanary:
    """A canary on the embedded runtime (`runtime/base.py`'s `CanaryRun`)."""

    def __init__(
        self,
        runtime: EmbeddedRuntime,
        old: FlowRunner,
        new: FlowRunner,
        steps: tuple[str, ...],
        splits: list[Split],
    ) -> None:
        self.runtime = runtime
        self.old = old
        self.new = new
        self._steps = steps
        self.splits = splits
        self.ended = False

    @property
    def steps(self) -> tuple[str, ...]:
        return self._steps

    def tally(self) -> CanaryTally:
        router, flow = self.runtime.router, self.new.flow
        queued = 0 if self.ended else sum(router.depth(flow, canary_queue(s)) for s in self._steps)
        by_step = {s.step: (s.tally(True), s.tally(False)) for s in self.splits}
        return CanaryTally(
            new=_sum(c[0] for c in by_step.values()),
            old=_sum(c[1] for c in by_step.values()),
            queued=queued,
            steps=by_step,
        )

    async def _end(self, promoting: bool) -> None:
        """Outputs stop going to the canary queues; the new version's loops of the split
        steps finish their messages; what is left in the canary queues goes back into the
        steps' own queues (keeping its order). Promoting, the old version's loops of those
        steps are stopped too, so what is left goes to the new version (the switch starts
        its loops); rolling back, the old version's loops handle it."""
        if self.ended:
            raise FlowError(f"flow {self.new.flow}: its canary has already ended")
        self.ended = True
        router = self.runtime.router
        router.stop_routing(self.new.flow)
        stopping = [self.new.stop_loop(step) for step in self._steps]
        if promoting:
            stopping += [self.old.stop_loop(step) for step in self._steps]
        await asyncio.gather(*stopping)
        router.flush()
        with self.runtime.store.tx():
            moved = self.runtime.flows.merge_canary_queues(self.new.flow)
        for step in self._steps:
            self.new.queues.pop(step, None)
        router.end_splits(self.new.flow)
        router.forget_depths(self.new.flow)
        if moved:
            log.info(
                "flow %s: %d message(s) of the canary's share went back to the steps' queues",
                self.new.flow,
                moved,
            )

    async def promote(self) -> float | None:
        await self._end(promoting=True)
        return await self.runtime.switch(self.old, self.new)

    async def rollback(self, *, failing: bool = False) -> None:
        if failing:
            self.new.supervise = False  # a crash-looping version is not restarted as it goes
        await self._end(promoting=False)
        task = asyncio.get_running_loop().create_task(
            self.new.stop(), name=f"stop-canary:{self.new.flow}"
        )
        self.runtime._background.add(task)
        task.add_done_callback(self.runtime._stopped)


def _sum(counts: Iterable[CanaryCount]) -> CanaryCount:
    messages = errors = 0
    for count in counts:
        messages += count.messages
        errors += count.errors
    return CanaryCount(messages, errors)


def _reason(exc: BaseException) -> str:
    """An exception's first line, without credentials of any url in it."""
    return redact_url(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)


def _runner(run: FlowRun) -> FlowRunner:
    if not isinstance(run, FlowRunner):
        raise TypeError(f"the embedded runtime cannot run {type(run).__name__}")
    return run


def _node_settings(settings: DaemonConfig) -> NodeSettings:
    return NodeSettings(
        binary=settings.node, pool=settings.node_pool, end_timeout=settings.node_end_timeout
    )
