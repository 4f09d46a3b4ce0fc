"""The core of the state database: the connection, WAL set-up, transactions, events, meta.

One writer: the daemon opens a `Store` on its event loop and every write is a short
transaction there. The CLI opens `Store.readonly(...)` to read while the daemon runs.
SQLite in WAL mode lets both happen at once. `builds.py` adds the rest of `Store`.

Checkpoints (copying the WAL back into the database, with an fsync) do not run on the writer:
SQLite's automatic checkpoint would run inside whichever COMMIT crosses 1,000 WAL pages and
stall the event loop for ~20 ms (every few seconds at a few hundred messages/s: the p99 of a
message's latency). A thread of the store's own (`Checkpointer`, its own connection) runs
passive checkpoints instead, which never block the writer; SQLite's own is kept only as a
backstop, far above what the thread lets the WAL grow to.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self

from ..errors import StateError

if TYPE_CHECKING:
    from sqlite_utils import Database

Row = dict[str, Any]
EventListener = Callable[[Row], None]
log = logging.getLogger("deployd.store")
CHECKPOINT_EVERY = 0.25  # seconds between the checkpointer's passive checkpoints
BACKSTOP_PAGES = 20_000  # SQLite's own checkpoint, on the writer, only past this (~80 MB)
WAL_SIZE_LIMIT = 64 * 1024 * 1024  # bytes the WAL file is truncated to when it is reset


def utcnow() -> str:
    """Timestamps are ISO 8601 in UTC with milliseconds, so they sort as text."""
    return datetime.now(UTC).isoformat(timespec="milliseconds")


class StoreCore:
    """The connection and what every part of the store shares (events, meta, transactions).

    Construct the full `Store` (builds.py) with `Store.open` or `Store.readonly`.
    """

    def __init__(self, conn: sqlite3.Connection, path: Path, writable: bool) -> None:
        self.conn = conn
        self.path = path
        self.writable = writable
        self.checkpointer: Checkpointer | None = None
        self.event_listeners: list[EventListener] = []

    @cached_property
    def db(self) -> Database:
        """sqlite-utils on the same connection, imported on first use: the CLI's read-only
        commands never need it, and importing it costs ~50 ms of `deployd status`."""
        from sqlite_utils import Database

        return Database(self.conn)

    def table_names(self) -> list[str]:
        """The names of the tables in the database."""
        return [
            r[0] for r in self.conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        ]

    # -- opening ---------------------------------------------------------------------------

    @classmethod
    def open(cls, path: Path) -> Self:
        """Open (creating and migrating) the database for writing."""
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA busy_timeout=5000")
            conn.execute("PRAGMA foreign_keys=ON")
            conn.execute(f"PRAGMA wal_autocheckpoint={BACKSTOP_PAGES}")
            conn.execute(f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT}")
            store = cls(conn, path, writable=True)
            from .migrations import migrations

            migrations.apply(store.db)
        except (sqlite3.Error, OSError) as exc:
            raise StateError(f"cannot open the state database {path}: {exc}") from exc
        store.checkpointer = Checkpointer(path)
        store.checkpointer.start()
        return store

    @classmethod
    def readonly(cls, path: Path) -> Self | None:
        """Open for reading only; None when the daemon has never created the database."""
        if not path.exists():
            return None
        try:
            conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False)
            conn.execute("PRAGMA busy_timeout=5000")
            conn.execute("PRAGMA query_only=ON")
            store = cls(conn, path, writable=False)
            if "builds" not in store.table_names():
                conn.close()
                return None
        except sqlite3.Error as exc:
            raise StateError(f"cannot read the state database {path}: {exc}") from exc
        return store

    def close(self) -> None:
        """Close the connection (the checkpointer's first)."""
        if self.checkpointer is not None:
            self.checkpointer.close()
            self.checkpointer = None
        self.conn.close()

    @contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        """A short write transaction (BEGIN IMMEDIATE … COMMIT, rolled back on error)."""
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield self.conn
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")

    def check_writable(self) -> str | None:
        """None when the database takes a write lock now (waiting at most 200 ms); else why not.

        For `GET /healthz`: a write under way on this very connection counts as writable.
        """
        if self.conn.in_transaction:
            return None
        try:
            self.conn.execute("PRAGMA busy_timeout=200")
            try:
                self.conn.execute("BEGIN IMMEDIATE")
                self.conn.execute("ROLLBACK")
            finally:
                self.conn.execute("PRAGMA busy_timeout=5000")
        except sqlite3.Error as exc:
            return f"state database {self.path} is not writable: {exc}"
        return None

    def query(self, sql: str, params: Any = ()) -> list[Row]:
        """All rows of `sql` as dicts (for the store's own modules; callers use named methods)."""
        cur = self.conn.execute(sql, params)
        cols = [c[0] for c in cur.description or ()]
        return [dict(zip(cols, row, strict=True)) for row in cur.fetchall()]

    def one(self, sql: str, params: Any = ()) -> Row | None:
        """The first row of `sql`, or None."""
        rows = self.query(sql, params)
        return rows[0] if rows else None

    # -- events ----------------------------------------------------------------------------

    def event(
        self,
        kind: str,
        message: str,
        *,
        component: str | None = None,
        flow: str | None = None,
        sha: str | None = None,
        detail: dict[str, Any] | None = None,
    ) -> None:
        """Record that something happened (the `history` of the daemon).

        Then every listener of `add_event_listener` sees the new row, on this connection and
        inside the caller's transaction when there is one: a listener that writes (the outbox)
        commits or rolls back together with the event itself.
        """
        row: Row = {
            "ts": utcnow(),
            "kind": kind,
            "component": component,
            "flow": flow,
            "sha": sha,
            "message": message,
            "detail": json.dumps(detail) if detail else None,
        }
        cur = self.conn.execute(
            "INSERT INTO events (ts, kind, component, flow, sha, message, detail)"
            " VALUES (:ts, :kind, :component, :flow, :sha, :message, :detail)",
            row,
        )
        row["id"] = cur.lastrowid
        for listener in self.event_listeners:
            try:
                listener(row)
            except Exception:  # a listener's bug must not lose the event nor the caller's work
                log.exception("event listener %r failed on %s", listener, kind)

    def add_event_listener(self, listener: EventListener) -> None:
        """Call `listener(row)` after each `event()` (the dashboard's stream, the outbox)."""
        self.event_listeners.append(listener)

    def events(
        self, component: str | None = None, flow: str | None = None, limit: int = 200
    ) -> list[Row]:
        """The newest events, optionally of one component and/or flow."""
        where, params = [], []
        if component:
            where.append("component = ?")
            params.append(component)
        if flow:
            where.append("flow = ?")
            params.append(flow)
        sql = "SELECT * FROM events"
        if where:
            sql += " WHERE " + " AND ".join(where)
        return self.query(sql + " ORDER BY id DESC LIMIT ?", [*params, limit])

    def events_after(self, after_id: int, limit: int = 500) -> list[Row]:
        """The events after id `after_id`, oldest first (the dashboard's stream resumes from
        its `Last-Event-ID`)."""
        return self.query(
            "SELECT * FROM events WHERE id > ? ORDER BY id LIMIT ?", (after_id, limit)
        )

    def last_event_id(self) -> int:
        """The id of the newest event (0: none yet)."""
        row = self.conn.execute("SELECT MAX(id) FROM events").fetchone()
        return int(row[0] or 0)

    def last_event(self, kind: str) -> Row | None:
        """The newest event of `kind` (its `ts` and `message`), or None."""
        return self.one(
            "SELECT ts, message FROM events WHERE kind = ? ORDER BY id DESC LIMIT 1", (kind,)
        )

    def last_error(self, kind: str, cleared_by: tuple[str, ...]) -> Row | None:
        """The newest event of `kind` (`ts`, `message`, `component`, `flow`) with `cleared_at`:
        when an event of a `cleared_by` kind about the same flow (else component) followed it
        (e.g. a build failure, then a registered version of that component); None if none."""
        row = self.one(
            "SELECT id, ts, message, component, flow FROM events WHERE kind = ?"
            " ORDER BY id DESC LIMIT 1",
            (kind,),
        )
        if row is None:
            return None
        marks = ", ".join("?" for _ in cleared_by)
        sql = f"SELECT ts FROM events WHERE kind IN ({marks}) AND id > ?"  # noqa: S608 (only ?s)
        params: list[Any] = [*cleared_by, row["id"]]
        if row["flow"] is not None:
            sql += " AND flow = ?"
            params.append(row["flow"])
        elif row["component"] is not None:
            sql += " AND component = ?"
            params.append(row["component"])
        later = self.one(sql + " ORDER BY id LIMIT 1", params) if cleared_by else None
        row["cleared_at"] = later["ts"] if later else None
        return row

    # -- small daemon facts ----------------------------------------------------------------

    def meta(self, key: str) -> str | None:
        """A small daemon fact (e.g. `disk_bytes`), or None."""
        row = self.conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return str(row[0]) if row else None

    def set_meta(self, key: str, value: str) -> None:
        """Set a small daemon fact."""
        self.conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))


