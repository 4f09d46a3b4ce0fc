"""The router on its own: what one committed call or message leaves in the SQLite queues."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from deployd.metrics import Metrics
from deployd.runtime.embedded.process import Result
from deployd.runtime.embedded.router import REBOUND_LIMIT, Router
from deployd.store import FlowStore, Store
from deployd.store.letters import DeadLetterStore
from deployd.store.queues import QueueBatch, Queued
from deployd.types import FlowVersionToRun, RunStep, StepKind


def _step(id_: str, kind: StepKind, mapping: str | None = None) -> RunStep:
    return RunStep(id_, kind, "comp", 1, "f", "/nonexistent", "main.py", mapping=mapping)


STEPS = (
    _step("trigger", StepKind.TRIGGER),
    _step("double", StepKind.ACTION, mapping='{"n": n * 2}'),
    _step("sink", StepKind.ACTION),
)
SPEC = FlowVersionToRun("f1", 3, STEPS)


@pytest.fixture
def router(tmp_path: Path) -> Router:
    store = Store.open(tmp_path / "state.db")
    with store.tx():
        FlowStore(store).create_flow("f1", "realtime", "auto")
    return Router(store, Metrics())


def _take(router: Router, step: str) -> Queued:
    """Queue one message for `step` and take it as an action loop does."""
    with router.store.tx():
        router.flows.enqueue("f1", step, {"n": 1}, {"h": "x"})
    [row] = router.flows.fetch("f1", step, 0, 1)
    return row


def _commit(router: Router, spec: FlowVersionToRun, index: int, res: Result, row=None):  # type: ignore[no-untyped-def]
    due = router.commit(spec, index, res, row)
    router.flush()  # outside an event loop the group commit is written by hand
    return due


def _queued(router: Router, step: str) -> list[dict[str, object]]:
    out = []
    while (row := router.flows.next_message("f1", step)) is not None:
        out.append(row)
        with router.store.tx():
            router.flows.commit_batch(QueueBatch(delete=[row["id"]]))
    return out


def test_outputs_are_mapped_into_the_next_queue_and_wake_its_consumer(router: Router) -> None:
    wake = router.waker("f1", "double")
    res = Result(outputs=[({"n": 1}, {"h": "x"}), ({"n": 2}, {})])
    router.commit(SPEC, 0, res)
    assert not wake.is_set()  # nothing is visible before the group commit is written
    router.flush()
    assert wake.is_set()
    rows = _queued(router, "double")
    assert [r["body"] for r in rows] == [{"n": 2}, {"n": 4}]  # the mapper ran on the way in
    assert rows[0]["headers"] == {"h": "x"}


def test_a_handled_message_leaves_its_queue_with_the_snapshot_in_one_transaction(
    router: Router,
) -> None:
    row = _take(router, "sink")
    assert router.depth("f1", "sink") == 1
    _commit(router, SPEC, 2, Result(snapshot={"seen": 1}), row)
    assert router.flows.next_message("f1", "sink") is None
    assert router.depth("f1", "sink") == 0
    assert router.snapshot("f1", "sink") == {"seen": 1}
    assert router.flows.snapshot("f1", "sink") == {"seen": 1}  # durable, not only cached
    assert router.flows.stats("f1")["sink"]["processed"] == 1


def test_results_of_one_tick_share_one_transaction(router: Router) -> None:
    rows = []
    with router.store.tx():
        for n in range(5):
            router.flows.enqueue("f1", "sink", {"n": n}, {})
    rows = router.flows.fetch("f1", "sink", 0, 10)
    commits = []
    router.store.conn.set_trace_callback(
        lambda sql: commits.append(sql) if sql == "COMMIT" else None
    )
    for row in rows:
        router.commit(SPEC, 2, Result(outputs=[]), row)
    router.flush()
    router.store.conn.set_trace_callback(None)
    assert commits == ["COMMIT"]
    assert router.flows.queue_depths("f1") == {}
    assert router.flows.stats("f1")["sink"]["processed"] == 5


def test_an_empty_trigger_call_writes_nothing(router: Router) -> None:
    before = router.store.conn.total_changes
    _commit(router, SPEC, 0, Result())
    assert router.store.conn.total_changes == before


def test_a_failed_message_becomes_a_dead_letter_with_its_input(router: Router) -> None:
    row = _take(router, "sink")
    res = Result(
        outputs=[({"partial": 1}, {})],
        errors=["ValueError: bad"],
        detail="Traceback (most recent call last):\n  ...\nValueError: bad\n",
    )
    _commit(router, SPEC, 2, res, row)
    assert router.flows.queue_depths("f1") == {}  # it left its queue …
    letters = DeadLetterStore(router.store)
    [listed] = letters.letters("f1")  # … and is kept, in the same commit
    letter = letters.letter("f1", listed["id"])
    assert letter is not None
    assert letter["step"] == "sink" and letter["msg_id"] == row.msg_id
    assert letter["body"] == {"n": 1} and letter["headers"] == {"h": "x"}
    assert letter["flow_version"] == 3 and letter["component"] == "comp"
    assert letter["component_version"] == 1 and letter["attempts"] == 1
    assert letter["error"].startswith("ValueError: bad\n") and "Traceback" in letter["error"]
    assert letter["emitted"] == [{"body": {"partial": 1}, "headers": {}}]
    assert router.flows.stats("f1")["sink"]["failed"] == 1


def test_a_failed_mapping_is_a_dead_letter_of_the_mapper_step(router: Router) -> None:
    steps = (STEPS[0], _step("bad", StepKind.ACTION, mapping="$error('no')"), STEPS[2])
    _commit(router, FlowVersionToRun("f1", 1, steps), 0, Result(outputs=[({"n": 1}, {})]))
    assert router.flows.next_message("f1", "bad") is None
    stats = router.flows.stats("f1")
    assert stats["bad:mapper"]["failed"] == 1 and "no" in stats["bad:mapper"]["last_error"]
    letters = DeadLetterStore(router.store)
    [listed] = letters.letters("f1", step="bad")
    assert listed["step"] == "bad:mapper"
    letter = letters.letter("f1", listed["id"])
    assert letter is not None and letter["body"] == {"n": 1}  # as it was before the mapping


def test_a_rebound_defers_the_message_until_the_limit(router: Router) -> None:
    row = _take(router, "sink")
    assert _commit(router, SPEC, 2, Result(rebound="later"), row) is not None
    assert router.flows.fetch("f1", "sink", 0, 1) == []  # deferred: not due yet
    assert router.flows.queue_depths("f1") == {("f1", "sink"): 1}
    for _ in range(REBOUND_LIMIT - 1):
        [row] = [r for r in router.flows.queue_rows("f1", "sink")]
        _commit(router, SPEC, 2, Result(rebound="later"), row)
    assert router.flows.queue_depths("f1") == {}  # gave up: a dead letter
    assert "gave up after" in router.flows.stats("f1")["sink"]["last_error"]
    [letter] = DeadLetterStore(router.store).letters("f1")
    assert "gave up after 10 rebounds: later" in letter["error"]


def test_wakers_are_per_flow_and_step(router: Router) -> None:
    assert router.waker("f1", "sink") is router.waker("f1", "sink")
    assert router.waker("f1", "sink") is not router.waker("f2", "sink")
    assert isinstance(router.waker("f1", "sink"), asyncio.Event)


# -- passthrough ---------------------------------------------------------------------------


def test_each_output_carries_the_passthrough_of_its_input_and_itself(router: Router) -> None:
    """As the platform's sailor does it: an output's passthrough is its input's, with the
    output (id, body, headers) added under the emitting step's id; a mapping sees it through
    `$getPassthrough()`; the next step's own output joins it in turn."""
    steps = (
        STEPS[0],
        _step("double", StepKind.ACTION, mapping='{"n": n * 2, "was": $getPassthrough()}'),
        STEPS[2],
    )
    spec = FlowVersionToRun("f1", 3, steps)
    _commit(router, spec, 0, Result(outputs=[('{"n":1}', {}), ({"n": 2}, {"h": "x"})]))
    first, second = router.flows.queue_rows("f1", "double")
    pt = json.loads(second.passthrough)
    assert pt == {"trigger": {"id": second.msg_id, "body": {"n": 2}, "headers": {"h": "x"}}}
    assert json.loads(second.body) == {"n": 4, "was": pt}
    assert json.loads(first.passthrough)["trigger"]["body"] == {"n": 1}
    _commit(router, spec, 1, Result(outputs=[('{"m":3}', {})]), second)
    [sunk] = router.flows.queue_rows("f1", "sink")
    assert list(json.loads(sunk.passthrough)) == ["trigger", "double"]
    assert json.loads(sunk.passthrough)["double"] == {
        "id": sunk.msg_id,
        "body": {"m": 3},
        "headers": {},
    }


