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

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from .idle_pool import Idle, IdlePool, PooledStep

POOL_BASE = 4  # idle sailors kept even when no flow runs: a first small flow starts at once
POOL_MAX = 64


class PyPool(IdlePool):
    """Idle Python sailors forked ahead of time by the fork server."""

    label = "python pool"
    base = POOL_BASE

    def __init__(
        self, address: str, log_path: Path, fork: Callable[[dict[str, Any], str], Awaitable[int]]
    ) -> None:
        super().__init__()
        self.address = address
        self.log_path = log_path
        self._fork = fork
        self._idle_pids: set[int] = set()  # forked for the pool and not yet taken or ended

    def limit(self) -> int:
        return POOL_MAX

    def alive(self, idle: Idle) -> bool:
        return idle.pid in self._idle_pids

    def taken(self, idle: Idle, step: PooledStep) -> None:
        self._idle_pids.discard(idle.pid)

    def dropped(self, idle: Idle) -> None:
        self._idle_pids.discard(idle.pid)

    async def start(self) -> None:
        self.start_filling()

    async def stop(self) -> None:
        await self.stop_filling()

    def exited(self, pid: int) -> None:
        """The fork server reported that `pid`, which no step owns, ended."""
        if pid in self._idle_pids:
            self._idle_pids.discard(pid)
            self.forget(pid)

    async def spawn_idle(self) -> None:
        token, fut = self.new_token()
        try:
            pid = await self._fork(
                {"token": token, "socket": self.address, "pool": True}, str(self.log_path)
            )
        except BaseException:
            self.cancel_token(token)
            raise
        self._idle_pids.add(pid)
        reader, writer = await self.arrival(token, fut)
        if pid in self._idle_pids:
            self.keep(Idle(pid, reader, writer))
        else:
            writer.close()
