"""Dead letters: messages whose handling failed, kept with their input: `DeadLetterStore`.

A letter is written in the same transaction that removes its message from its queue (the
router's group commit, `QueueStore.commit_batch`), so a failed message is never in both
places and never in neither. `requeue` puts letters back at the end of a queue (their
attempts carried in `messages.failures`, so a letter that fails again comes back with its
attempts increased); `delete` discards them; `prune` is retention. It shares the `Store`'s
connection, so its writes are the daemon's single writer too.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from .builds import Store
from .db import Row, decode_json, utcnow

# The columns `flow errors` lists (the body, headers, emitted outputs and full error are
# read only for one letter, or for a retry).
_LISTED = (
    "id, flow, step, msg_id, flow_version, component, component_version, error, attempts,"
    " created_at"
)


class DeadLetterStore:
    """The dead letters of every flow, on the `Store`'s connection."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.conn = store.conn

    def letters(self, flow: str, step: str | None = None, limit: int | None = None) -> list[Row]:
        """The letters of `flow` (of one step: `step`; "ID" also matches "ID:mapper"), newest
        first, without their bodies."""
        sql = f"SELECT {_LISTED} FROM dead_letters WHERE flow = ?"  # noqa: S608 - fixed columns
        params: list[Any] = [flow]
        if step is not None:
            sql += " AND (step = ? OR step = ?)"
            params += [step, f"{step}:mapper"]
        sql += " ORDER BY id DESC"
        if limit is not None:
            sql += " LIMIT ?"
            params.append(limit)
        return self.store.query(sql, params)

    def letter(self, flow: str, letter_id: int) -> Row | None:
        """One whole letter (body, headers, passthrough and emitted outputs decoded), or None."""
        row = self.store.one(
            "SELECT * FROM dead_letters WHERE flow = ? AND id = ?", (flow, letter_id)
        )
        return decode_json(row, "body", "headers", "emitted", "passthrough", "attachments")

    def select(self, flow: str, step: str | None, ids: Sequence[int] | None) -> list[Row]:
        """Whole letters of `flow` to retry or discard, oldest first: those with `ids` (of
        `step`, when given), or every letter (of `step`) when `ids` is None."""
        sql = "SELECT * FROM dead_letters WHERE flow = ?"
        params: list[Any] = [flow]
        if step is not None:
            sql += " AND (step = ? OR step = ?)"
            params += [step, f"{step}:mapper"]
        if ids is not None:
            if not ids:
                return []
            sql += f" AND id IN ({','.join('?' * len(ids))})"
            params += list(ids)
        return self.store.query(sql + " ORDER BY id", params)

    def counts(self, flow: str | None = None) -> dict[tuple[str, str], int]:
        """Letters by (flow, step) ("ID:mapper" for failed mappings), of one flow or of all."""
        sql = "SELECT flow, step, COUNT(*) FROM dead_letters"
        params: tuple[Any, ...] = ()
        if flow is not None:
            sql += " WHERE flow = ?"
            params = (flow,)
        rows = self.conn.execute(sql + " GROUP BY flow, step", params).fetchall()
        return {(r[0], r[1]): int(r[2]) for r in rows}

    def requeue(self, letters: Sequence[Row], bodies: Sequence[str] | None = None) -> int:
        """Move `letters` to the end of their step's input queue (call inside a transaction).

        A mapper letter ("ID:mapper") goes to step ID with `bodies[i]` (the body mapped by the
        step's current mapping) when given. The message keeps its id, passthrough and
        attachments; its attempts so far travel with it (`failures`), so failing again makes a
        letter with one attempt more.
        """
        rows = []
        for i, letter in enumerate(letters):
            step = str(letter["step"]).removesuffix(":mapper")
            body = bodies[i] if bodies is not None else _text(letter["body"])
            rows.append(
                (
                    letter["flow"],
                    step,
                    letter["msg_id"],
                    body,
                    _text(letter["headers"]),
                    int(letter["attempts"]),
                    _text(letter["passthrough"]),
                    _text(letter["attachments"]),
                    letter["created_at"],
                )
            )
        self.conn.executemany(
            "INSERT INTO messages (flow, step, msg_id, body, headers, failures, passthrough,"
            " attachments, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            rows,
        )
        self.delete([int(letter["id"]) for letter in letters])
        return len(rows)

    def failed_again(self, failures: Sequence[tuple[str, int, int, int]]) -> None:
        """Letters whose retry failed before reaching a queue (their mapping), as (error, flow
        version, component version, id): one attempt more, the new error and the versions
        that failed it (call inside a transaction)."""
        now = utcnow()
        self.conn.executemany(
            "UPDATE dead_letters SET attempts = attempts + 1, error = ?, flow_version = ?,"
            " component_version = ?, created_at = ? WHERE id = ?",
            [(error, fv, cv, now, i) for error, fv, cv, i in failures],
        )

    def delete(self, ids: Sequence[int]) -> int:
        """Remove letters by id; how many went."""
        cur = self.conn.executemany("DELETE FROM dead_letters WHERE id = ?", [(i,) for i in ids])
        return cur.rowcount

    def prune(self, older_than: str, max_per_step: int) -> dict[tuple[str, str], int]:
        """Remove letters created before `older_than` (ISO time) and, per step, all but the
        newest `max_per_step`; what went, by (flow, step). Call inside a transaction."""
        gone: dict[tuple[str, str], int] = {}
        for flow, step, n in self.conn.execute(
            "SELECT flow, step, COUNT(*) FROM dead_letters WHERE created_at < ?"
            " GROUP BY flow, step",
            (older_than,),
        ).fetchall():
            gone[(flow, step)] = int(n)
        self.conn.execute("DELETE FROM dead_letters WHERE created_at < ?", (older_than,))
        for (flow, step), count in self.counts().items():
            extra = count - max_per_step
            if extra <= 0:
                continue
            self.conn.execute(
                "DELETE FROM dead_letters WHERE id IN (SELECT id FROM dead_letters"
                " WHERE flow = ? AND step = ? ORDER BY id LIMIT ?)",
                (flow, step, extra),
            )
            gone[(flow, step)] = gone.get((flow, step), 0) + extra
        return gone


def _text(value: Any) -> str:
    """A JSON column as text (rows from `select` are not decoded)."""
    return value if isinstance(value, str) else json.dumps(value)
