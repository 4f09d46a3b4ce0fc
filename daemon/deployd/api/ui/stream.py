"""`GET /api/v1/events/stream`: the event log as server-sent events (the dashboard's live
updates; `curl -N` works too).

The store calls `EventHub.notify` for every new event row, on the writer's connection and
inside its transaction: it only wakes the open streams (sets their asyncio.Event). Each
stream then reads the committed rows after the last id it sent, from a read-only connection
of its own, so a row whose transaction rolled back is never sent. Each message's `id` is the
event's id in the events table: a client that reconnects with `Last-Event-ID` (browsers do)
gets what it missed, also across a daemon restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sse_starlette import EventSourceResponse, ServerSentEvent

if TYPE_CHECKING:
    from ...store import Store

BATCH = 500  # events read at a time
RETRY_MS = 1000  # how soon a browser reconnects after the stream broke
PING_S = 15  # a comment line this often keeps proxies from closing an idle stream
COMMIT_WAIT = 0.05  # a wake-up may come before its transaction commits: look again this soon
COMMIT_TRIES = 20


class EventHub:
    """Wakes the open streams when an event is recorded; the store's event listener."""

    def __init__(self, db: Path, stopping: asyncio.Event | None = None) -> None:
        self.db = db
        self.latest = 0  # the highest event id the listener saw
        self.waiters: set[asyncio.Event] = set()
        # Set when the daemon begins to stop: every stream ends, so the HTTP server's
        # graceful shutdown does not wait for browsers to hang up.
        self.stopping = stopping if stopping is not None else asyncio.Event()
        self._reader: Store | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: int | None = None

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """The loop the streams run on (the daemon's)."""
        self._loop = loop
        self._thread = threading.get_ident()

    def notify(self, row: dict[str, Any]) -> None:
        """The event listener: remember the id, wake every stream. Nothing slow here."""
        self.latest = max(self.latest, int(row.get("id") or 0))
        if self._loop is not None and threading.get_ident() != self._thread:
            self._loop.call_soon_threadsafe(self._wake)
        else:
            self._wake()

    def _wake(self) -> None:
        for waiter in self.waiters:
            waiter.set()

    def reader(self) -> Store | None:
        """A read-only connection to the state database: only committed rows are seen."""
        if self._reader is None:
            from ...store import Store

            self._reader = Store.readonly(self.db)
        return self._reader

    def last_id(self) -> int:
        """The newest event id (what a page rendered now has seen)."""
        reader = self.reader()
        return reader.last_event_id() if reader is not None else 0

    def after(self, after_id: int) -> list[dict[str, Any]]:
        reader = self.reader()
        return reader.events_after(after_id, BATCH) if reader is not None else []

    async def events(self, after_id: int | None) -> AsyncIterator[ServerSentEvent]:
        """The events after `after_id` (None: from now on), then each new one as it comes."""
        waiter = asyncio.Event()
        self.waiters.add(waiter)
        try:
            last = self.last_id() if after_id is None else after_id
            tries = 0
            while not self.stopping.is_set():
                waiter.clear()
                rows = self.after(last)
                for row in rows:
                    last = int(row["id"])
                    yield ServerSentEvent(data=json.dumps(event_json(row)), id=str(last))
                if len(rows) == BATCH:
                    continue
                if not rows and self.latest > last and tries < COMMIT_TRIES:
                    tries += 1  # woken inside the writer's transaction: not committed yet
                    await asyncio.sleep(COMMIT_WAIT)
                    continue
                tries = 0
                stop = asyncio.ensure_future(self.stopping.wait())
                wake = asyncio.ensure_future(waiter.wait())
                try:
                    await asyncio.wait({stop, wake}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    for task in (stop, wake):
                        task.cancel()
                        with contextlib.suppress(asyncio.CancelledError):
                            await task
        finally:
            self.waiters.discard(waiter)


def event_json(row: dict[str, Any]) -> dict[str, Any]:
    """One event as the stream sends it (the events table's columns, `detail` decoded)."""
    detail = row.get("detail")
    if isinstance(detail, str):
        try:
            detail = json.loads(detail)
        except ValueError:
            detail = None
    return {
        "id": row["id"],
        "ts": row["ts"],
        "kind": row["kind"],
        "component": row.get("component"),
        "flow": row.get("flow"),
        "sha": row.get("sha"),
        "message": row["message"],
        "detail": detail,
    }


def resume_from(last_event_id: str | None, after: str | None) -> int | None:
    """Where a stream starts: the `Last-Event-ID` header (a reconnect), else the `after`
    query parameter (the id a page was rendered at), else None (from now on)."""
    for value in (last_event_id, after):
        if value is not None and value.strip().isdigit() and len(value.strip()) < 20:
            return int(value.strip())
    return None


def response(hub: EventHub, start: int | None, headers: dict[str, str]) -> EventSourceResponse:
    """The `text/event-stream` response of one stream."""

    async def content() -> AsyncIterator[ServerSentEvent]:
        yield ServerSentEvent(comment="deployd events", retry=RETRY_MS)
        async for event in hub.events(start):
            yield event

    return EventSourceResponse(
        content(),
        ping=PING_S,
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no", **headers},
    )
