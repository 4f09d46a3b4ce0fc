"""Quarantined component versions, per flow (issue 16): `QuarantineStore`.

A row says "the automatic publish of `component` v`version` to `flow` failed (warm-up or
rollback): do not try it again automatically". It shares the `Store`'s connection, so its
writes are the daemon's single writer too; readers (status, `flow show`) read it with the
daemon down.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable

from .builds import Store
from .db import Row, utcnow


class QuarantineStore:
    """The quarantined versions of every flow, on the `Store`'s connection."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.conn = store.conn

    def add(
        self,
        flow: str,
        versions: Iterable[tuple[str, int]],
        reason: str,
        deployment: int | None,
    ) -> None:
        """Quarantine each (component, version) for `flow` (inside the caller's transaction);
        a version quarantined before keeps its first reason."""
        now = utcnow()
        self.conn.executemany(
            "INSERT OR IGNORE INTO quarantine (flow, component, version, reason, deployment,"
            " created_at) VALUES (?, ?, ?, ?, ?, ?)",
            [(flow, c, v, reason, deployment, now) for c, v in versions],
        )

    def lift(self, flow: str, component: str, version: int) -> bool:
        """Forget one quarantine (inside the caller's transaction); True when there was one."""
        cur = self.conn.execute(
            "DELETE FROM quarantine WHERE flow = ? AND component = ? AND version = ?",
            (flow, component, version),
        )
        return cur.rowcount > 0

    def get(self, flow: str, component: str, version: int) -> Row | None:
        """The quarantine of one version for `flow`, or None."""
        return self.store.one(
            "SELECT flow, component, version, reason, deployment, created_at FROM quarantine"
            " WHERE flow = ? AND component = ? AND version = ?",
            (flow, component, version),
        )

    def all(self) -> dict[str, list[Row]]:
        """Every quarantined version by flow, oldest first; empty in a database the daemon has
        not upgraded yet (read-only readers of an older state)."""
        try:
            rows = self.store.query(
                "SELECT flow, component, version, reason, deployment, created_at"
                " FROM quarantine ORDER BY flow, created_at, component, version"
            )
        except sqlite3.OperationalError:
            return {}
        out: dict[str, list[Row]] = {}
        for row in rows:
            out.setdefault(str(row["flow"]), []).append(row)
        return out
