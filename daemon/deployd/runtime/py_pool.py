"""Starting Python step processes without a fork on the warm-up path: idle forked sailors.

Forking from the fork server is cheap, but the forks are serial: on a small, busy machine 30
of them (each child competing for the CPU with the next fork) took 100-400 ms, so a 30-step
flow warmed up 10-25x slower than a 3-step one. Idle sailors are therefore forked ahead of
time, each connected to the runtime socket and waiting for its step's spec; a step takes one
(sending the spec costs a socket write) and the pool is refilled in the background, after the
warm-up. The pool grows to the Python step count of the largest running flow (so a redeploy
of that flow takes every new step from it), at least POOL_BASE and at most POOL_MAX. An idle
sailor exits when the daemon's socket closes, so a killed daemon leaves none behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .protocol import encode

if TYPE_CHECKING:
    from .process import StepProcess

log = logging.getLogger("deployd.runtime.pool")
POOL_BASE = 4  # idle sailors kept even when no flow runs: a first small flow starts at once
POOL_MAX = 64
REFILL_SETTLE = 0.3  # let a warm-up in progress have the CPU before refilling


@dataclass
class _Idle:
    pid: int
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter


class PyPool:
    """Idle Python sailors forked ahead of time by the fork server."""

    def __init__(
        self, address: str, log_path: Path, fork: Callable[[dict[str, Any], str], Awaitable[int]]
    ) -> None:
        self.address = address
        self.log_path = log_path
        self._fork = fork
        self._idle: list[_Idle] = []
        self._idle_pids: set[int] = set()
        self._arriving: dict[str, asyncio.Future[tuple[asyncio.StreamReader, Any]]] = {}
        self._steps: list[StepProcess] = []
        self._wake = asyncio.Event()
        self._filler: asyncio.Task[None] | None = None
        self._stopping = False

    async def start(self) -> None:
        self._filler = asyncio.get_running_loop().create_task(self._fill(), name="py-pool")
        self._wake.set()

    async def stop(self) -> None:
        self._stopping = True
        if self._filler is not None:
            self._filler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._filler
        for idle in self._idle:
            idle.writer.close()  # an idle sailor exits when its connection closes
        self._idle.clear()

    def take(self, step: StepProcess) -> int | None:
        """Hand `step` to an idle sailor; its pid, or None when the pool is empty."""
        self._steps.append(step)
        self._wake.set()  # demand may have changed: top the pool up
        while self._idle:
            idle = self._idle.pop()
            if idle.pid not in self._idle_pids or idle.writer.is_closing():
                continue
            self._idle_pids.discard(idle.pid)
            step.attach(idle.reader, idle.writer)
            idle.writer.write(
                encode({"t": "spec", "spec": {**step.spec, "log": str(step.log_path)}})
            )
            return idle.pid
        return None

    def accept(self, token: str, reader: asyncio.StreamReader, writer: Any) -> bool:
        """A connection said hello with `token`: True if it is an idle sailor of the pool."""
        fut = self._arriving.pop(token, None)
        if fut is None:
            return False
        if not fut.done():
            fut.set_result((reader, writer))
        return True

    def exited(self, pid: int) -> None:
        """The fork server reported that `pid`, which no step owns, ended."""
        if pid in self._idle_pids:
            self._idle_pids.discard(pid)
            self._idle = [i for i in self._idle if i.pid != pid]
            if not self._stopping:
                self._wake.set()

    def target(self) -> int:
        """Idle sailors wanted: the Python steps of the largest running flow, within limits."""
        self._steps = [s for s in self._steps if not s.exited.is_set()]
        per_flow: dict[str, set[str]] = {}
        for s in self._steps:
            per_flow.setdefault(str(s.spec.get("flow")), set()).add(s.step_id)
        largest = max((len(ids) for ids in per_flow.values()), default=0)
        return min(POOL_MAX, max(POOL_BASE, largest))

    async def _fill(self) -> None:
        while not self._stopping:
            await self._wake.wait()
            self._wake.clear()
            await asyncio.sleep(REFILL_SETTLE)
            while not self._stopping and len(self._idle) < self.target():
                try:
                    await self._spawn_idle()
                except Exception as exc:  # the fork server is gone or the machine is out of room
                    log.warning("python pool: could not start an idle sailor: %s", exc)
                    await asyncio.sleep(5)
                    break
            while len(self._idle) > self.target():
                idle = self._idle.pop(0)
                self._idle_pids.discard(idle.pid)
                idle.writer.close()

    async def _spawn_idle(self) -> None:
        token = secrets.token_hex(16)
        fut: asyncio.Future[tuple[asyncio.StreamReader, Any]]
        fut = asyncio.get_running_loop().create_future()
        self._arriving[token] = fut
        try:
            pid = await self._fork(
                {"token": token, "socket": self.address, "pool": True}, str(self.log_path)
            )
            self._idle_pids.add(pid)
            reader, writer = await asyncio.wait_for(fut, 10)
        finally:
            self._arriving.pop(token, None)
        if pid in self._idle_pids:
            self._idle.append(_Idle(pid, reader, writer))
        else:
            writer.close()
