"""Durable queues between steps (messages), step snapshots and step counters: `QueueStore`.

It shares the `Store`'s connection, so its writes are the daemon's single writer too.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from .builds import Store
from .db import Row, decode_json, utcnow

# A canary publish (issue 16): the share of a changed step's messages that its new version
# handles waits in a queue of its own, "<step>:canary" (no step id holds a ':'); when the
# canary ends, what is left there goes back into the step's queue (`merge_canary_queues`).
CANARY = ":canary"


def canary_queue(step: str) -> str:
    """The queue the new version of `step` reads during a canary."""
    return step + CANARY


def fold_canary(depths: dict[tuple[str, str], int]) -> dict[tuple[str, str], int]:
    """Queue depths with each canary queue counted in its step's."""
    if not any(step.endswith(CANARY) for _flow, step in depths):
        return depths
    out: dict[tuple[str, str], int] = {}
    for (flow, step), n in depths.items():
        key = (flow, step.removesuffix(CANARY))
        out[key] = out.get(key, 0) + n
    return out


class Queued(NamedTuple):
    """A message as an action loop takes it: its JSON columns as stored (never decoded by the
    daemon when it only forwards them)."""

    id: int
    msg_id: str
    body: str
    headers: str
    attempts: int  # rebounds so far
    failures: int  # dead-letter attempts so far (a retried letter)
    # what earlier steps of the same flow execution emitted, by step id (JSON text, as stored)
    passthrough: str = "{}"
    # files the message carries: {"<name>": {"url", "size", "content-type"}} (JSON text)
    attachments: str = "{}"


@dataclass
class QueueBatch:
    """What one group commit writes: the results of every call and message that finished in
    one event-loop tick, so each costs no transaction of its own."""

    # (flow, step, msg_id, body JSON, headers JSON, failures, passthrough JSON, attachments
    # JSON)
    enqueue: list[tuple[str, str, str, str, str, int, str, str]] = field(default_factory=list)
    delete: list[int] = field(default_factory=list)
    defer: list[tuple[float, int]] = field(default_factory=list)  # (not_before, row id)
    snapshots: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    # (flow, step) -> [processed, failed, last error or None]
    stats: dict[tuple[str, str], list[Any]] = field(default_factory=dict)
    # dead_letters rows: (flow, step, msg_id, body, headers, flow_version, component,
    # component_version, error, attempts, emitted JSON, passthrough JSON, attachments JSON)
    letters: list[tuple[Any, ...]] = field(default_factory=list)
    # (object id, flow, at): objects of the object store a queued output references
    refs: list[tuple[str, str, float]] = field(default_factory=list)
    # (flow, step, msg_id, at): messages handled on a broker (their redelivery is skipped)
    handled: list[tuple[str, str, str, float]] = field(default_factory=list)
    calls: dict[tuple[str, str], int] = field(default_factory=dict)  # trigger call numbers

    def __bool__(self) -> bool:
        return bool(
            self.enqueue
            or self.handled
            or self.calls
            or self.delete
            or self.defer
            or self.snapshots
            or self.stats
            or self.letters
            or self.refs
        )


