"""The outbox table (m018): commit statuses and notifications waiting to be delivered.

Rows are added by the outbox's event listener inside the transaction of the event that caused
them; the sender (`outbox/sender.py`) takes due rows, sends them, and records the result. A
row never holds a url or a token: only which config entry it is for (`target`).
"""

from __future__ import annotations

import json
import time
from typing import Any

from .db import Row, StoreCore, utcnow

PENDING, DELIVERED, FAILED, SUPERSEDED = "pending", "delivered", "failed", "superseded"


class OutboxStore:
    """Typed access to the `outbox` table, on the `Store`'s connection."""

    def __init__(self, store: StoreCore) -> None:
        self.store = store

    def add(
        self,
        target: str,
        kind: str,
        payload: dict[str, Any],
        *,
        key: str | None = None,
        event_id: int | None = None,
        now: float | None = None,
    ) -> int:
        """Queue one delivery, due now. With `key`, older pending rows of that key are
        superseded: only the newest status of a commit's context is worth sending. Call inside
        the caller's transaction (the event's)."""
        now = time.time() if now is None else now
        conn = self.store.conn
        if key is not None:
            conn.execute(
                "UPDATE outbox SET state = ?, finished_at = ? WHERE key = ? AND state = ?",
                (SUPERSEDED, utcnow(), key, PENDING),
            )
        cur = conn.execute(
            "INSERT INTO outbox (event_id, target, kind, key, payload, state, next_at, created,"
            " created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (event_id, target, kind, key, json.dumps(payload), PENDING, now, now, utcnow()),
        )
        return int(cur.lastrowid or 0)

    def created_since(self, key: str, since: float) -> bool:
        """Whether a delivery of `key` was queued at or after `since` (a throttle's check)."""
        row = self.store.conn.execute(
            "SELECT 1 FROM outbox WHERE key = ? AND created >= ? LIMIT 1", (key, since)
        ).fetchone()
        return row is not None

    def due(self, now: float | None = None, limit: int = 20) -> list[Row]:
        """Pending rows whose time has come, oldest first, their payload decoded."""
        now = time.time() if now is None else now
        rows = self.store.query(
            "SELECT * FROM outbox WHERE state = ? AND next_at <= ? ORDER BY id LIMIT ?",
            (PENDING, now, limit),
        )
        for row in rows:
            row["payload"] = json.loads(row["payload"])
        return rows

    def next_due(self) -> float | None:
        """When the earliest pending row is due (epoch seconds), or None when none is."""
        row = self.store.conn.execute(
            "SELECT MIN(next_at) FROM outbox WHERE state = ?", (PENDING,)
        ).fetchone()
        return float(row[0]) if row and row[0] is not None else None

    def delivered(self, row_id: int) -> None:
        with self.store.tx() as conn:
            conn.execute(
                "UPDATE outbox SET state = ?, attempts = attempts + 1, last_error = NULL,"
                " finished_at = ? WHERE id = ? AND state = ?",
                (DELIVERED, utcnow(), row_id, PENDING),
            )

    def retry(self, row_id: int, at: float, error: str) -> None:
        """Try again at `at` (epoch seconds); `error` says why the attempt failed. The other
        pending rows of the same target wait as long: its service is down for them too."""
        with self.store.tx() as conn:
            conn.execute(
                "UPDATE outbox SET attempts = attempts + 1, next_at = ?, last_error = ?"
                " WHERE id = ? AND state = ?",
                (at, error[:500], row_id, PENDING),
            )
            conn.execute(
                "UPDATE outbox SET next_at = ? WHERE state = ? AND next_at < ? AND target ="
                " (SELECT target FROM outbox WHERE id = ?)",
                (at, PENDING, at, row_id),
            )

    def prune(self, before: float) -> int:
        """Delete finished rows (delivered, failed, superseded) queued before `before`."""
        with self.store.tx() as conn:
            cur = conn.execute(
                "DELETE FROM outbox WHERE state != ? AND created < ?", (PENDING, before)
            )
        return cur.rowcount

    def give_up(self, row_id: int, error: str) -> None:
        """Never tried again: the service refused it, or it is older than the maximum age."""
        with self.store.tx() as conn:
            conn.execute(
                "UPDATE outbox SET state = ?, attempts = attempts + 1, last_error = ?,"
                " finished_at = ? WHERE id = ? AND state = ?",
                (FAILED, error[:500], utcnow(), row_id, PENDING),
            )

    def counts(self) -> dict[str, int]:
        """How many rows are pending and failed (for `deployd status`)."""
        out = {PENDING: 0, FAILED: 0}
        for state, n in self.store.conn.execute(
            "SELECT state, COUNT(*) FROM outbox WHERE state IN (?, ?) GROUP BY state",
            (PENDING, FAILED),
        ):
            out[state] = int(n)
        return out

    def last_failure(self) -> Row | None:
        """The newest given-up delivery (its target, kind and error), or None."""
        return self.store.one(
            "SELECT id, target, kind, last_error, finished_at FROM outbox WHERE state = ?"
            " ORDER BY id DESC LIMIT 1",
            (FAILED,),
        )

    def rows(self, limit: int = 100) -> list[Row]:
        """The newest rows, payload decoded (tests, debugging)."""
        rows = self.store.query("SELECT * FROM outbox ORDER BY id DESC LIMIT ?", (limit,))
        for row in rows:
            row["payload"] = json.loads(row["payload"])
        return rows
