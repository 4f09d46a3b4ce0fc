"""Runs of ordinary (scheduled) flows and their next due times: `RunStore` (migration m012).

It shares the `Store`'s connection, so its writes are the daemon's single writer too. A run is
inserted `running` before its steps start (the intent) and finished with its status after (the
result); `interrupt_running` turns what a killed daemon left into `failed` runs at start-up.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence
from typing import Any

from .builds import Store
from .db import Row, decode_json, utcnow

# What `flow runs --json` shows of a run.
_RUN = (
    "id, flow, cause, status, flow_version, steps, handled, errors, reason, started_at, finished_at"
)


class RunStore:
    """`flow_runs` and `flow_schedules`, on the `Store`'s connection."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.conn = store.conn

    # -- runs ------------------------------------------------------------------------------

    def start_run(
        self, flow: str, cause: str, flow_version: int | None, steps: Sequence[dict[str, Any]]
    ) -> int:
        """Record a run as `running` (call inside a transaction); its id."""
        cur = self.conn.execute(
            "INSERT INTO flow_runs (flow, cause, status, flow_version, steps, started_at)"
            " VALUES (?, ?, 'running', ?, ?, ?)",
            (flow, cause, flow_version, json.dumps(list(steps)), utcnow()),
        )
        assert cur.lastrowid is not None
        return cur.lastrowid

    def set_run_steps(self, run_id: int, steps: Sequence[dict[str, Any]]) -> None:
        """The component version each step of a run resolved to (once it is known)."""
        self.conn.execute(
            "UPDATE flow_runs SET steps = ? WHERE id = ?", (json.dumps(list(steps)), run_id)
        )

    def finish_run(
        self,
        run_id: int,
        status: str,
        handled: int = 0,
        errors: Sequence[str] = (),
        reason: str | None = None,
        steps: Sequence[dict[str, Any]] | None = None,
    ) -> None:
        """Record how a run ended (call inside a transaction)."""
        self.conn.execute(
            "UPDATE flow_runs SET status = ?, handled = ?, errors = ?, reason = ?,"
            " steps = COALESCE(?, steps), finished_at = ? WHERE id = ?",
            (
                status,
                handled,
                json.dumps(list(errors)),
                reason,
                None if steps is None else json.dumps(list(steps)),
                utcnow(),
                run_id,
            ),
        )

    def skipped_run(self, flow: str, cause: str, reason: str) -> int:
        """Record a run that did not happen (its due time came while one was going)."""
        now = utcnow()
        cur = self.conn.execute(
            "INSERT INTO flow_runs (flow, cause, status, reason, started_at, finished_at)"
            " VALUES (?, ?, 'skipped', ?, ?, ?)",
            (flow, cause, reason, now, now),
        )
        assert cur.lastrowid is not None
        return cur.lastrowid

    def prune(self, flow: str, keep: int) -> int:
        """Forget all but the newest `keep` runs of `flow` (a flow run every second would
        otherwise add 86,400 rows a day); how many were removed."""
        return self.conn.execute(
            "DELETE FROM flow_runs WHERE flow = ? AND status != 'running' AND id <="
            " (SELECT id FROM flow_runs WHERE flow = ? ORDER BY id DESC LIMIT 1 OFFSET ?)",
            (flow, flow, keep),
        ).rowcount

    def interrupt_running(self, reason: str) -> list[Row]:
        """Every run left `running` becomes `failed` with `reason` (start-up); those runs."""
        rows = self.store.query("SELECT id, flow FROM flow_runs WHERE status = 'running'")
        if rows:
            self.conn.execute(
                "UPDATE flow_runs SET status = 'failed', reason = ?, errors = ?, finished_at = ?"
                " WHERE status = 'running'",
                (reason, json.dumps([reason]), utcnow()),
            )
        return rows

    def runs(self, flow: str, limit: int = 50) -> list[Row]:
        """The runs of `flow`, newest first."""
        rows = self.store.query(
            f"SELECT {_RUN} FROM flow_runs WHERE flow = ? ORDER BY id DESC LIMIT ?",  # noqa: S608
            (flow, limit),
        )
        return [r for r in (decode_json(row, "steps", "errors") for row in rows) if r]

    def run(self, run_id: int) -> Row | None:
        row = self.store.one(f"SELECT {_RUN} FROM flow_runs WHERE id = ?", (run_id,))  # noqa: S608
        return decode_json(row, "steps", "errors")

    def last_runs(self) -> dict[str, Row]:
        """The newest finished or running run of every flow (skipped ones included), by flow;
        empty in a database the daemon has not upgraded yet (before m012)."""
        try:
            rows = self.store.query(
                "SELECT id, flow, status, finished_at FROM flow_runs WHERE id IN"
                " (SELECT MAX(id) FROM flow_runs GROUP BY flow)"
            )
        except sqlite3.OperationalError:
            return {}
        return {r["flow"]: r for r in rows}

    # -- what a run did --------------------------------------------------------------------

    def processed(self, flow: str, steps: Sequence[str]) -> int:
        """Messages `steps` of `flow` have handled so far (their counters, summed)."""
        if not steps:
            return 0
        marks = ", ".join("?" for _ in steps)
        row = self.conn.execute(
            f"SELECT COALESCE(SUM(processed), 0) FROM step_stats"  # noqa: S608 - placeholders
            f" WHERE flow = ? AND step IN ({marks})",
            (flow, *steps),
        ).fetchone()
        return int(row[0])

    def last_letter_id(self) -> int:
        row = self.conn.execute("SELECT COALESCE(MAX(id), 0) FROM dead_letters").fetchone()
        return int(row[0])

    def letters_since(self, flow: str, after: int, limit: int = 20) -> tuple[list[Row], int]:
        """Dead letters of `flow` written after letter `after`: the first `limit` (step and
        error) and how many there are."""
        rows = self.store.query(
            "SELECT step, error FROM dead_letters WHERE flow = ? AND id > ? ORDER BY id LIMIT ?",
            (flow, after, limit),
        )
        count = self.conn.execute(
            "SELECT COUNT(*) FROM dead_letters WHERE flow = ? AND id > ?", (flow, after)
        ).fetchone()[0]
        return rows, int(count)

    # -- schedules -------------------------------------------------------------------------

    def next_run_at(self, flow: str) -> str | None:
        row = self.conn.execute(
            "SELECT next_run_at FROM flow_schedules WHERE flow = ?", (flow,)
        ).fetchone()
        return str(row[0]) if row and row[0] else None

    def next_runs(self) -> dict[str, str | None]:
        """Every flow's next due time (empty before m012)."""
        try:
            rows = self.conn.execute("SELECT flow, next_run_at FROM flow_schedules").fetchall()
        except sqlite3.OperationalError:
            return {}
        return {str(f): (str(n) if n else None) for f, n in rows}

    def set_next_run(self, flow: str, at: str | None) -> None:
        """When `flow` is due next (None: not scheduled, e.g. stopped)."""
        self.conn.execute(
            "INSERT INTO flow_schedules (flow, next_run_at) VALUES (?, ?)"
            " ON CONFLICT (flow) DO UPDATE SET next_run_at = excluded.next_run_at",
            (flow, at),
        )
