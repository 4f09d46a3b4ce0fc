"""Starting Node step processes fast: a pool of pre-started idle Node sailors.

Starting node costs ~50 ms of CPU (30 at once take seconds on a small machine), so idle
sailors are kept started and connected, each waiting for its step's spec over the runtime
socket; a step takes one instead of spawning node, and the pool is refilled in the
background. The pool grows to the node step count of the largest running flow (a redeploy of
that flow then takes every new step from it), within `daemon.node_pool`. An idle sailor exits
when the daemon's socket closes, so a daemon that goes away (even killed) leaves none behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from ...toolchains.node import NodeInfo, detect
from .idle_pool import Idle, IdlePool, PooledStep

POOL_BASE = 1  # idle sailors kept even when no Node step runs (when node is available)
SAILOR_JS = Path(__file__).parent.parent / "sailor.js"


@dataclass(frozen=True)
class NodeSettings:
    """The `daemon.node*` settings the runtime needs."""

    binary: str = "node"
    pool: int = 32
    end_timeout: float = 60.0


class NodeRuntime(IdlePool):
    """Starts Node step processes: from the idle pool when it can, else a fresh `node`."""

    label = "node pool"
    base = POOL_BASE

    def __init__(
        self,
        settings: NodeSettings,
        address: str,
        home: Path,
        log_dir: Path,
        env: Mapping[str, str],
    ) -> None:
        super().__init__()
        self.settings = settings
        self.address = address
        self.home = home
        self.log_path = log_dir / "node-pool.log"
        self.env = dict(env)
        self._owner: dict[int, PooledStep] = {}
        self._procs: dict[int, asyncio.subprocess.Process] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def info(self) -> NodeInfo:
        return detect(self.settings.binary)

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        if self.settings.pool <= 0 or not self.info().ok:
            return
        self.start_filling()

    async def stop(self) -> None:
        for idle in await self.stop_filling():
            try:
                await asyncio.wait_for(idle.proc.wait(), 3)
            except TimeoutError:
                _killpg(idle.pid)
        for task in list(self._tasks):
            task.cancel()

    def limit(self) -> int:
        return self.settings.pool

    def alive(self, idle: Idle) -> bool:
        return bool(idle.proc is not None and idle.proc.returncode is None)

    def taken(self, idle: Idle, step: PooledStep) -> None:
        self._owner[idle.pid] = step

    # -- launching -------------------------------------------------------------------------

    async def launch(self, step: PooledStep) -> int:
        """Start `step` (already expected by the launcher); returns its pid."""
        info = self.info()
        if info.error is not None or info.path is None:
            raise RuntimeError(info.error)
        step.spec["end_timeout"] = self.settings.end_timeout
        pid = self.take(step)  # an idle sailor when there is one (no node start)
        if pid is None:
            pid = await self._spawn_direct(step, info.path)
        return pid

    async def _spawn_direct(self, step: PooledStep, node: str) -> int:
        logf = step.log_path.open("ab")
        try:
            proc = await asyncio.create_subprocess_exec(
                node,
                str(SAILOR_JS),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=logf,
                stderr=logf,
                cwd=step.spec["artifact_dir"],
                env={**self.env, "DEPLOYD_SPEC": json.dumps(step.spec)},  # not argv: see sailor.js
                start_new_session=True,
            )
        finally:
            logf.close()
        self._owner[proc.pid] = step
        self._reap(proc)
        return proc.pid

    def _reap(self, proc: asyncio.subprocess.Process) -> None:
        async def reap() -> None:
            code = await proc.wait()
            self._procs.pop(proc.pid, None)
            step = self._owner.pop(proc.pid, None)
            if step is not None:
                step.exit_reported(code)
            else:
                self.forget(proc.pid)

        self._procs[proc.pid] = proc
        task = asyncio.get_running_loop().create_task(reap())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- the idle pool ---------------------------------------------------------------------

    async def spawn_idle(self) -> None:
        info = self.info()
        if info.path is None:
            raise RuntimeError(info.error)
        token, fut = self.new_token()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        logf = self.log_path.open("ab")
        try:
            proc = await asyncio.create_subprocess_exec(
                info.path,
                str(SAILOR_JS),
                "--pool",
                stdin=asyncio.subprocess.DEVNULL,
                stdout=logf,
                stderr=logf,
                cwd=self.home,
                env={
                    **self.env,
                    "DEPLOYD_SPEC": json.dumps({"socket": self.address, "token": token}),
                },
                start_new_session=True,
            )
        except BaseException:
            self.cancel_token(token)
            raise
        finally:
            logf.close()
        self._reap(proc)
        try:
            reader, writer = await self.arrival(token, fut)
        except RuntimeError:
            _killpg(proc.pid)
            raise
        if proc.returncode is None:
            self.keep(Idle(proc.pid, reader, writer, proc))


def _killpg(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
