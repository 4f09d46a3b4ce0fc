"""Durable queues, snapshots and step counters in a real state database."""

from __future__ import annotations

from deployd.store import QueueStore, Store


def test_enqueue_next_defer_delete(qs: QueueStore, store: Store) -> None:
    assert qs.next_message("f", "a") is None and qs.next_due("f", "a") is None
    qs.enqueue("f", "a", {"n": 1}, {"h": "x"})
    qs.enqueue("f", "a", {"n": 2}, {})
    qs.enqueue("f", "b", {"n": 3}, {})
    assert qs.message_count() == 3
    assert qs.queue_depths() == {("f", "a"): 2, ("f", "b"): 1}
    assert qs.queue_depths("other") == {}

    first = qs.next_message("f", "a")
    assert first is not None and first["body"] == {"n": 1} and first["headers"] == {"h": "x"}
    assert qs.defer_message(first["id"], 3600) == 1  # held back an hour: the next one is due
    second = qs.next_message("f", "a")
    assert second is not None and second["body"] == {"n": 2}
    qs.delete_message(second["id"])
    assert qs.next_message("f", "a") is None  # only the deferred one is left
    due = qs.next_due("f", "a")
    assert due is not None and due > 0
    assert qs.defer_message(first["id"], 0) == 2
    again = qs.next_message("f", "a")
    assert again is not None and again["id"] == first["id"] and again["attempts"] == 2
    assert qs.defer_message(12345, 1) == 0  # gone: no attempts


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
