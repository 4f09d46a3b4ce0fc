"""What both idle-sailor pools (Python, Node) share: sizing, refilling, taking, arriving.

An idle sailor is a started step process, connected to the runtime socket, waiting for its
step's spec. A step takes one (a socket write: no process start on the warm-up path) and the
pool refills in the background, after the warm-up. The pool holds as many sailors as the
largest running flow has steps of its language, at least `base` and at most `limit()`. An
idle sailor exits when the daemon's socket closes, so a killed daemon leaves none behind.
Subclasses say how a sailor is started (`spawn_idle`) and whether it still lives (`alive`).
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import logging
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from ..protocol import encode

log = logging.getLogger("deployd.runtime.pool")
REFILL_SETTLE = 0.3  # let a warm-up in progress have the CPU before refilling
ARRIVE_TIMEOUT = 10.0


class PooledStep(Protocol):
    """What a pool needs of a step process (`process.PooledStep`); keeps the pools free of it."""

    step_id: str
    spec: dict[str, Any]
    log_path: Path
    exited: asyncio.Event

    def attach(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None: ...

    def exit_reported(self, code: int) -> None: ...


@dataclass
class Idle:
    pid: int
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    proc: Any = None  # the asyncio process, when the daemon started it itself


class IdlePool(abc.ABC):
    label = "idle"
    base = 1

    def __init__(self) -> None:
        self._idle: list[Idle] = []
        self._arriving: dict[str, asyncio.Future[tuple[asyncio.StreamReader, Any]]] = {}
        self._steps: list[PooledStep] = []
        self._wake = asyncio.Event()
        self._filler: asyncio.Task[None] | None = None
        self._stopping = False

    # -- what a subclass provides ----------------------------------------------------------

    @abc.abstractmethod
    def limit(self) -> int:
        """The most idle sailors to keep."""

    @abc.abstractmethod
    def alive(self, idle: Idle) -> bool:
        """Whether an idle sailor's process still runs."""

    @abc.abstractmethod
    async def spawn_idle(self) -> None:
        """Start one idle sailor and `keep` it once it has arrived (see `arrival`)."""

    def taken(self, idle: Idle, step: PooledStep) -> None:  # noqa: B027 - optional hook
        """An idle sailor now serves `step`."""

    def dropped(self, idle: Idle) -> None:  # noqa: B027 - optional hook
        """An idle sailor was closed because the pool is too large."""

    # -- the pool --------------------------------------------------------------------------

    def start_filling(self) -> None:
        self._filler = asyncio.get_running_loop().create_task(self._fill(), name=self.label)
        self._wake.set()

    async def stop_filling(self) -> list[Idle]:
        """Stop refilling and close every idle sailor's connection (so it exits)."""
        self._stopping = True
        if self._filler is not None:
            self._filler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._filler
        idle, self._idle = self._idle, []
        for sailor in idle:
            sailor.writer.close()
        return idle

    def take(self, step: PooledStep) -> int | None:
        """Hand `step` to an idle sailor; its pid, or None when the pool is empty."""
        self._steps.append(step)
        self._wake.set()  # demand may have changed: top the pool up
        while self._idle:
            idle = self._idle.pop()
            if not self.alive(idle) or idle.writer.is_closing():
                continue
            self.taken(idle, step)
            step.attach(idle.reader, idle.writer)
            idle.writer.write(
                encode({"t": "spec", "spec": {**step.spec, "log": str(step.log_path)}})
            )
            return idle.pid
        return None

    def accept(self, token: str, reader: asyncio.StreamReader, writer: Any) -> bool:
        """A connection said hello with `token`: True if it is an idle sailor of this pool."""
        fut = self._arriving.pop(token, None)
        if fut is None:
            return False
        if not fut.done():
            fut.set_result((reader, writer))
        return True

    def forget(self, pid: int) -> None:
        """An idle sailor's process ended: drop it and refill."""
        before = len(self._idle)
        self._idle = [i for i in self._idle if i.pid != pid]
        if len(self._idle) != before and not self._stopping:
            self._wake.set()

    def target(self) -> int:
        """Idle sailors wanted: the steps of the largest running flow, within the limits."""
        self._steps = [s for s in self._steps if not s.exited.is_set()]
        per_flow: dict[str, set[str]] = {}
        for s in self._steps:
            per_flow.setdefault(str(s.spec.get("flow")), set()).add(s.step_id)
        largest = max((len(ids) for ids in per_flow.values()), default=0)
        return min(self.limit(), max(self.base, largest))

    @property
    def idle_count(self) -> int:
        return sum(1 for i in self._idle if self.alive(i))

    def new_token(self) -> tuple[str, asyncio.Future[tuple[asyncio.StreamReader, Any]]]:
        """A token for a sailor about to start, and the future its arrival resolves."""
        token = secrets.token_hex(16)
        fut: asyncio.Future[tuple[asyncio.StreamReader, Any]]
        fut = asyncio.get_running_loop().create_future()
        self._arriving[token] = fut
        return token, fut

    def cancel_token(self, token: str) -> None:
        """The sailor for `token` could not be started."""
        self._arriving.pop(token, None)

    async def arrival(
        self, token: str, fut: asyncio.Future[tuple[asyncio.StreamReader, Any]]
    ) -> tuple[asyncio.StreamReader, Any]:
        """Wait until the sailor started with `token` has connected."""
        try:
            return await asyncio.wait_for(fut, ARRIVE_TIMEOUT)
        except TimeoutError:
            raise RuntimeError(
                f"an idle sailor did not connect within {ARRIVE_TIMEOUT:g} s"
            ) from None
        finally:
            self._arriving.pop(token, None)

    def keep(self, idle: Idle) -> None:
        self._idle.append(idle)

    async def _fill(self) -> None:
        while not self._stopping:
            await self._wake.wait()
            self._wake.clear()
            await asyncio.sleep(REFILL_SETTLE)
            while not self._stopping and self.idle_count < self.target():
                try:
                    await self.spawn_idle()
                except Exception as exc:  # the machine is out of room, or the runtime broke
                    log.warning("%s: could not start an idle sailor: %s", self.label, exc)
                    await asyncio.sleep(5)
                    break
            while self.idle_count > self.target():
                idle = self._idle.pop(0)
                self.dropped(idle)
                idle.writer.close()
