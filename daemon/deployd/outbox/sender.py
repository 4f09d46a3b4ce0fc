"""The sender: a task on the daemon's loop that drains the outbox over HTTP (httpx, async).

Each target (a component's hosting service, a [[notify]] webhook) is a lane of its own: due
rows of one target go out in order, and a target that is down waits for its backoff without
holding back the others — nor any build or publish, which only ever write rows. A 2xx is
delivered; 429, 5xx, a timeout or a connection error is tried again after an exponential
backoff with jitter (from `daemon.outbox_retry`, doubling, at most 10 minutes) until the row
is older than `daemon.outbox_max_age`; any other answer (a 4xx: bad token, no such
repository) is given up at once, with the reason logged. Urls and tokens are read from the
config when a row is sent and never written anywhere: every error text has them masked.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable
from typing import Any

import httpx

from ..config import Config
from ..store import Row, StoreCore
from ..store.outbox import OutboxStore
from .formats import notify_request
from .providers import Request, status_request

log = logging.getLogger("deployd.outbox")
MAX_BACKOFF = 600.0
IDLE_WAKE = 5.0  # seconds between looks at the table when nothing is due (a backstop)
TIMEOUT = 10.0  # per request
PRUNE_EVERY = 3600.0  # seconds between removals of finished rows ...
KEEP_FINISHED = 7 * 86400.0  # ... older than this (delivered, given up, superseded)


class GiveUp(Exception):
    """A delivery that will never succeed as it is (the message says why)."""


def backoff(attempts: int, first: float, rand: Callable[[], float] = random.random) -> float:
    """Seconds before retry number `attempts` (1 for the first): ``first * 2**(n-1)``, capped,
    with jitter (between half and all of it), so many rows do not retry in lockstep."""
    delay = min(MAX_BACKOFF, first * 2 ** max(0, attempts - 1))
    return delay * (0.5 + 0.5 * rand())


def mask(text: str, secrets: tuple[str, ...]) -> str:
    """`text` with every secret replaced by ``***``."""
    for secret in sorted(secrets, key=len, reverse=True):
        if secret:
            text = text.replace(secret, "***")
    return text


class OutboxSender:
    """Drains the outbox until stopped; `wake()` (thread-safe) makes it look at once."""

    def __init__(
        self,
        config: Callable[[], Config],
        store: StoreCore,
        loop: asyncio.AbstractEventLoop,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.config = config
        self.outbox = OutboxStore(store)
        self.loop = loop
        self.transport = transport
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._blocked: dict[str, float] = {}  # target → epoch seconds until which it waits

    def wake(self) -> None:
        """Look at the outbox now (callable from any thread, e.g. inside `Store.event`)."""
        with contextlib.suppress(RuntimeError):  # a closed loop: the next start sends it
            self.loop.call_soon_threadsafe(self._wake.set)

    async def start(self) -> None:
        self._task = self.loop.create_task(self.run(), name="outbox")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None

    async def run(self) -> None:
        async with httpx.AsyncClient(
            timeout=TIMEOUT, transport=self.transport, follow_redirects=False, trust_env=False
        ) as client:
            pruned_at = 0.0
            while True:
                try:
                    await self.drain(client)
                    if time.time() - pruned_at > PRUNE_EVERY:
                        pruned_at = time.time()
                        self.outbox.prune(pruned_at - KEEP_FINISHED)
                except Exception:  # a bug here must not end deliveries for the daemon's life
                    log.exception("outbox: sending failed; trying again shortly")
                await self._sleep()

    async def _sleep(self) -> None:
        now = time.time()
        nxt = self.outbox.next_due()
        blocked = min(self._blocked.values(), default=None)
        delay = IDLE_WAKE
        for at in (nxt, blocked):
            if at is not None:
                delay = min(delay, max(0.0, at - now))
        self._wake.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), timeout=max(0.05, delay))

    async def drain(self, client: httpx.AsyncClient) -> int:
        """Send every due row once (each target's in order, targets at once); how many went."""
        now = time.time()
        self._blocked = {t: at for t, at in self._blocked.items() if at > now}
        lanes: dict[str, list[Row]] = {}
        for row in self.outbox.due(now, limit=100):
            if row["target"] not in self._blocked:
                lanes.setdefault(row["target"], []).append(row)
        if not lanes:
            return 0
        sent = await asyncio.gather(*(self._lane(client, rows) for rows in lanes.values()))
        return sum(sent)

    async def _lane(self, client: httpx.AsyncClient, rows: list[Row]) -> int:
        sent = 0
        for row in rows:
            if not await self._send(client, row):
                break  # the target is down: its later rows wait for the same backoff
            sent += 1
        return sent

    def _request(self, config: Config, row: Row) -> Request:
        target, payload = row["target"], row["payload"]
        kind, _, name = target.partition(":")
        if kind == "component":
            comp = config.component(name)
            if comp is None or comp.report == "none":
                raise GiveUp(f"component {name} no longer reports commit statuses")
            return status_request(comp, payload)
        index = int(name)
        if index >= len(config.notify):
            raise GiveUp(f"[[notify]] number {index + 1} is no longer configured")
        notify = config.notify[index]
        if notify.format != payload.get("format") or payload["event"] not in notify.events:
            raise GiveUp(f"[[notify]] number {index + 1} changed; it no longer takes this")
        return notify_request(notify, payload)

    def describe(self, row: Row) -> str:
        """What a row is, for a log line (no url, no token)."""
        payload = row["payload"]
        if row["kind"] == "status":
            comp = self.config().component(row["target"].partition(":")[2])
            where = comp.report if comp else "?"
            return (
                f"commit status {payload['context']} {payload['state']} of "
                f"{row['target'].partition(':')[2]} {payload['sha'][:12]} ({where})"
            )
        index = int(row["target"].partition(":")[2])
        return f"notification {payload['event']} to [[notify]] number {index + 1}"

    async def _send(self, client: httpx.AsyncClient, row: Row) -> bool:
        """One attempt; True when the lane may go on (delivered or given up)."""
        config = self.config()
        secrets: tuple[str, ...] = ()
        try:
            req = self._request(config, row)
            secrets = req.secrets
            resp = await client.request(req.method, req.url, headers=req.headers, content=req.body)
        except GiveUp as exc:
            return self._give_up(row, str(exc))
        except httpx.HTTPError as exc:
            return self._retry(row, mask(f"{type(exc).__name__}: {exc}", secrets))
        if 200 <= resp.status_code < 300:
            self.outbox.delivered(row["id"])
            log.debug("outbox: %s delivered (%d)", self.describe(row), resp.status_code)
            return True
        text = mask(f"HTTP {resp.status_code}: {_excerpt(resp)}", secrets)
        if resp.status_code == 429 or resp.status_code >= 500:
            return self._retry(row, text, retry_after(resp))
        return self._give_up(row, f"refused: {text}")

    def _retry(self, row: Row, error: str, after: float | None = None) -> bool:
        config = self.config()
        age = time.time() - float(row["created"])
        if age > config.daemon.outbox_max_age:
            return self._give_up(
                row, f"{error}; still failing after {age:.0f}s (daemon.outbox_max_age)"
            )
        delay = backoff(int(row["attempts"]) + 1, config.daemon.outbox_retry)
        if after is not None:
            delay = max(delay, min(after, MAX_BACKOFF))
        at = time.time() + delay
        self.outbox.retry(row["id"], at, error)
        self._blocked[row["target"]] = at
        log.warning(
            "outbox: %s failed (%s); attempt %d, next in %.1fs",
            self.describe(row),
            error,
            int(row["attempts"]) + 1,
            delay,
        )
        return False

    def _give_up(self, row: Row, error: str) -> bool:
        self.outbox.give_up(row["id"], error)
        log.error("outbox: %s given up: %s", self.describe(row), error)
        return True


def retry_after(resp: httpx.Response) -> float | None:
    """The seconds of a ``Retry-After: N`` header, if any (dates are not honoured)."""
    value = resp.headers.get("retry-after", "")
    try:
        return float(value) if value else None
    except ValueError:
        return None


def _excerpt(resp: httpx.Response, limit: int = 200) -> str:
    text: Any = resp.text
    return " ".join(str(text).split())[:limit] or resp.reason_phrase
