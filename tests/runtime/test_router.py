"""The router on its own: what one committed call or message leaves in the SQLite queues."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from deployd.metrics import Metrics
from deployd.runtime.embedded.process import Result
from deployd.runtime.embedded.router import REBOUND_LIMIT, Router
from deployd.store import FlowStore, Store
from deployd.types import RunStep, StepKind


def _step(id_: str, kind: StepKind, mapping: str | None = None) -> RunStep:
    return RunStep(id_, kind, "comp", 1, "f", "/nonexistent", "main.py", mapping=mapping)


STEPS = (
    _step("trigger", StepKind.TRIGGER),
    _step("double", StepKind.ACTION, mapping='{"n": n * 2}'),
    _step("sink", StepKind.ACTION),
)


@pytest.fixture
def router(tmp_path: Path) -> Router:
    store = Store.open(tmp_path / "state.db")
    with store.tx():
        FlowStore(store).create_flow("f1", "realtime", "auto")
    return Router(store, Metrics())


def _queued(router: Router, step: str) -> list[dict[str, object]]:
    out = []
    while (row := router.flows.next_message("f1", step)) is not None:
        out.append(row)
        with router.store.tx():
            router.flows.delete_message(row["id"])
    return out


def test_outputs_are_mapped_into_the_next_queue_and_wake_its_consumer(router: Router) -> None:
    wake = router.waker("f1", "double")
    res = Result(outputs=[({"n": 1}, {"h": "x"}), ({"n": 2}, {})])
    router.commit("f1", STEPS, 0, res)
    assert wake.is_set()
    rows = _queued(router, "double")
    assert [r["body"] for r in rows] == [{"n": 2}, {"n": 4}]  # the mapper ran on the way in
    assert rows[0]["headers"] == {"h": "x"}


def test_a_handled_message_leaves_its_queue_with_the_snapshot_in_one_transaction(
    router: Router,
) -> None:
    with router.store.tx():
        router.flows.enqueue("f1", "sink", {"n": 1}, {})
    row = router.flows.next_message("f1", "sink")
    assert row is not None
    router.commit("f1", STEPS, 2, Result(snapshot={"seen": 1}), row)
    assert router.flows.next_message("f1", "sink") is None
    assert router.snapshot("f1", "sink") == {"seen": 1}
    assert router.flows.snapshot("f1", "sink") == {"seen": 1}  # durable, not only cached
    assert router.flows.stats("f1")["sink"]["processed"] == 1


def test_an_empty_trigger_call_writes_nothing(router: Router) -> None:
    before = router.store.conn.total_changes
    router.commit("f1", STEPS, 0, Result())
    assert router.store.conn.total_changes == before


def test_a_failed_mapping_is_counted_on_the_mapper_step_and_not_queued(router: Router) -> None:
    steps = (STEPS[0], _step("bad", StepKind.ACTION, mapping="$error('no')"), STEPS[2])
    router.commit("f1", steps, 0, Result(outputs=[({"n": 1}, {})]))
    assert router.flows.next_message("f1", "bad") is None
    stats = router.flows.stats("f1")
    assert stats["bad:mapper"]["failed"] == 1 and "no" in stats["bad:mapper"]["last_error"]


def test_a_rebound_defers_the_message_until_the_limit(router: Router) -> None:
    with router.store.tx():
        router.flows.enqueue("f1", "sink", {"n": 1}, {})
    row = router.flows.next_message("f1", "sink")
    assert row is not None
    router.commit("f1", STEPS, 2, Result(rebound="later"), row)
    assert router.flows.next_message("f1", "sink") is None  # deferred: not due yet
    assert router.flows.queue_depths("f1") == {("f1", "sink"): 1}
    for _ in range(REBOUND_LIMIT - 1):
        router.commit("f1", STEPS, 2, Result(rebound="later"), row)
    assert router.flows.queue_depths("f1") == {}  # gave up: counted as failed
    assert "gave up after" in router.flows.stats("f1")["sink"]["last_error"]


def test_wakers_are_per_flow_and_step(router: Router) -> None:
    assert router.waker("f1", "sink") is router.waker("f1", "sink")
    assert router.waker("f1", "sink") is not router.waker("f2", "sink")
    assert isinstance(router.waker("f1", "sink"), asyncio.Event)