def test_a_dead_letter_keeps_its_passthrough_and_a_requeue_gives_it_back(router: Router) -> None:
    _commit(router, SPEC, 0, Result(outputs=[({"n": 1}, {})]))
    [row] = router.flows.queue_rows("f1", "double")
    _commit(router, SPEC, 1, Result(errors=["ValueError: no"]), row)
    letters = DeadLetterStore(router.store)
    [listed] = letters.letters("f1")
    letter = letters.letter("f1", listed["id"])
    assert letter is not None and letter["passthrough"] == json.loads(row.passthrough)
    with router.store.tx():
        letters.requeue(letters.select("f1", None, None))
    [again] = router.flows.queue_rows("f1", "double")
    assert again.passthrough == row.passthrough


def test_a_passthrough_over_the_bound_leaves_out_the_oldest_steps_with_a_warning(
    router: Router, tmp_path: Path
) -> None:
    router.max_passthrough = 400
    router.log_dir = tmp_path / "logs"
    (router.log_dir / "f1").mkdir(parents=True)
    big = "x" * 250
    _commit(router, SPEC, 0, Result(outputs=[({"n": 1, "big": big}, {})]))
    [row] = router.flows.queue_rows("f1", "double")
    assert list(json.loads(row.passthrough)) == ["trigger"]  # fits
    _commit(router, SPEC, 1, Result(outputs=[({"m": 2, "big": big}, {})]), row)
    [sunk] = router.flows.queue_rows("f1", "sink")
    assert list(json.loads(sunk.passthrough)) == ["double"]  # the trigger's entry left out
    assert len(sunk.passthrough.encode()) <= 400
    log = (router.log_dir / "f1" / "double.log").read_text()
    assert "over daemon.max_passthrough_bytes (400)" in log and "step(s) trigger" in log
    # An output alone over the bound: no passthrough, the message still goes on (mapped).
    router.max_passthrough = 100
    _commit(router, SPEC, 0, Result(outputs=[({"n": 3, "big": big}, {})]))
    rows = router.flows.queue_rows("f1", "double")
    assert json.loads(rows[-1].passthrough) == {} and json.loads(rows[-1].body)["n"] == 6
    log = (router.log_dir / "f1" / "trigger.log").read_text()
    assert "this step's own output" in log


