"""What happened to each push the post-receive hook recorded, for the hook to print.

The pipeline and the deployer `note` lines against the push's id (the name of its inbox
file) as they go; the hook's follower (`deployd hook feedback`) reads them read-only. A push
is finished when nothing is under way for it any more: `opened` counts a thing started for
it (a queued build, a flow's publish), `closed` one that ended. Rows are kept a day.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from .db import Row, StoreCore, utcnow

KEEP = timedelta(days=1)


class PushStore:
    """The `pushes` and `push_lines` tables (m019)."""

    def __init__(self, store: StoreCore) -> None:
        self.store = store

    def note(
        self,
        push_id: str | None,
        text: str | None = None,
        *,
        level: str = "info",
        opened: int = 0,
        closed: int = 0,
    ) -> None:
        """Add a line for push `push_id` (None: a push nobody follows; nothing is written) and
        count what was opened and closed for it. Never raises: feedback must not break work."""
        if push_id is None:
            return
        conn = self.store.conn
        now = utcnow()
        try:
            cur = conn.execute(
                "INSERT OR IGNORE INTO pushes (id, received_at, open) VALUES (?, ?, 0)",
                (push_id, now),
            )
            if cur.rowcount:
                cutoff = (datetime.now(UTC) - KEEP).isoformat(timespec="milliseconds")
                conn.execute("DELETE FROM pushes WHERE received_at < ?", (cutoff,))
            if text:
                conn.execute(
                    "INSERT INTO push_lines (push, ts, level, text) VALUES (?, ?, ?, ?)",
                    (push_id, now, level, text),
                )
            if opened or closed:
                conn.execute(
                    "UPDATE pushes SET open = open + ?, finished_at = CASE WHEN ? > 0 AND"
                    " open + ? <= 0 THEN ? ELSE NULL END WHERE id = ?",
                    (opened - closed, closed, opened - closed, now, push_id),
                )
        except Exception:  # e.g. a database not yet migrated, or a full disk
            import logging

            logging.getLogger("deployd.store").exception("push feedback for %s lost", push_id)

    def push(self, push_id: str) -> Row | None:
        """The push's row (`open`, `finished_at`), or None when the daemon has not seen it."""
        return self.store.one("SELECT * FROM pushes WHERE id = ?", (push_id,))

    def lines(self, push_id: str, after: int = 0) -> list[Row]:
        """The push's lines with an id above `after`, oldest first."""
        return self.store.query(
            "SELECT id, ts, level, text FROM push_lines WHERE push = ? AND id > ? ORDER BY id",
            (push_id, after),
        )
