"""The state database: the only module that writes SQL.

One writer: the daemon opens a `Store` on its event loop and every write is a short
transaction there. The CLI opens `Store.readonly(...)` to read while the daemon runs.
SQLite in WAL mode lets both happen at once.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import StateError

if TYPE_CHECKING:
    from sqlite_utils import Database

Row = dict[str, Any]


def utcnow() -> str:
    """Timestamps are ISO 8601 in UTC with milliseconds, so they sort as text."""
    return datetime.now(UTC).isoformat(timespec="milliseconds")


class Store:
    """Typed access to the state database. Construct with `Store.open` or `Store.readonly`."""

    def __init__(self, conn: sqlite3.Connection, path: Path, writable: bool) -> None:
        self.conn = conn
        self.path = path
        self.writable = writable

    @cached_property
    def db(self) -> Database:
        """sqlite-utils on the same connection, imported on first use: the CLI's read-only
        commands never need it, and importing it costs ~50 ms of `deployd status`."""
        from sqlite_utils import Database

        return Database(self.conn)

    def table_names(self) -> list[str]:
        return [
            r[0] for r in self.conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        ]

    # -- opening ---------------------------------------------------------------------------

    @classmethod
    def open(cls, path: Path) -> Store:
        """Open (creating and migrating) the database for writing."""
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA busy_timeout=5000")
            conn.execute("PRAGMA foreign_keys=ON")
            store = cls(conn, path, writable=True)
            from .migrations import migrations

            migrations.apply(store.db)
        except (sqlite3.Error, OSError) as exc:
            raise StateError(f"cannot open the state database {path}: {exc}") from exc
        return store

    @classmethod
    def readonly(cls, path: Path) -> Store | None:
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

    def query(self, sql: str, params: Any = ()) -> list[Row]:
        cur = self.conn.execute(sql, params)
        cols = [c[0] for c in cur.description or ()]
        return [dict(zip(cols, row, strict=True)) for row in cur.fetchall()]

    def one(self, sql: str, params: Any = ()) -> Row | None:
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
        """Record that something happened (the `history` of the daemon)."""
        self.conn.execute(
            "INSERT INTO events (ts, kind, component, flow, sha, message, detail)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            (utcnow(), kind, component, flow, sha, message, json.dumps(detail) if detail else None),
        )

    def events(
        self, component: str | None = None, flow: str | None = None, limit: int = 200
    ) -> list[Row]:
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

    # -- builds ----------------------------------------------------------------------------

    def start_build(self, component: str, sha: str, ref: str | None, source: str) -> int:
        """Record the intent to build `sha` (status building) before anything is run."""
        now = utcnow()
        with self.tx() as conn:
            cur = conn.execute(
                "INSERT INTO builds (component, sha, ref, source, status, queued_at, started_at)"
                " VALUES (?, ?, ?, ?, 'building', ?, ?)",
                (component, sha, ref, source, now, now),
            )
            build_id = int(cur.lastrowid or 0)
            self.event(
                "build.started",
                f"build {build_id} of {component} {sha[:12]} started ({source})",
                component=component,
                sha=sha,
                detail={"build": build_id, "source": source},
            )
        return build_id

    def set_build_log(self, build_id: int, log_path: Path) -> None:
        self.conn.execute("UPDATE builds SET log_path = ? WHERE id = ?", (str(log_path), build_id))

    def fail_build(self, build_id: int, error: str, *, retryable: bool = False) -> None:
        """Record why a build failed; nothing else changes (the recent version stays)."""
        with self.tx() as conn:
            row = conn.execute(
                "SELECT component, sha FROM builds WHERE id = ?", (build_id,)
            ).fetchone()
            conn.execute(
                "UPDATE builds SET status = 'failed', error = ?, retryable = ?, finished_at = ?"
                " WHERE id = ?",
                (error, int(retryable), utcnow(), build_id),
            )
            if row:
                self.event(
                    "build.failed",
                    f"build {build_id} of {row[0]} {row[1][:12]} failed: {error}",
                    component=row[0],
                    sha=row[1],
                    detail={"build": build_id},
                )

    def register_version(
        self,
        build_id: int,
        *,
        semver: str | None,
        runtime: str,
        descriptor: dict[str, Any],
        artifact_dir: Path,
        version: int,
    ) -> int:
        """Mark the build succeeded and register its component version, in one transaction."""
        with self.tx() as conn:
            component, sha = conn.execute(
                "SELECT component, sha FROM builds WHERE id = ?", (build_id,)
            ).fetchone()
            now = utcnow()
            conn.execute(
                "INSERT INTO versions (component, version, sha, semver, runtime, descriptor,"
                " artifact_dir, build_id, built_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    component,
                    version,
                    sha,
                    semver,
                    runtime,
                    json.dumps(descriptor),
                    str(artifact_dir),
                    build_id,
                    now,
                ),
            )
            conn.execute(
                "UPDATE builds SET status = 'succeeded', version = ?, finished_at = ? WHERE id = ?",
                (version, now, build_id),
            )
            self.event(
                "version.registered",
                f"{component} v{version} registered from {sha[:12]}"
                + (f" (semver {semver})" if semver else ""),
                component=component,
                sha=sha,
                detail={"version": version, "build": build_id},
            )
        return version

    def next_version_number(self, component: str) -> int:
        row = self.conn.execute(
            "SELECT COALESCE(MAX(version), 0) FROM versions WHERE component = ?", (component,)
        ).fetchone()
        return int(row[0]) + 1

    def build(self, build_id: int) -> Row | None:
        return self.one("SELECT * FROM builds WHERE id = ?", (build_id,))

    def builds(self, component: str | None = None, limit: int = 50) -> list[Row]:
        if component:
            return self.query(
                "SELECT * FROM builds WHERE component = ? ORDER BY id DESC LIMIT ?",
                (component, limit),
            )
        return self.query("SELECT * FROM builds ORDER BY id DESC LIMIT ?", (limit,))

    def last_build(self, component: str) -> Row | None:
        return self.one(
            "SELECT * FROM builds WHERE component = ? ORDER BY id DESC LIMIT 1", (component,)
        )

    def has_final_build(self, component: str, sha: str) -> bool:
        """True when `sha` already has a version or a failed build that is not worth retrying."""
        row = self.conn.execute(
            "SELECT 1 FROM builds WHERE component = ? AND sha = ? AND"
            " (status = 'succeeded' OR (status = 'failed' AND retryable = 0)) LIMIT 1",
            (component, sha),
        ).fetchone()
        return row is not None

    def interrupt_unfinished_builds(self) -> list[Row]:
        """At start: builds left queued/building by a stopped daemon become retryable failures."""
        rows = self.query("SELECT * FROM builds WHERE status IN ('queued', 'building')")
        for row in rows:
            self.fail_build(
                row["id"],
                "interrupted: the daemon stopped during this build; it is retried at start",
                retryable=True,
            )
        return rows

    # -- versions --------------------------------------------------------------------------

    def versions(self, component: str, limit: int = 1000) -> list[Row]:
        return self.query(
            "SELECT component, version, sha, semver, runtime, artifact_dir, build_id, built_at"
            " FROM versions WHERE component = ? ORDER BY version DESC LIMIT ?",
            (component, limit),
        )

    def version(self, component: str, version: int) -> Row | None:
        row = self.one(
            "SELECT * FROM versions WHERE component = ? AND version = ?", (component, version)
        )
        if row:
            row["descriptor"] = json.loads(row["descriptor"])
        return row

    def recent(self, component: str) -> Row | None:
        """The newest good version of `component`, or None."""
        row = self.one(
            "SELECT * FROM versions WHERE component = ? ORDER BY version DESC LIMIT 1",
            (component,),
        )
        if row:
            row["descriptor"] = json.loads(row["descriptor"])
        return row

    def recent_all(self) -> dict[str, Row]:
        """The recent version of every component, in one query (for `status`)."""
        rows = self.query(
            "SELECT v.component, v.version, v.sha, v.semver, v.built_at FROM versions v"
            " JOIN (SELECT component, MAX(version) AS version FROM versions GROUP BY component) m"
            " ON v.component = m.component AND v.version = m.version"
        )
        return {r["component"]: r for r in rows}

    def last_builds_all(self) -> dict[str, Row]:
        rows = self.query(
            "SELECT b.id, b.component, b.sha, b.status, b.error FROM builds b"
            " JOIN (SELECT component, MAX(id) AS id FROM builds GROUP BY component) m"
            " ON b.id = m.id"
        )
        return {r["component"]: r for r in rows}

    def artifact_dirs(self) -> set[str]:
        return {r[0] for r in self.conn.execute("SELECT artifact_dir FROM versions").fetchall()}

    def has_version(self, component: str, sha: str) -> bool:
        row = self.conn.execute(
            "SELECT 1 FROM versions WHERE component = ? AND sha = ?", (component, sha)
        ).fetchone()
        return row is not None

    def version_for_sha(self, component: str, sha: str) -> Row | None:
        return self.one(
            "SELECT component, version, sha, semver FROM versions WHERE component = ? AND sha = ?",
            (component, sha),
        )

    # -- operator state: paused flows/components, small facts ------------------------------

    def paused(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {"flow": [], "component": []}
        for kind, name in self.conn.execute("SELECT kind, name FROM paused ORDER BY name"):
            out[kind].append(name)
        return out

    def set_paused(self, kind: str, name: str, paused: bool) -> None:
        with self.tx() as conn:
            if paused:
                conn.execute(
                    "INSERT OR IGNORE INTO paused (kind, name, since) VALUES (?, ?, ?)",
                    (kind, name, utcnow()),
                )
            else:
                conn.execute("DELETE FROM paused WHERE kind = ? AND name = ?", (kind, name))
            self.event(
                f"{kind}.{'paused' if paused else 'resumed'}",
                f"{kind} {name} {'paused' if paused else 'resumed'}",
                flow=name if kind == "flow" else None,
                component=name if kind == "component" else None,
            )

    def meta(self, key: str) -> str | None:
        row = self.conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return str(row[0]) if row else None

    def set_meta(self, key: str, value: str) -> None:
        self.conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

    # -- webhooks and polling (issue 4) ----------------------------------------------------

    def has_delivery(self, component: str, delivery_id: str) -> bool:
        row = self.conn.execute(
            "SELECT 1 FROM webhook_deliveries WHERE component = ? AND delivery_id = ?",
            (component, delivery_id),
        ).fetchone()
        return row is not None

    def record_deliveries(self, rows: list[tuple[str, str, str, str | None]]) -> None:
        """Remember many delivery ids in one transaction (component, id, provider, sha)."""
        now = utcnow()
        with self.tx() as conn:
            conn.executemany(
                "INSERT OR IGNORE INTO webhook_deliveries"
                " (component, delivery_id, provider, sha, received_at) VALUES (?, ?, ?, ?, ?)",
                [(*row, now) for row in rows],
            )

    def prune_deliveries(self, older_than: str) -> int:
        """Forget delivery ids received before the ISO timestamp `older_than`."""
        cur = self.conn.execute(
            "DELETE FROM webhook_deliveries WHERE received_at < ?", (older_than,)
        )
        return cur.rowcount

    def set_poll_state(
        self,
        component: str,
        *,
        interval: float,
        last_ok: str | None,
        last_error: str | None,
        last_error_at: str | None,
        failures: int,
        head: str | None,
        next_at: str | None,
    ) -> None:
        """Record the outcome of one poll of `component` (shown by `status`)."""
        self.conn.execute(
            "INSERT OR REPLACE INTO poll_state (component, interval, last_ok, last_error,"
            " last_error_at, failures, head, next_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (component, interval, last_ok, last_error, last_error_at, failures, head, next_at),
        )

    def poll_states(self) -> dict[str, Row]:
        if "poll_state" not in self.table_names():
            return {}
        return {r["component"]: r for r in self.query("SELECT * FROM poll_state")}
