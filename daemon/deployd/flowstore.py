"""SQL for flows: flows, flow versions, drafts, deployments, durable queues and snapshots.

The companion of `store.py` (together they are the only modules that write SQL); it shares
the `Store`'s connection, so its writes are the daemon's single writer too.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from .store import Row, Store, utcnow


class FlowStore:
    def __init__(self, store: Store) -> None:
        self.store = store
        self.conn = store.conn

    # -- flows -----------------------------------------------------------------------------

    def flow(self, name: str) -> Row | None:
        return self.store.one("SELECT * FROM flows WHERE name = ?", (name,))

    def flows(self) -> list[Row]:
        return self.store.query("SELECT * FROM flows ORDER BY name")

    def create_flow(self, name: str, type_: str, update: str) -> None:
        now = utcnow()
        self.conn.execute(
            'INSERT INTO flows (name, type, "update", enabled, created_at, updated_at)'
            " VALUES (?, ?, ?, 0, ?, ?)",
            (name, type_, update, now, now),
        )

    def set_flow(self, name: str, **fields: Any) -> None:
        if not fields:
            return
        cols = ", ".join(f'"{k}" = ?' for k in fields)
        self.conn.execute(
            f"UPDATE flows SET {cols}, updated_at = ? WHERE name = ?",  # noqa: S608 - fixed keys
            (*fields.values(), utcnow(), name),
        )

    # -- versions and drafts ---------------------------------------------------------------

    def flow_version(self, name: str, version: int) -> Row | None:
        row = self.store.one(
            "SELECT * FROM flow_versions WHERE flow = ? AND version = ?", (name, version)
        )
        return _decode(row, "spec", "steps")

    def flow_versions(self, name: str) -> list[Row]:
        rows = self.store.query(
            "SELECT * FROM flow_versions WHERE flow = ? ORDER BY version DESC", (name,)
        )
        return [_decode(r, "spec", "steps") for r in rows]  # type: ignore[misc]

    def add_flow_version(
        self, name: str, spec: dict[str, Any], steps: list[dict[str, Any]], reason: str | None
    ) -> int:
        row = self.conn.execute(
            "SELECT COALESCE(MAX(version), 0) + 1 FROM flow_versions WHERE flow = ?", (name,)
        ).fetchone()
        version = int(row[0])
        self.conn.execute(
            "INSERT INTO flow_versions (flow, version, spec, steps, created_at, reason)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (name, version, json.dumps(spec), json.dumps(steps), utcnow(), reason),
        )
        return version

    def draft(self, name: str) -> Row | None:
        return _decode(
            self.store.one("SELECT * FROM drafts WHERE flow = ?", (name,)),
            "spec",
            "steps",
            "problems",
        )

    def put_draft(
        self,
        name: str,
        spec: dict[str, Any],
        steps: list[dict[str, Any]],
        problems: list[str],
        reason: str | None,
    ) -> None:
        self.conn.execute(
            "INSERT OR REPLACE INTO drafts (flow, spec, steps, problems, reason, created_at)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (name, json.dumps(spec), json.dumps(steps), json.dumps(problems), reason, utcnow()),
        )

    def delete_draft(self, name: str) -> None:
        self.conn.execute("DELETE FROM drafts WHERE flow = ?", (name,))

    # -- deployments -----------------------------------------------------------------------

    def start_deployment(
        self,
        flow: str,
        from_version: int | None,
        to_version: int,
        trigger: str,
        component: str | None = None,
        component_version: int | None = None,
        sha: str | None = None,
    ) -> int:
        cur = self.conn.execute(
            "INSERT INTO deployments (flow, from_version, to_version, trigger, component,"
            " component_version, sha, status, started_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, 'starting_new', ?)",
            (flow, from_version, to_version, trigger, component, component_version, sha, utcnow()),
        )
        return int(cur.lastrowid or 0)

    def set_deployment(self, dep_id: int, **fields: Any) -> None:
        if fields.get("status") in ("done", "failed", "rolled_back"):
            fields.setdefault("finished_at", utcnow())
        cols = ", ".join(f"{k} = ?" for k in fields)
        self.conn.execute(
            f"UPDATE deployments SET {cols} WHERE id = ?",  # noqa: S608 - fixed keys
            (*fields.values(), dep_id),
        )

    def deployments(self, flow: str | None = None, limit: int = 50) -> list[Row]:
        if flow:
            return self.store.query(
                "SELECT * FROM deployments WHERE flow = ? ORDER BY id DESC LIMIT ?", (flow, limit)
            )
        return self.store.query("SELECT * FROM deployments ORDER BY id DESC LIMIT ?", (limit,))

    def last_deployments(self) -> dict[str, Row]:
        rows = self.store.query(
            "SELECT d.* FROM deployments d JOIN (SELECT flow, MAX(id) AS id FROM deployments"
            " GROUP BY flow) m ON d.id = m.id"
        )
        return {r["flow"]: r for r in rows}

    def unfinished_deployments(self) -> list[Row]:
        return self.store.query(
            "SELECT * FROM deployments WHERE status IN ('starting_new', 'switching')"
        )

    # -- queues ----------------------------------------------------------------------------

    def enqueue(self, flow: str, step: str, body: dict[str, Any], headers: dict[str, Any]) -> None:
        self.conn.execute(
            "INSERT INTO messages (flow, step, msg_id, body, headers, created_at)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (flow, step, uuid.uuid4().hex, json.dumps(body), json.dumps(headers), utcnow()),
        )

    def next_message(self, flow: str, step: str) -> Row | None:
        row = self.store.one(
            "SELECT * FROM messages WHERE flow = ? AND step = ? AND not_before <= ?"
            " ORDER BY id LIMIT 1",
            (flow, step, time.time()),
        )
        return _decode(row, "body", "headers")

    def next_due(self, flow: str, step: str) -> float | None:
        """When the earliest message queued for `step` may be delivered (None: queue empty)."""
        row = self.conn.execute(
            "SELECT MIN(not_before) FROM messages WHERE flow = ? AND step = ?", (flow, step)
        ).fetchone()
        return float(row[0]) if row and row[0] is not None else None

    def delete_message(self, row_id: int) -> None:
        self.conn.execute("DELETE FROM messages WHERE id = ?", (row_id,))

    def defer_message(self, row_id: int, delay: float) -> int:
        self.conn.execute(
            "UPDATE messages SET attempts = attempts + 1, not_before = ? WHERE id = ?",
            (time.time() + delay, row_id),
        )
        row = self.conn.execute("SELECT attempts FROM messages WHERE id = ?", (row_id,)).fetchone()
        return int(row[0]) if row else 0

    def queue_depths(self, flow: str | None = None) -> dict[tuple[str, str], int]:
        sql = "SELECT flow, step, COUNT(*) FROM messages"
        params: tuple[Any, ...] = ()
        if flow:
            sql += " WHERE flow = ?"
            params = (flow,)
        rows = self.conn.execute(sql + " GROUP BY flow, step", params).fetchall()
        return {(r[0], r[1]): int(r[2]) for r in rows}

    def requeue_orphans(self, flow: str, step_ids: list[str], fallback: str) -> int:
        """Messages queued for steps that no longer exist go to `fallback`."""
        marks = ",".join("?" * len(step_ids))
        cur = self.conn.execute(
            f"UPDATE messages SET step = ? WHERE flow = ? AND step NOT IN ({marks})",  # noqa: S608
            (fallback, flow, *step_ids),
        )
        return cur.rowcount

    # -- snapshots and stats ---------------------------------------------------------------

    def snapshot(self, flow: str, step: str) -> dict[str, Any]:
        row = self.conn.execute(
            "SELECT data FROM snapshots WHERE flow = ? AND step = ?", (flow, step)
        ).fetchone()
        return dict(json.loads(row[0])) if row else {}

    def save_snapshot(self, flow: str, step: str, data: dict[str, Any]) -> None:
        self.conn.execute(
            "INSERT OR REPLACE INTO snapshots (flow, step, data, updated_at) VALUES (?, ?, ?, ?)",
            (flow, step, json.dumps(data), utcnow()),
        )

    def count(
        self,
        flow: str,
        step: str,
        processed: int = 0,
        failed: int = 0,
        restarts: int = 0,
        error: str | None = None,
    ) -> None:
        self.conn.execute(
            "INSERT INTO step_stats (flow, step, processed, failed, restarts, last_error)"
            " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (flow, step) DO UPDATE SET"
            " processed = processed + excluded.processed, failed = failed + excluded.failed,"
            " restarts = restarts + excluded.restarts,"
            " last_error = COALESCE(excluded.last_error, last_error)",
            (flow, step, processed, failed, restarts, error),
        )

    def stats(self, flow: str) -> dict[str, Row]:
        rows = self.store.query("SELECT * FROM step_stats WHERE flow = ?", (flow,))
        return {r["step"]: r for r in rows}


def _decode(row: Row | None, *cols: str) -> Row | None:
    if row is None:
        return None
    for col in cols:
        if isinstance(row.get(col), str):
            row[col] = json.loads(row[col])
    return row
