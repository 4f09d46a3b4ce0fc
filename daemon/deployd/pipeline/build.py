"""Running a component's `build` and `test` commands: clean environment, timeout, capped log."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from ..config import format_duration
from ..errors import BuildError

MAX_LOG_BYTES = 2 * 1024 * 1024


@dataclass(frozen=True)
class CommandResult:
    returncode: int
    seconds: float


async def run_command(
    what: str,
    command: str,
    *,
    cwd: Path,
    log: BinaryIO,
    timeout: float,
    env: dict[str, str],
    budget: float | None = None,
) -> CommandResult:
    """Run `command` (the component author's shell line) in `cwd`; output goes to `log`.

    `timeout` is what is left of the build's `budget` (build_timeout, shared by build and
    test); messages name the budget, which is what the user configured.
    Raises BuildError on a non-zero exit or on timeout (the whole process group is killed).
    """
    log.write(f"$ {command}\n".encode())
    log.flush()
    started = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        "/bin/sh",
        "-c",
        command,
        cwd=cwd,
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        start_new_session=True,
    )
    assert proc.stdout is not None
    written = 0
    truncated = False

    async def pump() -> None:
        nonlocal written, truncated
        assert proc.stdout is not None
        while chunk := await proc.stdout.read(65536):
            if written < MAX_LOG_BYTES:
                part = chunk[: MAX_LOG_BYTES - written]
                log.write(part)
                written += len(part)
            elif not truncated:
                truncated = True
                log.write(f"\n[deployd: log truncated at {MAX_LOG_BYTES} bytes]\n".encode())
        await proc.wait()

    try:
        await asyncio.wait_for(pump(), timeout)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()
        limit = format_duration(budget if budget is not None else timeout)
        log.write(f"\n[deployd: {what} killed: build_timeout {limit} reached]\n".encode())
        log.flush()
        raise BuildError(
            f"{what} command timed out: build_timeout {limit} (for build and test together) "
            "reached; raise build_timeout or make it faster"
        ) from None
    except asyncio.CancelledError:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()
        raise
    finally:
        # Children the command left behind in its session must not outlive the build.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
    seconds = time.monotonic() - started
    log.write(f"[deployd: {what} exited {proc.returncode} after {seconds:.2f}s]\n".encode())
    log.flush()
    if proc.returncode != 0:
        raise BuildError(f"{what} command `{command}` exited with code {proc.returncode}")
    return CommandResult(proc.returncode or 0, seconds)


def compile_python(tree: Path, mains: list[str], log: BinaryIO) -> None:
    """Byte-compile a Python component once, at build time.

    Step processes then import cached bytecode instead of compiling on every start (the
    artifact folder is immutable, so the cache never goes stale), and a `main` module with a
    syntax error fails the build here instead of the deploy later.
    """
    import compileall
    import py_compile

    for rel in dict.fromkeys(mains):
        try:
            py_compile.compile(str(tree / rel), doraise=True)
        except py_compile.PyCompileError as exc:
            detail = str(exc.exc_value) if exc.exc_value else exc.msg
            log.write(f"[deployd: {rel} does not compile: {detail}]\n".encode())
            raise BuildError(f"{rel} does not compile: {detail}") from exc
    compileall.compile_dir(str(tree), quiet=2)  # the rest, best effort