class QueueStore:
    """The embedded runtime's queues, snapshots and counters, on the `Store`'s connection."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.conn = store.conn

    # -- queues ----------------------------------------------------------------------------

    def enqueue(self, flow: str, step: str, body: dict[str, Any], headers: dict[str, Any]) -> None:
        """Append a message to the queue of `step` (a fresh msg_id, deliverable now)."""
        self.conn.execute(
            "INSERT INTO messages (flow, step, msg_id, body, headers, created_at)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (flow, step, uuid.uuid4().hex, json.dumps(body), json.dumps(headers), utcnow()),
        )

    def fetch(self, flow: str, step: str, after: int, limit: int) -> list[Queued]:
        """Up to `limit` messages of `step` due now with row id above `after`, oldest first."""
        rows = self.conn.execute(
            "SELECT id, msg_id, body, headers, attempts, failures, passthrough, attachments"
            " FROM messages"
            " WHERE flow = ? AND step = ? AND id > ? AND not_before <= ? ORDER BY id LIMIT ?",
            (flow, step, after, time.time(), limit),
        ).fetchall()
        return [Queued(*r) for r in rows]

    def _letters_event(self, letters: list[Any]) -> None:
        """One `dead_letters.added` event per step of a group commit that dead-lettered
        messages (the notifications' source; rare next to the messages themselves)."""
        steps: dict[tuple[str, str], list[Any]] = {}
        for row in letters:
            steps.setdefault((row[0], row[1]), []).append(row)
        for (flow, step), rows in steps.items():
            error = str(rows[-1][8]).split("\n", 1)[0][:300]
            self.store.event(
                "dead_letters.added",
                f"flow {flow} step {step}: {len(rows)} message(s) dead-lettered: {error}",
                flow=flow,
                component=rows[-1][6],
                detail={"step": step, "count": len(rows), "error": error},
            )

    def commit_batch(self, batch: QueueBatch) -> None:
        """Write one group commit (call inside a transaction)."""
        now = utcnow()
        conn = self.conn
        if batch.enqueue:
            conn.executemany(
                "INSERT INTO messages (flow, step, msg_id, body, headers, failures, passthrough,"
                " attachments, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [(*row, now) for row in batch.enqueue],
            )
        if batch.defer:
            conn.executemany(
                "UPDATE messages SET attempts = attempts + 1, not_before = ? WHERE id = ?",
                batch.defer,
            )
        if batch.letters:
            conn.executemany(
                "INSERT INTO dead_letters (flow, step, msg_id, body, headers, flow_version,"
                " component, component_version, error, attempts, emitted, passthrough,"
                " attachments, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [(*row, now) for row in batch.letters],
            )
            self._letters_event(batch.letters)
        if batch.refs:
            conn.executemany(
                "INSERT OR REPLACE INTO object_refs (object_id, flow, last_seen) VALUES (?, ?, ?)",
                batch.refs,
            )
        if batch.delete:
            conn.executemany("DELETE FROM messages WHERE id = ?", [(i,) for i in batch.delete])
        for (flow, step), data in batch.snapshots.items():
            self.save_snapshot(flow, step, data)
        if batch.calls:
            conn.executemany(
                "INSERT OR REPLACE INTO trigger_calls (flow, step, seq) VALUES (?, ?, ?)",
                [(f, s, n) for (f, s), n in batch.calls.items()],
            )
        if batch.handled:
            conn.executemany(
                "INSERT OR IGNORE INTO handled (flow, step, msg_id, at) VALUES (?, ?, ?, ?)",
                batch.handled,
            )
        if batch.stats:
            conn.executemany(
                "INSERT INTO step_stats (flow, step, processed, failed, restarts, last_error)"
                " VALUES (?, ?, ?, ?, 0, ?) ON CONFLICT (flow, step) DO UPDATE SET"
                " processed = processed + excluded.processed, failed = failed + excluded.failed,"
                " last_error = COALESCE(excluded.last_error, last_error)",
                [(f, s, p, n, e) for (f, s), (p, n, e) in batch.stats.items()],
            )

    def queue_rows(self, flow: str, step: str) -> list[Queued]:
        """Every message of `step`, due or not, oldest first."""
        rows = self.conn.execute(
            "SELECT id, msg_id, body, headers, attempts, failures, passthrough, attachments"
            " FROM messages"
            " WHERE flow = ? AND step = ? ORDER BY id",
            (flow, step),
        ).fetchall()
        return [Queued(*r) for r in rows]

    def next_message(self, flow: str, step: str) -> Row | None:
        """The oldest message of `step` that is due now (body and headers decoded), or None."""
        row = self.store.one(
            "SELECT * FROM messages WHERE flow = ? AND step = ? AND not_before <= ?"
            " ORDER BY id LIMIT 1",
            (flow, step, time.time()),
        )
        return decode_json(row, "body", "headers", "passthrough", "attachments")

    def next_due(self, flow: str, step: str, after: float = -1.0) -> float | None:
        """When the earliest message queued for `step` (of those held back past `after`) may
        be delivered; None: there is none."""
        row = self.conn.execute(
            "SELECT MIN(not_before) FROM messages WHERE flow = ? AND step = ? AND not_before > ?",
            (flow, step, after),
        ).fetchone()
        return float(row[0]) if row and row[0] is not None else None

    def queue_depths(self, flow: str | None = None) -> dict[tuple[str, str], int]:
        """Queued messages by (flow, step), of one flow or of all."""
        sql = "SELECT flow, step, COUNT(*) FROM messages"
        params: tuple[Any, ...] = ()
        if flow:
            sql += " WHERE flow = ?"
            params = (flow,)
        rows = self.conn.execute(sql + " GROUP BY flow, step", params).fetchall()
        return {(r[0], r[1]): int(r[2]) for r in rows}

    def message_count(self) -> int:
        """How many messages are queued, over every flow and step."""
        row = self.conn.execute("SELECT COUNT(*) FROM messages").fetchone()
        return int(row[0]) if row else 0

    def flow_messages(self, flow: str) -> list[tuple[str, Queued]]:
        """Every message queued for `flow`, with its step, oldest first."""
        rows = self.conn.execute(
            "SELECT step, id, msg_id, body, headers, attempts, failures, passthrough,"
            " attachments FROM messages"
            " WHERE flow = ? ORDER BY id",
            (flow,),
        ).fetchall()
        return [(r[0], Queued(*r[1:])) for r in rows]

    def delete_messages(self, ids: list[int]) -> None:
        self.conn.executemany("DELETE FROM messages WHERE id = ?", [(i,) for i in ids])

    def insert_messages(self, flow: str, rows: list[tuple[str, Queued]]) -> None:
        """Queue messages (keeping their ids and attempts) at the end of their steps' queues."""
        now = utcnow()
        self.conn.executemany(
            "INSERT INTO messages (flow, step, msg_id, body, headers, attempts, failures,"
            " passthrough, attachments, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [
                (
                    flow,
                    step,
                    q.msg_id,
                    q.body,
                    q.headers,
                    q.attempts,
                    q.failures,
                    q.passthrough,
                    q.attachments,
                    now,
                )
                for step, q in rows
            ],
        )

    def merge_canary_queues(self, flow: str | None = None) -> int:
        """Messages waiting in canary queues (of `flow`, or of every flow) go back to their
        step's queue, keeping their row ids (so their order among its messages)."""
        sql = "UPDATE messages SET step = substr(step, 1, length(step) - ?) WHERE step LIKE ?"
        params: tuple[Any, ...] = (len(CANARY), "%" + CANARY)
        if flow is not None:
            sql += " AND flow = ?"
            params = (*params, flow)
        return self.conn.execute(sql, params).rowcount

    def requeue_orphans(self, flow: str, step_ids: list[str], fallback: str) -> int:
        """Messages queued for steps that no longer exist go to `fallback`."""
        marks = ",".join("?" * len(step_ids))
        cur = self.conn.execute(
            f"UPDATE messages SET step = ? WHERE flow = ? AND step NOT IN ({marks})",  # noqa: S608
            (fallback, flow, *step_ids),
        )
        return cur.rowcount

    # -- object references (retention of the object store) ----------------------------------

    def attachment_texts(self) -> list[str]:
        """The attachments (JSON text) of every queued message and dead letter that has any."""
        rows = self.conn.execute(
            "SELECT attachments FROM messages WHERE attachments != '{}'"
            " UNION ALL SELECT attachments FROM dead_letters WHERE attachments != '{}'"
        ).fetchall()
        return [str(r[0]) for r in rows]

    def object_refs(self) -> dict[str, float]:
        """When a message referencing each object was last emitted, by object id."""
        rows = self.conn.execute("SELECT object_id, last_seen FROM object_refs").fetchall()
        return {str(r[0]): float(r[1]) for r in rows}

    def forget_object_refs(self, ids: list[str]) -> None:
        self.conn.executemany("DELETE FROM object_refs WHERE object_id = ?", [(i,) for i in ids])

    # -- snapshots and stats ---------------------------------------------------------------

    def was_handled(self, flow: str, step: str, msg_id: str) -> bool:
        """Whether `step` already handled message `msg_id` (the RabbitMQ runtime's record)."""
        row = self.conn.execute(
            "SELECT 1 FROM handled WHERE flow = ? AND step = ? AND msg_id = ?",
            (flow, step, msg_id),
        ).fetchone()
        return row is not None

    def trigger_call(self, flow: str, step: str) -> int:
        """The number of the last recorded call of trigger `step` (0: none yet)."""
        row = self.conn.execute(
            "SELECT seq FROM trigger_calls WHERE flow = ? AND step = ?", (flow, step)
        ).fetchone()
        return int(row[0]) if row else 0

    def broker_queues(self) -> list[tuple[str, str]]:
        """(flow, step) of every step queue declared on the broker."""
        rows = self.conn.execute("SELECT flow, step FROM broker_queues ORDER BY flow, step")
        return [(r[0], r[1]) for r in rows]

    def add_broker_queue(self, flow: str, step: str) -> None:
        self.conn.execute(
            "INSERT OR IGNORE INTO broker_queues (flow, step) VALUES (?, ?)", (flow, step)
        )

    def prune_handled(self, before: float) -> int:
        """Forget handled-message records older than `before` (epoch seconds)."""
        return self.conn.execute("DELETE FROM handled WHERE at < ?", (before,)).rowcount

    def snapshot(self, flow: str, step: str) -> dict[str, Any]:
        """The last committed snapshot of a step ({} when it has none)."""
        row = self.conn.execute(
            "SELECT data FROM snapshots WHERE flow = ? AND step = ?", (flow, step)
        ).fetchone()
        return dict(json.loads(row[0])) if row else {}

    def save_snapshot(self, flow: str, step: str, data: dict[str, Any]) -> None:
        """Replace the snapshot of a step."""
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
        """Add to a step's counters; `error`, when given, becomes its last error."""
        self.conn.execute(
            "INSERT INTO step_stats (flow, step, processed, failed, restarts, last_error)"
            " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (flow, step) DO UPDATE SET"
            " processed = processed + excluded.processed, failed = failed + excluded.failed,"
            " restarts = restarts + excluded.restarts,"
            " last_error = COALESCE(excluded.last_error, last_error)",
            (flow, step, processed, failed, restarts, error),
        )

    def stats(self, flow: str) -> dict[str, Row]:
        """The counters of every step of `flow`, by step id."""
        rows = self.store.query("SELECT * FROM step_stats WHERE flow = ?", (flow,))
        return {r["step"]: r for r in rows}
