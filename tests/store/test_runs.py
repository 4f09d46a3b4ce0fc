"""`RunStore`: runs recorded as intent then result, interrupted at start-up, pruned per flow."""

from __future__ import annotations

from pathlib import Path

from deployd.store import Store
from deployd.store.runs import RunStore


def test_runs_from_intent_to_result_and_interrupted(tmp_path: Path) -> None:
    store = Store.open(tmp_path / "deployd.db")
    runs = RunStore(store)
    with store.tx():
        done = runs.start_run("sync", "schedule", 1, [])
        runs.set_run_steps(done, [{"id": "tick", "component": "hello", "version": 2}])
        runs.finish_run(done, "succeeded", handled=3)
        left = runs.start_run("sync", "manual", 1, [])
    with store.tx():
        assert [r["id"] for r in runs.interrupt_running("interrupted: gone")] == [left]
    newest, older = runs.runs("sync")
    assert newest["status"] == "failed" and newest["errors"] == ["interrupted: gone"]
    assert older["steps"][0]["version"] == 2 and older["handled"] == 3
    assert runs.last_runs()["sync"]["id"] == left


def test_prune_keeps_the_newest_runs_of_each_flow(tmp_path: Path) -> None:
    store = Store.open(tmp_path / "deployd.db")
    runs = RunStore(store)
    with store.tx():
        ids = [runs.skipped_run("busy", "schedule", "run 1 was still going") for _ in range(12)]
        other = runs.skipped_run("other", "schedule", "x")
        assert runs.prune("busy", 5) == 7
        assert runs.prune("busy", 5) == 0
    assert [r["id"] for r in runs.runs("busy")] == ids[::-1][:5]
    assert [r["id"] for r in runs.runs("other")] == [other]
