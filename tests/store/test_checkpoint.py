"""WAL checkpoints run on the store's own thread, never inside the writer's COMMIT."""

from __future__ import annotations

from pathlib import Path

from deployd.store import Store
from deployd.store.db import BACKSTOP_PAGES
from tests.conftest import wait_until


def test_the_checkpointer_copies_the_wal_back_not_the_writer(store: Store) -> None:
    assert store.checkpointer is not None and store.checkpointer.is_alive()
    (pages,) = store.conn.execute("PRAGMA wal_autocheckpoint").fetchone()
    assert pages == BACKSTOP_PAGES  # SQLite's own checkpoint, in a COMMIT, only as a backstop
    before = store.path.stat().st_size
    # ~4.5 MB: past SQLite's default 1,000 pages, below the backstop. Only a checkpoint writes
    # the database file itself (commits go to the WAL), and the writer does not run one here:
    # the file grows only through the thread.
    blob = "x" * 3000
    for n in range(1500):
        with store.tx():
            store.set_meta(f"k{n}", blob)
    thread = store.checkpointer
    wait_until(
        lambda: thread.checkpoints > 0 and store.path.stat().st_size > before + 4_000_000,
        timeout=30,
    )
    rows = store.conn.execute("SELECT count(*) FROM meta WHERE key LIKE 'k%'").fetchone()
    assert rows == (1500,)


def test_closing_the_store_stops_its_checkpointer(tmp_path: Path) -> None:
    store = Store.open(tmp_path / "deployd.db")
    thread = store.checkpointer
    assert thread is not None
    store.close()
    assert not thread.is_alive()
    assert store.checkpointer is None
