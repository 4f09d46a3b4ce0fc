"""Running a component's `build` and `test` commands: clean environment, timeout, capped log."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from ..config import format_duration
from ..errors import BuildError

MAX_LOG_BYTES = 2 * 1024 * 1024
TAIL_BYTES = 64 * 1024  # of a command's output, kept in memory for reading its reason


@dataclass(frozen=True)
class CommandResult:
    returncode: int
    seconds: float
    output: str = ""  # the last TAIL_BYTES of what it printed


class CommandFailed(BuildError):
    """A command exited non-zero; `output` is the end of what it printed."""

    def __init__(self, message: str, returncode: int, output: str) -> None:
        super().__init__(message)
        self.returncode = returncode
        self.output = output
        # True once the message says why (the pipeline then adds no log tail).
        self.explained = False


async def run_command(
    what: str,
    command: str | Sequence[str],
    *,
    cwd: Path,
    log: BinaryIO,
    timeout: float,
    env: dict[str, str],
    budget: float | None = None,
) -> CommandResult:
    """Run `command` in `cwd`; output goes to `log`.

    A string is the component author's shell line (`/bin/sh -c`); a sequence is an argument
    list run without a shell (deployd's own commands). `timeout` is what is left of the
    build's `budget` (build_timeout, shared by build and test); messages name the budget,
    which is what the user configured. Raises CommandFailed on a non-zero exit, BuildError on
    timeout (the whole process group is killed).
    """
    argv = ["/bin/sh", "-c", command] if isinstance(command, str) else list(command)
    shown = command if isinstance(command, str) else shlex.join(argv)
    log.write(f"$ {shown}\n".encode())
    log.flush()
    started = time.monotonic()
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            cwd=cwd,
            env=env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,
        )
    except OSError as exc:  # an argument list's program is missing or cannot be run
        log.write(f"[deployd: {what} could not start: {exc.strerror}]\n".encode())
        raise BuildError(
            f"{what} command `{shown}` could not start: {argv[0]}: {exc.strerror} "
            f"(looked up on PATH {env.get('PATH', '')}); install it next to daemon.node"
        ) from exc
    assert proc.stdout is not None
    written = 0
    truncated = False
    tail = bytearray()

    async def pump() -> None:
        nonlocal written, truncated
        assert proc.stdout is not None
        while chunk := await proc.stdout.read(65536):
            tail.extend(chunk)
            del tail[:-TAIL_BYTES]
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
    output = tail.decode("utf-8", "replace")
    if proc.returncode != 0:
        raise CommandFailed(
            f"{what} command `{shown}` exited with code {proc.returncode}",
            proc.returncode or 0,
            output,
        )
    return CommandResult(proc.returncode or 0, seconds, output)


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
