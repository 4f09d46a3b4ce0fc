"""Builds, versions, paused items, deliveries and meta in a real state database."""

from __future__ import annotations

from pathlib import Path

from deployd.store import Store

from .conftest import add_version


def test_build_lifecycle_and_versions(store: Store) -> None:
    assert store.last_build() is None
    first = store.start_build("web", "a" * 40, "refs/heads/main", "hook")
    assert store.build(first)["status"] == "building"  # type: ignore[index]
    store.fail_build(first, "compile error")
    assert store.has_final_build("web", "a" * 40)
    retry = store.start_build("web", "b" * 40, None, "poll")
    store.fail_build(retry, "interrupted", retryable=True)
    assert not store.has_final_build("web", "b" * 40)

    v1 = add_version(store, "web", "c" * 40, semver="1.0.0")
    v2 = add_version(store, "web", "d" * 40)
    assert (v1, v2) == (1, 2)
    assert store.next_version_number("web") == 3
    assert store.recent("web")["version"] == 2  # type: ignore[index]
    assert store.version("web", 1)["descriptor"] == {"name": "web"}  # type: ignore[index]
    assert [v["version"] for v in store.versions("web")] == [2, 1]
    assert store.has_version("web", "c" * 40) and not store.has_version("web", "a" * 40)
    assert store.version_for_sha("web", "d" * 40)["version"] == 2  # type: ignore[index]
    assert store.last_semver("web") == {"version": 1, "semver": "1.0.0"}
    assert store.last_semver("api") is None

    add_version(store, "api", "e" * 40)
    assert store.last_build()["component"] == "api"  # type: ignore[index]
    assert store.last_build("web")["sha"] == "d" * 40  # type: ignore[index]
    assert set(store.recent_all()) == {"web", "api"}
    assert store.last_builds_all()["web"]["status"] == "succeeded"
    kinds = [e["kind"] for e in store.events(component="web")]
    assert kinds.count("version.registered") == 2 and "build.failed" in kinds


def test_interrupt_unfinished_builds(store: Store) -> None:
    build_id = store.start_build("web", "a" * 40, None, "hook")
    [row] = store.interrupt_unfinished_builds()
    assert row["id"] == build_id
    after = store.build(build_id)
    assert after is not None and after["status"] == "failed" and after["retryable"] == 1
    assert store.interrupt_unfinished_builds() == []


def test_retention_queries(store: Store, tmp_path: Path) -> None:
    for i in range(4):
        add_version(store, "web", f"{i:040x}")
    store.set_build_log(1, tmp_path / "1.log")
    pruned = store.prunable_versions(keep_versions=2)
    assert [(r["component"], r["version"]) for r in pruned] == [("web", 1), ("web", 2)]
    assert [r["id"] for r in store.finished_build_logs()] == [1]
    store.mark_pruned([("web", 1)], [1])
    assert store.version("web", 1)["artifact_dir"] == ""  # type: ignore[index]
    assert [r["version"] for r in store.prunable_versions(keep_versions=2)] == [2]
    assert store.finished_build_logs() == []


def test_paused_meta_deliveries_events(store: Store) -> None:
    store.set_paused("flow", "orders", True)
    store.set_paused("component", "web", True)
    assert store.paused() == {"flow": ["orders"], "component": ["web"]}
    store.set_paused("flow", "orders", False)
    assert store.paused()["flow"] == []
    assert store.last_event("flow.resumed")["message"] == "flow orders resumed"  # type: ignore[index]
    assert store.last_event("nothing") is None

    assert store.meta("disk_bytes") is None
    store.set_meta("disk_bytes", "42")
    assert store.meta("disk_bytes") == "42"

    store.record_deliveries([("web", "d1", "github", None)])
    assert store.has_delivery("web", "d1") and not store.has_delivery("web", "d2")
    assert store.prune_deliveries("9999") == 1
    assert not store.has_delivery("web", "d1")


def test_readonly_and_write_probe(store: Store) -> None:
    add_version(store, "web", "a" * 40)
    assert store.check_writable() is None
    reader = Store.readonly(store.path)
    assert reader is not None
    try:
        assert reader.recent("web")["version"] == 1  # type: ignore[index]
        assert reader.check_writable() is not None  # query_only: a reader cannot write
    finally:
        reader.close()
    assert Store.readonly(store.path.parent / "missing.db") is None
