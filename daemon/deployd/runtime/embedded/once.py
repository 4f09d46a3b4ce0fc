"""One run of an ordinary (scheduled) flow on a warmed `FlowRunner` (`Runtime.run_once`).

    actions take their queues ─▶ trigger process() once ─▶ its outputs committed
        ─▶ wait until every queue of the flow is empty (the message being handled counts)
        ─▶ done: the caller runs shutdown() and stops the steps
    past the run's timeout: steps stopped at once, what is still queued → dead letters

Nothing here holds state of its own: the queues are the flow's SQLite queues, so messages a
killed daemon left queued are the first ones the next run's actions take.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging

from ...store.queues import QueueBatch
from ..base import RunOutcome
from .process import StepDied
from .runner import FlowRunner

log = logging.getLogger("deployd.runner")
DRAIN_POLL = 0.25  # safety-net wake-up while waiting for the queues to drain (seconds)
KILL_AFTER = 2.0  # a timed-out run's steps get this long to finish their message


async def run_once(runner: FlowRunner, timeout: float) -> RunOutcome:
    """The trigger called once and every queue drained, within `timeout` seconds."""
    runner.start_loops([s.id for s in runner.steps[1:]])
    errors: list[str] = []
    try:
        async with asyncio.timeout(timeout):
            errors = await _call(runner)
            await _drained(runner)
    except TimeoutError:
        lettered = await _time_out(runner)
        return RunOutcome(tuple(errors), timed_out=True, lettered=lettered)
    return RunOutcome(tuple(errors))


async def _call(runner: FlowRunner) -> list[str]:
    """The trigger's process(), once; what it threw."""
    trigger = runner.steps[0]
    never = asyncio.Event()
    while True:
        proc = await runner._live_proc(trigger.id, never)  # through a restart, if it died
        assert proc is not None
        snapshot = runner.router.snapshot(runner.flow, trigger.id)
        try:
            res = await proc.request({"t": "call"}, snapshot)
        except StepDied:
            # It died in process(): its outputs were never committed, so nothing of this
            # call exists yet. It is restarted (back-off) and called again, within the run's
            # timeout, as a real-time trigger would be.
            await runner._gone(proc)
            continue
        runner.last_call_end = res.ended
        runner.router.commit(runner.spec, 0, res)
        runner.router.flush()
        return list(res.errors)


async def _drained(runner: FlowRunner) -> None:
    """Until no queue of the flow holds a message (each leaves its queue when its result,
    dead letter or outputs, commits)."""
    actions = [s.id for s in runner.steps[1:]]
    router = runner.router
    rooms = [router.room(runner.flow, sid) for sid in actions]
    while True:
        for room in rooms:
            room.clear()
        router.flush()
        if not any(router.depth(runner.flow, sid) for sid in actions):
            router.forget_depths(runner.flow)  # read once more from the database, to be sure
            if not any(router.depth(runner.flow, sid) for sid in actions):
                return
        waiters = [asyncio.ensure_future(room.wait()) for room in rooms]
        try:
            await asyncio.wait(waiters, timeout=DRAIN_POLL, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()


async def _time_out(runner: FlowRunner) -> int:
    """Stop the steps at once (a step in the middle of a message gets KILL_AFTER), then turn
    every message still queued for the flow into a dead letter; how many."""
    runner.drain_timeout = min(runner.drain_timeout, KILL_AFTER)
    with contextlib.suppress(Exception):
        await runner.stop(timeout=KILL_AFTER)
    runner.router.flush()
    flows = runner.flows
    rows = flows.flow_messages(runner.flow)
    if not rows:
        return 0
    steps = {s.id: s for s in runner.steps}
    error = "the run passed its run_timeout before this message was handled"
    batch = QueueBatch()
    for step_id, row in rows:
        step = steps.get(step_id)
        batch.letters.append(
            (
                runner.flow,
                step_id,
                row.msg_id,
                row.body,
                row.headers,
                runner.version,
                step.component if step else None,
                step.version if step else None,
                error,
                row.failures + 1,
                json.dumps([]),
                row.passthrough,
                row.attachments,
            )
        )
        batch.delete.append(row.id)
    with runner.router.store.tx():
        flows.commit_batch(batch)
    runner.router.forget_depths(runner.flow)
    log.warning(
        "flow %s: run timed out; %d queued message(s) kept as dead letters", runner.flow, len(rows)
    )
    return len(rows)
