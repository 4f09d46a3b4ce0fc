"""`python -m deployd ARGS` without the interpreter start: a warm process forks each call.

A CLI call is a Python start and the import of typer, pydantic and deployd's config: ~0.25 s
of CPU, and the tests make thousands of them (`Daemon.cli`) — on a 2-core machine running
two workers and their daemons, that was about as much CPU as the daemons under test took.
So, as the daemon's own fork server does for step processes (deployd/runtime/embedded/
forkserver.py), one process per test worker imports the CLI once and forks a child per call.
The child is the CLI process: its own pid, argv, environment (replaced whole), working
directory, stdout and stderr (files the caller reads) and exit code, and it runs deployd's
`__main__` exactly as `python -m deployd` does (`runpy`, so `sys.argv[0]` and click's
program name are the same); only the imports are inherited. `DEPLOYD_TEST_COLD_CLI=1` makes
`Daemon.cli` start a fresh interpreter per call instead, as before; the tests of the
console script itself start theirs with subprocess either way.

Protocol, one Unix-socket connection per call, JSON lines: → {"argv", "env", "cwd", "out",
"err"}; ← {"pid"} once forked; ← {"code"} when the CLI has exited (no line: it died).
"""

from __future__ import annotations

import contextlib
import json
import locale
import os
import runpy
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import traceback
from pathlib import Path
from typing import Any

COLD_ENV = "DEPLOYD_TEST_COLD_CLI"


# --------------------------------------------------------------------------- the server


def _exit_code(code: object) -> int:
    """What the interpreter makes of SystemExit(code) (None: 0; not an int: printed, 1)."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    sys.stderr.write(f"{code}\n")
    return 1


def _child(conn: socket.socket, req: dict[str, Any]) -> None:
    """In the forked child: become `python -m deployd ARGV`; never returns."""
    code = 1
    try:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)  # not the server's stdin, its lifeline to the test worker
        os.close(devnull)
        os.chdir(req["cwd"])
        os.environ.clear()
        os.environ.update(req["env"])
        for fd, path in ((1, req["out"]), (2, req["err"])):
            target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            os.dup2(target, fd)
            os.close(target)
        conn.sendall((json.dumps({"pid": os.getpid()}) + "\n").encode())
        sys.argv = ["-m", *req["argv"]]  # run_module puts deployd/__main__.py first
        try:
            runpy.run_module("deployd", run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as exc:
            code = _exit_code(exc.code)
        except BaseException:
            traceback.print_exc()
            code = 1
        with contextlib.suppress(Exception):
            sys.stdout.flush()
        with contextlib.suppress(Exception):
            sys.stderr.flush()
        conn.sendall((json.dumps({"code": code}) + "\n").encode())
    finally:
        os._exit(code)


def serve(path: str) -> None:
    """Import the CLI, then fork a child per connection on the Unix socket `path`."""
    import deployd.cli
    import deployd.cli.client
    import deployd.config
    import deployd.status  # noqa: F401  (what the commands import lazily, most of them)

    sys.stdout.flush()
    sys.stderr.flush()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(64)
    try:
        _loop(listener)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
            os.rmdir(os.path.dirname(path))


def _loop(listener: socket.socket) -> None:
    while True:
        ready, _, _ = select.select([listener, sys.stdin], [], [], 1.0)
        with contextlib.suppress(ChildProcessError):
            while os.waitpid(-1, os.WNOHANG)[0]:
                pass  # reap finished calls
        if sys.stdin in ready and not os.read(sys.stdin.fileno(), 1):
            return  # the test worker is gone (its end of our stdin closed)
        if listener not in ready:
            continue
        conn, _ = listener.accept()
        line = b""
        while not line.endswith(b"\n"):
            chunk = conn.recv(65536)
            if not chunk:
                break
            line += chunk
        if not line.endswith(b"\n"):
            conn.close()
            continue
        if os.fork() == 0:
            listener.close()
            _child(conn, json.loads(line))
        conn.close()


# --------------------------------------------------------------------------- the client


class WarmCli:
    """The test worker's end: starts the server at first use; `run` is a `subprocess.run`
    of `python -m deployd ARGS` (text, captured, with a timeout)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.proc: subprocess.Popen[bytes] | None = None
        self.dir = ""
        self.path = ""

    def _server(self) -> str:
        with self.lock:
            if self.proc is None or self.proc.poll() is not None:
                self.dir = tempfile.mkdtemp(prefix="deployd-cli-")
                self.path = os.path.join(self.dir, "s")
                self.proc = subprocess.Popen(
                    [sys.executable, "-c", f"import tests.warm_cli as w; w.serve({self.path!r})"],
                    stdin=subprocess.PIPE,
                    cwd=Path(__file__).resolve().parent.parent,
                )
                deadline = 60.0
                step = 0.01
                while not os.path.exists(self.path):
                    if self.proc.poll() is not None:
                        raise AssertionError(f"the warm CLI exited {self.proc.returncode}")
                    deadline -= step
                    if deadline <= 0:
                        raise AssertionError("the warm CLI did not start within 60 s")
                    select.select([], [], [], step)
            return self.path

    def run(
        self, args: list[str], env: dict[str, str], timeout: float
    ) -> subprocess.CompletedProcess[str]:
        path = self._server()
        with tempfile.TemporaryDirectory(prefix="deployd-call-") as tmp:
            out, err = os.path.join(tmp, "out"), os.path.join(tmp, "err")
            request = {"argv": args, "env": env, "cwd": os.getcwd(), "out": out, "err": err}
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
                conn.connect(path)
                conn.sendall((json.dumps(request) + "\n").encode())
                conn.settimeout(timeout)
                reader = conn.makefile("r")
                pid: int | None = None
                code = -signal.SIGKILL  # no answer: it died
                try:
                    for line in reader:
                        msg = json.loads(line)
                        if "pid" in msg:
                            pid = msg["pid"]
                        elif "code" in msg:
                            code = msg["code"]
                except TimeoutError:
                    if pid is not None:
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(pid, signal.SIGKILL)
                    raise subprocess.TimeoutExpired(["deployd", *args], timeout) from None
            encoding = locale.getpreferredencoding(False)
            stdout = Path(out).read_text(encoding=encoding) if os.path.exists(out) else ""
            stderr = Path(err).read_text(encoding=encoding) if os.path.exists(err) else ""
        # subprocess.run(text=True) reads with universal newlines
        stdout, stderr = (s.replace("\r\n", "\n").replace("\r", "\n") for s in (stdout, stderr))
        return subprocess.CompletedProcess(["deployd", *args], code, stdout, stderr)


WARM = WarmCli()


def deployd_cli(
    args: list[str], env: dict[str, str], timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """`subprocess.run([python, "-m", "deployd", *args], capture_output=True, text=True,
    env=env, timeout=timeout)`, through the warm CLI unless DEPLOYD_TEST_COLD_CLI is set."""
    if os.environ.get(COLD_ENV):
        return subprocess.run(
            [sys.executable, "-m", "deployd", *args],
            capture_output=True,
            text=True,
            env=env,
            timeout=timeout,
        )
    return WARM.run(args, env, timeout)
