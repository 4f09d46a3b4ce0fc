"""Flows, drafts (with their cause), deployments, and m005's backfill of older rows."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from sqlite_utils import Database

from deployd.store import FlowStore, Store
from deployd.store.migrations import migrations
from deployd.types import VersionRegistered

from .conftest import steps_of

SHA1, SHA2 = "1" * 40, "2" * 40


def _event(version: int, sha: str) -> VersionRegistered:
    return VersionRegistered("web", version, sha, None)


def test_flow_versions_and_rollback_source(fs: FlowStore, store: Store) -> None:
    with store.tx():
        fs.create_flow("orders", "realtime", "auto")
    assert fs.flow("orders")["enabled"] == 0  # type: ignore[index]
    v1 = fs.add_flow_version("orders", {"name": "orders"}, steps_of("web", 1), "flow apply")
    v2 = fs.add_flow_version("orders", {"name": "orders"}, steps_of("web", 2), None)
    assert (v1, v2) == (1, 2)
    assert fs.flow_version("orders", 2)["steps"] == steps_of("web", 2)  # type: ignore[index]
    assert [v["version"] for v in fs.flow_versions("orders")] == [2, 1]

    assert fs.last_deployment() is None
    assert fs.rollback_source("orders", 2) is None
    first = fs.start_deployment("orders", None, 1, "flow apply")
    fs.set_deployment(first, status="done")
    second = fs.start_deployment("orders", 1, 2, "component version", "web", 2, SHA2)
    assert fs.rollback_source("orders", 2) is None  # not done yet
    assert [d["id"] for d in fs.unfinished_deployments()] == [second]
    fs.set_deployment(second, status="done", gap_ms=1.5)
    assert fs.rollback_source("orders", 2) == 1
    last = fs.last_deployment()
    assert last is not None and last["id"] == second and last["finished_at"]
    assert fs.last_deployments()["orders"]["id"] == second
    assert [d["id"] for d in fs.deployments("orders")] == [second, first]
    assert "interrupted" not in last  # the rows `deploys --json` prints keep their shape


def test_draft_cause_and_drafted_for_person(fs: FlowStore, store: Store) -> None:
    with store.tx():
        fs.create_flow("auto", "realtime", "auto")
        fs.create_flow("manual", "realtime", "manual")
        fs.put_draft("auto", {}, steps_of("web", 1), [], "flow apply")
    draft = fs.draft("auto")
    assert draft is not None and draft["cause_component"] is None
    assert not fs.drafted_for_person("auto", "web", SHA1)

    with store.tx():  # valid, auto: published at once, nobody was asked
        fs.put_draft("auto", {}, steps_of("web", 1), [], "web v1 (111111111111)", _event(1, SHA1))
    draft = fs.draft("auto")
    assert draft is not None
    assert (draft["cause_component"], draft["cause_version"], draft["cause_sha"]) == (
        "web",
        1,
        SHA1,
    )
    assert not fs.drafted_for_person("auto", "web", SHA1)

    with store.tx():  # problems: left for a person, and that outlives a later draft
        fs.put_draft("auto", {}, steps_of("web", 2), ["no action x"], "web v2", _event(2, SHA2))
        fs.put_draft("auto", {}, steps_of("web", 1), [], "flow apply")
    assert fs.drafted_for_person("auto", "web", SHA2)
    assert not fs.drafted_for_person("other", "web", SHA2)

    with store.tx():  # a manual flow: every caused draft waits for a person
        fs.put_draft("manual", {}, steps_of("web", 1), [], "web v1", _event(1, SHA1))
    assert fs.drafted_for_person("manual", "web", SHA1)
    [row] = store.query("SELECT * FROM draft_causes WHERE flow = 'manual'")
    assert (row["version"], row["problems"], row["manual"]) == (1, 0, 1)
    fs.delete_draft("manual")
    assert fs.draft("manual") is None and fs.drafted_for_person("manual", "web", SHA1)


def test_deployed_version_ignores_interrupted(fs: FlowStore, store: Store) -> None:
    with store.tx():
        fs.create_flow("orders", "realtime", "auto")
    dep = fs.start_deployment("orders", 1, 2, "component version", "web", 2, SHA2)
    fs.set_deployment(dep, status="failed", interrupted=1, reason="interrupted: stopped")
    assert not fs.deployed_version("orders", "web", 2)
    failed = fs.start_deployment("orders", 1, 3, "component version", "web", 2, SHA2)
    fs.set_deployment(failed, status="failed", reason="step a exited")
    assert fs.deployed_version("orders", "web", 2)  # a real failure counts: not retried
    assert not fs.deployed_version("orders", "web", 3)


def test_m005_backfills_m004_rows(tmp_path: Path) -> None:
    path = tmp_path / "deployd.db"
    conn = sqlite3.connect(path, isolation_level=None)
    migrations.apply(Database(conn), stop_before="m005_draft_causes")
    ts = "2024-01-01T00:00:00.000+00:00"
    conn.executescript(
        f"""
        INSERT INTO builds (id, component, sha, source, status, queued_at)
            VALUES (1, 'web', '{SHA1}', 'hook', 'succeeded', '{ts}'),
                   (2, 'web', '{SHA2}', 'hook', 'succeeded', '{ts}');
        INSERT INTO versions VALUES ('web', 1, '{SHA1}', NULL, 'python', '{{}}', '/v1', 1, '{ts}'),
                                    ('web', 2, '{SHA2}', NULL, 'python', '{{}}', '/v2', 2, '{ts}');
        INSERT INTO flows (name, type, "update", enabled, created_at, updated_at)
            VALUES ('a', 'realtime', 'auto', 1, '{ts}', '{ts}'),
                   ('b', 'realtime', 'auto', 1, '{ts}', '{ts}'),
                   ('m', 'realtime', 'manual', 1, '{ts}', '{ts}');
        INSERT INTO drafts VALUES ('a', '{{}}', '[]', '["x is missing"]',
                                   'web v2 (222222222222)', '{ts}'),
                                  ('b', '{{}}', '[]', '[]', 'flow apply', '{ts}');
        INSERT INTO events (ts, kind, component, flow, sha, message) VALUES
            ('{ts}', 'draft.created', 'web', 'b', '{SHA1}',
             'draft of b for web v1 (111111111111): needs attention: x is missing; y is bad'),
            ('{ts}', 'draft.created', NULL, 'b', NULL, 'draft of b created by flow apply'),
            ('{ts}', 'draft.created', 'web', 'a', '{SHA2}',
             'draft of a for web v2 (222222222222): needs attention: x is missing'),
            ('{ts}', 'draft.created', 'web', 'a', '{SHA1}', 'draft of a for web v1 (111111111111)'),
            ('{ts}', 'draft.created', 'web', 'm', '{SHA1}', 'draft of m for web v1 (111111111111)');
        INSERT INTO deployments (flow, from_version, to_version, trigger, component,
                                 component_version, sha, status, reason, started_at) VALUES
            ('a', 1, 2, 'component version', 'web', 1, '{SHA1}', 'failed',
             'interrupted: the daemon stopped before the new steps were ready', '{ts}'),
            ('b', 1, 2, 'component version', 'web', 2, '{SHA2}', 'done', NULL, '{ts}');
        """
    )
    conn.close()

    store = Store.open(path)  # applies m005
    try:
        fs = FlowStore(store)
        draft = fs.draft("a")
        assert draft is not None
        assert (draft["cause_component"], draft["cause_version"], draft["cause_sha"]) == (
            "web",
            2,
            SHA2,
        )
        assert fs.draft("b")["cause_component"] is None  # type: ignore[index]
        causes = store.query("SELECT flow, version, sha, problems, manual FROM draft_causes")
        assert causes == [
            {"flow": "b", "version": 1, "sha": SHA1, "problems": 2, "manual": None},
            {"flow": "a", "version": 2, "sha": SHA2, "problems": 1, "manual": None},
            {"flow": "a", "version": 1, "sha": SHA1, "problems": 0, "manual": None},
            {"flow": "m", "version": 1, "sha": SHA1, "problems": 0, "manual": None},
        ]
        # What `_handled` decided from the old texts, it decides the same from the data.
        assert fs.drafted_for_person("a", "web", SHA2)  # problems
        assert fs.drafted_for_person("b", "web", SHA1)  # a replaced draft that had problems
        assert not fs.drafted_for_person("a", "web", SHA1)  # valid, auto
        assert fs.drafted_for_person("m", "web", SHA1)  # manual flow
        assert not fs.deployed_version("a", "web", 1)  # interrupted
        assert fs.deployed_version("b", "web", 2)
        rows = store.query("SELECT flow, interrupted FROM deployments ORDER BY id")
        assert rows == [{"flow": "a", "interrupted": 1}, {"flow": "b", "interrupted": 0}]
    finally:
        store.close()


def test_m017_widens_the_deployment_statuses_and_keeps_every_row(tmp_path: Path) -> None:
    path = tmp_path / "deployd.db"
    conn = sqlite3.connect(path, isolation_level=None)
    migrations.apply(Database(conn), stop_before="m017_canary")
    ts = "2024-01-01T00:00:00.000+00:00"
    conn.executescript(
        f"""
        INSERT INTO deployments (id, flow, from_version, to_version, trigger, status, reason,
                                 started_at, finished_at, interrupted, redriven) VALUES
            (7, 'a', NULL, 1, 'flow apply', 'done', NULL, '{ts}', '{ts}', 0, NULL),
            (9, 'a', 1, 2, 'component version', 'failed', 'interrupted: x', '{ts}', '{ts}', 1, 3);
        """
    )
    conn.close()

    store = Store.open(path)  # applies m017
    try:
        fs = FlowStore(store)
        rows = fs.deployments("a")
        assert [(r["id"], r["status"], r["canary"]) for r in rows] == [
            (9, "failed", None),
            (7, "done", None),
        ]
        assert rows[0]["redriven"] == 3 and rows[0]["reason"] == "interrupted: x"
        assert not fs.deployed_version("a", "web", 2)  # `interrupted` kept
        with store.tx():
            dep = fs.start_deployment("a", 2, 3, "component version", "web", 3, SHA1)
            fs.set_deployment(dep, status="canary", canary='{"share": 0.1}')
        assert [r["id"] for r in fs.unfinished_deployments()] == [dep]
        with store.tx():
            fs.set_deployment(dep, status="promoted", finished_at=None)
        assert [r["id"] for r in fs.unfinished_deployments()] == [dep]  # its switch is owed
        with store.tx():
            fs.set_deployment(dep, finished_at=ts)
        assert fs.unfinished_deployments() == []
        assert fs.deployment(dep)["canary"] == {"share": 0.1}  # type: ignore[index]
        assert fs.rollback_source("a", 3) == 2  # a promoted canary counts as a publish
        with pytest.raises(sqlite3.IntegrityError), store.tx():
            fs.set_deployment(dep, status="bogus")
        indexes = store.query(
            "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'deployments'"
        )
        assert {"deployments_flow"} <= {r["name"] for r in indexes}
    finally:
        store.close()