class Checkpointer(threading.Thread):
    """Passive WAL checkpoints every CHECKPOINT_EVERY seconds, on a connection and thread of
    their own (SQLite releases the GIL while it copies and syncs), so the writer's COMMITs
    stay short. A passive checkpoint takes no lock the writer waits for; one with nothing
    new to copy costs a read of the WAL index."""

    def __init__(self, path: Path) -> None:
        super().__init__(name="deployd-wal-checkpoint", daemon=True)
        self.path = path
        self.stopping = threading.Event()
        self.checkpoints = 0  # passive checkpoints run (tests read it)

    def run(self) -> None:
        try:
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            log.warning("WAL checkpoints of %s left to SQLite: %s", self.path, exc)
            return
        try:
            while not self.stopping.wait(CHECKPOINT_EVERY):
                try:
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                    self.checkpoints += 1
                except sqlite3.Error as exc:  # e.g. the disk is full: the next one tries again
                    log.debug("WAL checkpoint of %s failed: %s", self.path, exc)
        finally:
            conn.close()

    def close(self, timeout: float = 10.0) -> None:
        """Stop after the checkpoint under way (if any)."""
        self.stopping.set()
        if self.is_alive():
            self.join(timeout)


def decode_json(row: Row | None, *cols: str) -> Row | None:
    """`row` with the JSON text in `cols` decoded (in place); None stays None."""
    if row is None:
        return None
    for col in cols:
        if isinstance(row.get(col), str):
            row[col] = json.loads(row[col])
    return row
