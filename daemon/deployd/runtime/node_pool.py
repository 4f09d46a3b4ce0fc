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
import logging
import os
import secrets
import signal
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .node import SAILOR_JS, NodeInfo, NodeSettings, detect
from .protocol import encode

if TYPE_CHECKING:
    from .process import StepProcess

log = logging.getLogger("deployd.runtime.node")
POOL_BASE = 1  # idle sailors kept even when no Node step runs (when node is available)
REFILL_SETTLE = 0.3  # let a warm-up in progress have the CPU before refilling


@dataclass
class _Idle:
    proc: asyncio.subprocess.Process
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter


class NodeRuntime:
    """Starts Node step processes: from the idle pool when it can, else a fresh `node`."""

    def __init__(
        self,
        settings: NodeSettings,
        address: str,
        home: Path,
        log_dir: Path,
        env: Mapping[str, str],
    ) -> None:
        self.settings = settings
        self.address = address
        self.home = home
        self.log_path = log_dir / "node-pool.log"
        self.env = dict(env)
        self._idle: list[_Idle] = []
        self._arriving: dict[str, asyncio.Future[tuple[asyncio.StreamReader, asyncio.StreamWriter]]]
        self._arriving = {}
        self._owner: dict[int, StepProcess] = {}
        self._steps: list[StepProcess] = []
        self._procs: dict[int, asyncio.subprocess.Process] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._wake = asyncio.Event()
        self._filler: asyncio.Task[None] | None = None
        self._stopping = False

    def info(self) -> NodeInfo:
        return detect(self.settings.binary)

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        if self.settings.pool <= 0 or not self.info().ok:
            return
        self._filler = asyncio.get_running_loop().create_task(self._fill(), name="node-pool")
        self._wake.set()

    async def stop(self) -> None:
        self._stopping = True
        if self._filler is not None:
            self._filler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._filler
        for idle in self._idle:
            idle.writer.close()  # an idle sailor exits when its connection closes
        idle_procs = [i.proc for i in self._idle]
        self._idle.clear()
        for proc in idle_procs:
            try:
                await asyncio.wait_for(proc.wait(), 3)
            except TimeoutError:
                _killpg(proc.pid)
        for task in list(self._tasks):
            task.cancel()

    # -- launching -------------------------------------------------------------------------

    async def launch(self, step: StepProcess) -> int:
        """Start `step` (already expected by the launcher); returns its pid."""
        info = self.info()
        if info.error is not None or info.path is None:
            raise RuntimeError(info.error)
        step.spec["end_timeout"] = self.settings.end_timeout
        self._steps.append(step)
        pid = self._take(step)
        if pid is None:
            pid = await self._spawn_direct(step, info.path)
        self._wake.set()  # demand may have changed: top the pool up
        return pid

    def _take(self, step: StepProcess) -> int | None:
        while self._idle:
            idle = self._idle.pop()
            if idle.proc.returncode is not None or idle.writer.is_closing():
                continue
            self._owner[idle.proc.pid] = step
            step.attach(idle.reader, idle.writer)
            idle.writer.write(
                encode({"t": "spec", "spec": {**step.spec, "log": str(step.log_path)}})
            )
            return idle.proc.pid
        return None

    async def _spawn_direct(self, step: StepProcess, node: str) -> int:
        logf = step.log_path.open("ab")
        try:
            proc = await asyncio.create_subprocess_exec(
                node,
                str(SAILOR_JS),
                json.dumps(step.spec),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=logf,
                stderr=logf,
                cwd=step.spec["artifact_dir"],
                env=self.env,
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
                self._idle = [i for i in self._idle if i.proc is not proc]
                if not self._stopping:
                    self._wake.set()

        self._procs[proc.pid] = proc
        task = asyncio.get_running_loop().create_task(reap())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- the idle pool ---------------------------------------------------------------------

    def accept(
        self, token: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        """A connection said hello with `token`: True if it is an idle sailor of the pool."""
        fut = self._arriving.pop(token, None)
        if fut is None:
            return False
        if not fut.done():
            fut.set_result((reader, writer))
        return True

    def target(self) -> int:
        """Idle sailors wanted: the node steps of the largest running flow, within the limit."""
        self._steps = [s for s in self._steps if not s.exited.is_set()]
        per_flow: dict[str, set[str]] = {}
        for s in self._steps:
            per_flow.setdefault(str(s.spec.get("flow")), set()).add(s.step_id)
        largest = max((len(ids) for ids in per_flow.values()), default=0)
        return min(self.settings.pool, max(POOL_BASE, largest))

    @property
    def idle_count(self) -> int:
        return sum(1 for i in self._idle if i.proc.returncode is None)

    async def _fill(self) -> None:
        while not self._stopping:
            await self._wake.wait()
            self._wake.clear()
            await asyncio.sleep(REFILL_SETTLE)
            while not self._stopping and self.idle_count < self.target():
                try:
                    await self._spawn_idle()
                except Exception as exc:  # node broken or the machine out of resources
                    log.warning("node pool: could not start an idle sailor: %s", exc)
                    await asyncio.sleep(5)
                    break
            while self.idle_count > self.target():
                self._idle.pop(0).writer.close()

    async def _spawn_idle(self) -> None:
        info = self.info()
        if info.path is None:
            raise RuntimeError(info.error)
        token = secrets.token_hex(16)
        fut: asyncio.Future[tuple[asyncio.StreamReader, asyncio.StreamWriter]]
        fut = asyncio.get_running_loop().create_future()
        self._arriving[token] = fut
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        logf = self.log_path.open("ab")
        try:
            proc = await asyncio.create_subprocess_exec(
                info.path,
                str(SAILOR_JS),
                "--pool",
                json.dumps({"socket": self.address, "token": token}),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=logf,
                stderr=logf,
                cwd=self.home,
                env=self.env,
                start_new_session=True,
            )
        finally:
            logf.close()
        self._reap(proc)
        try:
            reader, writer = await asyncio.wait_for(fut, 10)
        except TimeoutError:
            _killpg(proc.pid)
            raise RuntimeError("an idle sailor did not connect within 10 s") from None
        finally:
            self._arriving.pop(token, None)
        if proc.returncode is None:
            self._idle.append(_Idle(proc, reader, writer))


def _killpg(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
