"""The outbox's event listener: queue the deliveries an event causes, in its transaction.

`Store.event` calls `OutboxWriter.on_event(row)` for every new event row, on the store's
connection and inside the caller's transaction, so a delivery commits (or rolls back)
together with the event that caused it. Only which config entry a delivery is for is stored
(``component:NAME``, ``notify:N``), never a url or a token.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Any

from ..config import Config
from ..store import Row, StoreCore
from ..store.outbox import OutboxStore
from .events import commit_status, detail_of, page_url, public_name

# At most one dead_letters.added notification per flow step and target in this many seconds:
# a step failing every message must not flood the team's chat.
LETTERS_THROTTLE = 60.0


class OutboxWriter:
    """Turns event rows into outbox rows; `wake` is called after each (the sender's nudge)."""

    def __init__(
        self,
        config: Callable[[], Config],
        store: StoreCore,
        wake: Callable[[], None] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.outbox = OutboxStore(store)
        self.wake = wake
        self.clock = clock

    def on_event(self, row: Row) -> None:
        config = self.config()
        added = False
        status = commit_status(config, row)
        if status is not None:
            target = f"component:{row['component']}"
            self.outbox.add(
                target,
                "status",
                status,
                key=f"{target}|{status['sha']}|{status['context']}",
                event_id=row["id"],
            )
            added = True
        name = public_name(row)
        if name is not None:
            for index, notify in enumerate(config.notify):
                if name not in notify.events:
                    continue
                target = f"notify:{index}"
                key = None
                if name == "dead_letters.added":
                    key = f"{target}|letters|{row.get('flow')}|{detail_of(row).get('step')}"
                    if self.outbox.created_since(key, self.clock() - LETTERS_THROTTLE):
                        continue
                self.outbox.add(
                    target,
                    "notify",
                    self._payload(config, row, name, notify.format),
                    key=key,
                    event_id=row["id"],
                )
                added = True
        if added and self.wake is not None:
            self.wake()

    @staticmethod
    def _payload(config: Config, row: Row, name: str, fmt: str) -> dict[str, Any]:
        return {
            "id": str(uuid.uuid4()),
            "event": name,
            "format": fmt,
            "ts": row["ts"],
            "component": row.get("component"),
            "flow": row.get("flow"),
            "sha": row.get("sha"),
            "message": row["message"],
            "detail": detail_of(row),
            "url": page_url(config, row),
        }
