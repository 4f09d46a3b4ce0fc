"""Durable queues, snapshots and step counters in a real state database."""

from __future__ import annotations

import json
import time

from deployd.store import QueueStore, Store
from deployd.store.queues import QueueBatch


def test_enqueue_fetch_defer_delete(qs: QueueStore, store: Store) -> None:
    assert qs.fetch("f", "a", 0, 10) == [] and qs.next_due("f", "a") is None
    qs.enqueue("f", "a", {"n": 1}, {"h": "x"})
    qs.enqueue("f", "a", {"n": 2}, {})
    qs.enqueue("f", "b", {"n": 3}, {})
    assert qs.message_count() == 3
    assert qs.queue_depths() == {("f", "a"): 2, ("f", "b"): 1}
    assert qs.queue_depths("other") == {}

    first, second = qs.fetch("f", "a", 0, 10)
    assert json.loads(first.body) == {"n": 1} and json.loads(first.headers) == {"h": "x"}
    assert qs.fetch("f", "a", first.id, 10) == [second]  # after a cursor
    with store.tx():  # first held back an hour, second handled: one group commit
        qs.commit_batch(QueueBatch(defer=[(time.time() + 3600, first.id)], delete=[second.id]))
    assert qs.fetch("f", "a", 0, 10) == []  # only the deferred one is left, not due
    due = qs.next_due("f", "a", after=time.time())
    assert due is not None and due > time.time() + 3000
    with store.tx():
        qs.commit_batch(QueueBatch(defer=[(0.0, first.id)]))
    [again] = qs.fetch("f", "a", 0, 10)
    assert again.id == first.id and again.attempts == 2


def test_requeue_orphans(qs: QueueStore) -> None:
    qs.enqueue("f", "old", {}, {})
    qs.enqueue("f", "a", {}, {})
    qs.enqueue("g", "old", {}, {})
    assert qs.requeue_orphans("f", ["a", "b"], "a") == 1
    assert qs.queue_depths() == {("f", "a"): 2, ("g", "old"): 1}


def test_snapshots_and_counters(qs: QueueStore) -> None:
    assert qs.snapshot("f", "a") == {}
    qs.save_snapshot("f", "a", {"n": 1})
    qs.save_snapshot("f", "a", {"n": 2})
    assert qs.snapshot("f", "a") == {"n": 2}

    qs.count("f", "a", processed=1)
    qs.count("f", "a", processed=1, failed=1, error="boom")
    qs.count("f", "a", restarts=1)
    qs.count("f", "b", processed=5)
    stats = qs.stats("f")
    assert {k: stats["a"][k] for k in ("processed", "failed", "restarts", "last_error")} == {
        "processed": 2,
        "failed": 1,
        "restarts": 1,
        "last_error": "boom",
    }
    assert stats["b"]["processed"] == 5 and qs.stats("g") == {}
