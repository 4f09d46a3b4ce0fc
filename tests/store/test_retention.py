"""Retention's plan and apply on a real state directory (database, artifacts, logs)."""

from __future__ import annotations

import os
from pathlib import Path

from deployd import retention
from deployd.paths import Paths
from deployd.store import FlowStore, Store

from .conftest import add_version, steps_of


def _artifact(paths: Paths, component: str, n: int) -> Path:
    folder = paths.versions / component / str(n)
    folder.mkdir(parents=True)
    (folder / "main.py").write_text("x = 1\n" * 1000)
    return folder


def test_plan_and_apply(tmp_path: Path) -> None:
    paths = Paths(tmp_path / "state")
    store = Store.open(paths.db)
    try:
        fs = FlowStore(store)
        folders = {}
        for n in range(1, 6):
            folders[n] = _artifact(paths, "web", n)
            add_version(store, "web", f"{n:040x}", artifact_dir=folders[n])
        # A flow runs v1 (kept though old); v2 was replaced in the last deployment (kept too).
        with store.tx():
            fs.create_flow("orders", "realtime", "auto")
        fs.add_flow_version("orders", {}, steps_of("web", 2), None)
        fs.add_flow_version("orders", {}, steps_of("web", 1), None)
        fs.set_flow("orders", active_version=2)
        dep = fs.start_deployment("orders", 1, 2, "flow rollback")
        fs.set_deployment(dep, status="done")

        old_log = paths.build_logs / "3.log"
        old_log.parent.mkdir(parents=True)
        old_log.write_text("build output\n")
        os.utime(old_log, (1, 1))
        new_log = paths.build_logs / "4.log"
        new_log.write_text("build output\n")
        store.set_build_log(3, old_log)
        store.set_build_log(4, new_log)
        big = paths.step_logs / "orders" / "a.log"
        big.parent.mkdir(parents=True)
        with big.open("wb") as fh:
            fh.truncate(retention.MAX_STEP_LOG + 1024)

        plan = retention.plan(store, paths, keep_versions=2, keep_logs=3600)
        assert [(c, v) for c, v, _ in plan.versions] == [("web", 3)]
        assert plan.build_logs == [(3, str(old_log))]
        assert plan.step_logs == [big]

        freed = retention.apply_plan(plan)
        assert freed > 0
        assert not folders[3].exists() and all(folders[n].exists() for n in (1, 2, 4, 5))
        assert not old_log.exists() and new_log.exists()
        assert big.stat().st_size <= retention.MAX_STEP_LOG // 2 + 100
        assert big.read_bytes().startswith(b"--- deployd: older lines removed by retention")

        retention.record(store, plan)
        assert store.version("web", 3)["artifact_dir"] == ""  # type: ignore[index]
        assert store.build(3)["log_path"] is None  # type: ignore[index]
        assert store.build(4)["log_path"] == str(new_log)  # type: ignore[index]
        again = retention.plan(store, paths, keep_versions=2, keep_logs=3600)
        assert again.versions == [] and again.build_logs == [] and again.step_logs == []
        summary = retention.summary(plan, freed, retention.disk_usage(paths.root))
        assert summary["versions_pruned"] == ["web v3"] and summary["build_logs_deleted"] == 1
    finally:
        store.close()
