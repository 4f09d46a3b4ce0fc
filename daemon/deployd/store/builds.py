"""Builds, component versions, paused items, webhook deliveries and poll state: `Store`.

`Store` is the core (`db.py`) plus these tables; the daemon, the CLI and the API hold one.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

from .db import Row, StoreCore, utcnow


class Store(StoreCore):
    """Typed access to the state database. Construct with `Store.open` or `Store.readonly`."""

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
        """Point the build at its log file."""
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
                    detail={"build": build_id, "error": error, "retryable": retryable},
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
        warnings: list[str] | None = None,
    ) -> int:
        """Mark the build succeeded and register its component version, in one transaction.

        `warnings` are what the build found worth telling but not failing for (an
        `engines.node` the node in use does not satisfy), shown by `versions`.
        """
        with self.tx() as conn:
            component, sha = conn.execute(
                "SELECT component, sha FROM builds WHERE id = ?", (build_id,)
            ).fetchone()
            same = (
                conn.execute(
                    "SELECT MAX(version) FROM versions WHERE component = ? AND semver = ?",
                    (component, semver),
                ).fetchone()[0]
                if semver
                else None
            )
            now = utcnow()
            conn.execute(
                "INSERT INTO versions (component, version, sha, semver, runtime, descriptor,"
                " artifact_dir, build_id, built_at, warnings)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
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
                    json.dumps(list(warnings or [])),
                ),
            )
            conn.execute(
                "UPDATE builds SET status = 'succeeded', version = ?, finished_at = ? WHERE id = ?",
                (version, now, build_id),
            )
            self.event(
                "version.registered",
                f"{component} v{version} registered from {sha[:12]}"
                + (f" (semver {semver}" + (f", as v{same})" if same else ")") if semver else "")
                + "".join(f"; warning: {w}" for w in warnings or []),
                component=component,
                sha=sha,
                detail={"version": version, "build": build_id},
            )
        return version

    def next_version_number(self, component: str) -> int:
        """The number the next version of `component` gets (1 for the first)."""
        row = self.conn.execute(
            "SELECT COALESCE(MAX(version), 0) FROM versions WHERE component = ?", (component,)
        ).fetchone()
        return int(row[0]) + 1

    def build(self, build_id: int) -> Row | None:
        """One build, or None."""
        return self.one("SELECT * FROM builds WHERE id = ?", (build_id,))

    def builds(self, component: str | None = None, limit: int = 50) -> list[Row]:
        """The newest builds, of one component or of all."""
        if component:
            return self.query(
                "SELECT * FROM builds WHERE component = ? ORDER BY id DESC LIMIT ?",
                (component, limit),
            )
        return self.query("SELECT * FROM builds ORDER BY id DESC LIMIT ?", (limit,))

    def last_build(self, component: str | None = None) -> Row | None:
        """The newest build of `component` (of any component when None), or None."""
        if component is None:
            return self.one("SELECT * FROM builds ORDER BY id DESC LIMIT 1")
        return self.one(
            "SELECT * FROM builds WHERE component = ? ORDER BY id DESC LIMIT 1", (component,)
        )

    def has_final_build(self, component: str, sha: str) -> bool:
        """True when `sha` already has a version or a failed build that is not worth retrying,
        or was ignored because it changes none of the component's `paths`."""
        row = self.conn.execute(
            "SELECT 1 FROM builds WHERE component = ? AND sha = ? AND"
            " (status = 'succeeded' OR (status = 'failed' AND retryable = 0))"
            " UNION ALL SELECT 1 FROM ignored_commits WHERE component = ? AND sha = ? LIMIT 1",
            (component, sha, component, sha),
        ).fetchone()
        return row is not None

    def ignore_commit(self, component: str, sha: str, reason: str) -> None:
        """Record that `sha` builds nothing for `component` (no change under its `paths`),
        with the `push.ignored` event saying why; one transaction."""
        with self.tx():
            self.conn.execute(
                "INSERT OR REPLACE INTO ignored_commits (component, sha, reason, at)"
                " VALUES (?, ?, ?, ?)",
                (component, sha, reason, utcnow()),
            )
            self.event("push.ignored", f"{component}: {reason}", component=component, sha=sha)

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
        """The versions of `component`, newest first, without their descriptors (`warnings`
        decoded: a list of strings)."""
        rows = self.query(
            "SELECT component, version, sha, semver, runtime, artifact_dir, build_id, built_at,"
            " warnings FROM versions WHERE component = ? ORDER BY version DESC LIMIT ?",
            (component, limit),
        )
        for row in rows:
            row["warnings"] = json.loads(row["warnings"] or "[]")
        return rows

    def version(self, component: str, version: int) -> Row | None:
        """One version with its decoded descriptor, or None."""
        row = self.one(
            "SELECT * FROM versions WHERE component = ? AND version = ?", (component, version)
        )
        if row:
            row["descriptor"] = json.loads(row["descriptor"])
            row["warnings"] = json.loads(row["warnings"] or "[]")
        return row

    def recent(self, component: str) -> Row | None:
        """The newest good version of `component`, or None."""
        row = self.one(
            "SELECT * FROM versions WHERE component = ? ORDER BY version DESC LIMIT 1",
            (component,),
        )
        if row:
            row["descriptor"] = json.loads(row["descriptor"])
            row["warnings"] = json.loads(row["warnings"] or "[]")
        return row

    def recent_all(self) -> dict[str, Row]:
        """The recent version of every component, in one query (for `status`)."""
        rows = self.query(
            "SELECT v.component, v.version, v.sha, v.semver, v.built_at FROM versions v"
            " JOIN (SELECT component, MAX(version) AS version FROM versions GROUP BY component) m"
            " ON v.component = m.component AND v.version = m.version"
        )
        return {r["component"]: r for r in rows}

    def recent_commits(self) -> dict[str, Row]:
        """The commit subject and author, and the build's start and end, of every component's
        recent version (for `status`; none in a database before m019)."""
        try:
            rows = self.query(
                "SELECT v.component, b.subject, b.author, b.started_at, b.finished_at"
                " FROM versions v JOIN builds b ON b.id = v.build_id"
                " JOIN (SELECT component, MAX(version) AS version FROM versions"
                " GROUP BY component) m ON v.component = m.component AND v.version = m.version"
            )
        except sqlite3.OperationalError:
            return {}
        return {r["component"]: r for r in rows}

    def set_build_commit(self, build_id: int, subject: str, author: str) -> None:
        """Record the commit subject and author of a build."""
        with self.tx() as conn:
            conn.execute(
                "UPDATE builds SET subject = ?, author = ? WHERE id = ?",
                (subject, author, build_id),
            )

    def last_builds_all(self) -> dict[str, Row]:
        """The newest build of every component, in one query (for `status`)."""
        rows = self.query(
            "SELECT b.id, b.component, b.sha, b.status, b.error, b.started_at, b.finished_at"
            " FROM builds b"
            " JOIN (SELECT component, MAX(id) AS id FROM builds GROUP BY component) m"
            " ON b.id = m.id"
        )
        return {r["component"]: r for r in rows}

    def artifact_dirs(self) -> set[str]:
        """Every artifact folder a version row points at ('' once retention removed it)."""
        return {r[0] for r in self.conn.execute("SELECT artifact_dir FROM versions").fetchall()}

    def has_version(self, component: str, sha: str) -> bool:
        """True when `sha` of `component` is a registered version."""
        row = self.conn.execute(
            "SELECT 1 FROM versions WHERE component = ? AND sha = ?", (component, sha)
        ).fetchone()
        return row is not None

    def version_for_sha(self, component: str, sha: str) -> Row | None:
        """The version registered from `sha` (component, version, sha, semver), or None."""
        return self.one(
            "SELECT component, version, sha, semver FROM versions WHERE component = ? AND sha = ?",
            (component, sha),
        )

    def last_semver(self, component: str) -> Row | None:
        """The newest version of `component` that declared a semver (version, semver), or None."""
        return self.one(
            "SELECT version, semver FROM versions WHERE component = ? AND semver IS NOT NULL"
            " ORDER BY version DESC LIMIT 1",
            (component,),
        )

    # -- retention -------------------------------------------------------------------------

    def prunable_versions(self, keep_versions: int) -> list[Row]:
        """Versions with an artifact folder that are not among the newest `keep_versions` of
        their component (component, version, artifact_dir), oldest first."""
        return self.query(
            "SELECT component, version, artifact_dir FROM versions v WHERE artifact_dir != ''"
            " AND version <= (SELECT MAX(version) FROM versions w WHERE w.component = v.component)"
            " - ? ORDER BY component, version",
            (keep_versions,),
        )

    def finished_build_logs(self) -> list[Row]:
        """The log of every finished build that still has one (id, log_path)."""
        return self.query(
            "SELECT id, log_path FROM builds WHERE log_path IS NOT NULL AND finished_at IS NOT NULL"
        )

    def mark_pruned(self, versions: list[tuple[str, int]], build_ids: list[int]) -> None:
        """Record, in one transaction, that retention removed these versions' artifact folders
        and these builds' logs (the rows stay: history is never rewritten)."""
        with self.tx() as conn:
            conn.executemany(
                "UPDATE versions SET artifact_dir = '' WHERE component = ? AND version = ?",
                versions,
            )
            conn.executemany(
                "UPDATE builds SET log_path = NULL WHERE id = ?", [(b,) for b in build_ids]
            )

    # -- operator state: paused flows and components ---------------------------------------

    def paused(self) -> dict[str, list[str]]:
        """The names of the paused flows and components, by kind."""
        out: dict[str, list[str]] = {"flow": [], "component": []}
        for kind, name in self.conn.execute("SELECT kind, name FROM paused ORDER BY name"):
            out[kind].append(name)
        return out

    def set_paused(self, kind: str, name: str, paused: bool) -> None:
        """Pause or resume a flow or component (and record the event)."""
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

    # -- webhooks and polling (issue 4) ----------------------------------------------------

    def has_delivery(self, component: str, delivery_id: str) -> bool:
        """True when this webhook delivery id of `component` was already received."""
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
        """The last poll outcome of every polled component."""
        if "poll_state" not in self.table_names():
            return {}
        return {r["component"]: r for r in self.query("SELECT * FROM poll_state")}
