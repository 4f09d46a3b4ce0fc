"""Fixtures for the store's unit tests: a real SQLite state database in tmp_path."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from deployd.store import FlowStore, QueueStore, Store


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    """A fresh, migrated state database."""
    s = Store.open(tmp_path / "state" / "deployd.db")
    yield s
    s.close()


@pytest.fixture
def fs(store: Store) -> FlowStore:
    return FlowStore(store)


@pytest.fixture
def qs(store: Store) -> QueueStore:
    return QueueStore(store)


def add_version(
    store: Store, component: str, sha: str, artifact_dir: Path | None = None, **kw: Any
) -> int:
    """Build and register one version of `component` the way the pipeline does."""
    build_id = store.start_build(component, sha, "refs/heads/main", "test")
    version = store.next_version_number(component)
    folder = artifact_dir or Path("/nonexistent") / component / str(version)
    store.register_version(
        build_id,
        semver=kw.get("semver"),
        runtime="python",
        descriptor=kw.get("descriptor", {"name": component}),
        artifact_dir=folder,
        version=version,
    )
    return version


def steps_of(component: str, version: int) -> list[dict[str, Any]]:
    return [{"id": "a", "component": component, "version": version, "pinned": False}]
