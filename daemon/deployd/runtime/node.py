"""Node.js for `runtime = "node"` components: finding `node`, and starting Node sailors fast.

`detect()` finds the configured node (`daemon.node`: a name looked up on PATH, or a path) and
checks it is Node.js 18 or newer; its `error` is the one-line reason shown by validation,
`check-config` and `status` when it is not.

`NodeRuntime` starts Node step processes. Starting node costs ~50 ms of CPU (30 at once take
seconds on a small machine), so a few idle sailors are kept started and connected, each
waiting for its step's spec over the runtime socket; a step takes one instead of spawning
node, and the pool is refilled in the background. The pool grows to the node step count of
the largest running flow (a redeploy of that flow then takes every new step from it), within
`daemon.node_pool`. An idle sailor exits when the daemon's socket closes, so a daemon that
goes away (even killed) leaves none behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import re
import secrets
import shutil
import signal
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .protocol import encode

if TYPE_CHECKING:
    from .process import StepProcess

log = logging.getLogger("deployd.runtime.node")
SAILOR_JS = Path(__file__).with_name("sailor.js")
# require('elasticio-node') falls back to the helper in here (NODE_PATH in builds; a resolve
# hook in the sailor).
SHIM_DIR = Path(__file__).with_name("node_shim")
MIN_MAJOR = 18
NEEDS = f'runtime = "node" needs Node.js {MIN_MAJOR} or newer'
POOL_BASE = 1  # idle sailors kept even when no Node step runs (when node is available)
REFILL_SETTLE = 0.3  # let a warm-up in progress have the CPU before refilling
_VERSION_RE = re.compile(r"^v(\d+)\.(\d+)\.(\d+)")


@dataclass(frozen=True)
class NodeInfo:
    """What `daemon.node` points at: its path and version, or why it cannot be used."""

    setting: str
    path: str | None
    version: str | None
    error: str | None

    @property
    def ok(self) -> bool:
        return self.error is None


@functools.lru_cache(maxsize=8)
def detect(setting: str = "node") -> NodeInfo:
    """Find `setting` (a name on PATH or a path) and check its version (cached; see `forget`)."""
    if os.sep in setting:
        path: str | None = setting if os.access(setting, os.X_OK) else None
        if path is None:
            what = "does not exist" if not os.path.exists(setting) else "is not executable"
            return NodeInfo(
                setting,
                None,
                None,
                f"node not found: {setting} {what} (daemon.node); {NEEDS}: install it or set "
                "daemon.node to its path",
            )
    else:
        path = shutil.which(setting)
        if path is None:
            return NodeInfo(
                setting,
                None,
                None,
                f"node not found: no {setting!r} on PATH; {NEEDS}: install it or set "
                "daemon.node to its path",
            )
    try:
        proc = subprocess.run(
            [path, "--version"], capture_output=True, text=True, timeout=10, check=False
        )
        out = proc.stdout.strip()
    except (OSError, subprocess.TimeoutExpired) as exc:
        return NodeInfo(setting, path, None, f"node at {path} does not run ({exc}); {NEEDS}")
    match = _VERSION_RE.match(out)
    if proc.returncode != 0 or match is None:
        return NodeInfo(
            setting,
            path,
            None,
            f"{path} --version printed {out[:60]!r}, not a Node.js version; {NEEDS}",
        )
    if int(match.group(1)) < MIN_MAJOR:
        return NodeInfo(
            setting,
            path,
            out,
            f"node {out} at {path} is too old; {NEEDS} (install a newer one or set daemon.node)",
        )
    return NodeInfo(setting, path, out, None)


def forget() -> None:
    """Drop cached detections (a reload looks again: node may have been installed)."""
    detect.cache_clear()


def default_build(tree: Path) -> str:
    """The build command of a node component that sets no `build`.

    `npm ci` when a lock file pins the dependencies, else `npm install`; never dev
    dependencies. The npm cache lives next to the build's tree (removed with it), and npm
    does not phone home for audits, funding or update notices.
    """
    flags = "--omit=dev --no-audit --no-fund --no-update-notifier --cache ../.npm-cache"
    verb = "ci" if (tree / "package-lock.json").exists() else "install"
    return f"npm {verb} {flags}"


@dataclass(frozen=True)
class NodeSettings:
    """The `daemon.node*` settings the runtime needs."""

    binary: str = "node"
    pool: int = 32
    end_timeout: float = 60.0


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