def test_a_bound_of_zero_carries_no_passthrough(router: Router) -> None:
    router.max_passthrough = 0
    _commit(router, SPEC, 0, Result(outputs=[({"n": 1}, {})]))
    [row] = router.flows.queue_rows("f1", "double")
    assert row.passthrough == "{}"


OID = "0123abcd-0000-4000-8000-00000000beef"
FILES = '{"a.txt":{"url":"http://127.0.0.1:1/objects/' + OID + '?storage_type=maester","size":3}}'


def test_attachments_go_with_their_output_into_the_queue_its_passthrough_and_refs(
    router: Router,
) -> None:
    """An output's attachments (JSON text, by output index) are queued with it, added to its
    passthrough entry, recorded as a reference of the object their url names, and kept with
    its message when that becomes a dead letter; a requeue gives them back."""
    res = Result(outputs=[({"n": 1}, {}), ({"n": 2}, {})], attachments={1: FILES})
    _commit(router, SPEC, 0, res)
    first, second = router.flows.queue_rows("f1", "double")
    assert (
        first.attachments == "{}" and "attachments" not in json.loads(first.passthrough)["trigger"]
    )
    assert json.loads(second.attachments) == json.loads(FILES)
    assert json.loads(second.passthrough)["trigger"]["attachments"] == json.loads(FILES)
    assert list(router.flows.object_refs()) == [OID]
    _commit(router, SPEC, 1, Result(errors=["ValueError: no"]), second)
    [letter] = DeadLetterStore(router.store).select("f1", None, None)
    assert json.loads(letter["attachments"]) == json.loads(FILES)
    assert router.flows.attachment_texts() == [FILES]
    with router.store.tx():
        DeadLetterStore(router.store).requeue([letter])
    [back] = [r for r in router.flows.queue_rows("f1", "double") if r.msg_id == second.msg_id]
    assert back.attachments == FILES
