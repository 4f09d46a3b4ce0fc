"""The fork server: a pre-warmed Python process that forks Python step processes on request.

Starting an interpreter costs tens of milliseconds and a core; forking one that has already
imported the sailor costs well under one. So warm-up does not grow with the step count.

Protocol on stdin/stdout (JSON lines, from and to the daemon only):
    → {"spawn": SPEC, "log": PATH}        ← {"spawned": TOKEN, "pid": PID}
                                          ← {"exit": PID, "code": INT}   (a child ended)
When stdin closes (the daemon stopped or died) every child is sent SIGTERM and the server
exits, so a killed daemon leaves no step processes behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import sys
from typing import Any

from .. import sailor_py  # preloaded: this import is what every fork inherits

children: set[int] = set()


def _child(spec: dict[str, Any], log_path: str) -> None:
    """In the forked child: become the step process; never returns."""
    code = 1
    try:
        os.setpgid(0, 0)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        devnull = os.open(os.devnull, os.O_RDONLY)
        logfd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
        os.dup2(devnull, 0)
        os.dup2(logfd, 1)
        os.dup2(logfd, 2)
        os.close(devnull)
        os.close(logfd)
        sys.stdin = open(0, closefd=False)  # noqa: SIM115
        sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115
        sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
        code = sailor_py.run(spec)
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def _reap(out: Any) -> None:
    while children:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        children.discard(pid)
        code = os.waitstatus_to_exitcode(status)
        out.write(json.dumps({"exit": pid, "code": code}) + "\n")
        out.flush()


def main() -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the daemon decides when we stop
    out = sys.stdout
    stdin = sys.stdin.buffer
    buf = b""
    while True:
        ready, _, _ = select.select([stdin], [], [], 0.1)
        _reap(out)
        if not ready:
            continue
        chunk = os.read(stdin.fileno(), 65536)
        if not chunk:
            break
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            req = json.loads(line)
            spec = req["spawn"]
            pid = os.fork()
            if pid == 0:
                _child(spec, req["log"])
            children.add(pid)
            out.write(json.dumps({"spawned": spec["token"], "pid": pid}) + "\n")
            out.flush()
    for pid in list(children):
        try:
            os.killpg(pid, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
    return 0


if __name__ == "__main__":
    sys.exit(main())
