"""What the daemon takes from its host: the state dir's lock and the listening socket."""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
from collections.abc import Iterator

from ..config import split_listen
from ..errors import StateError
from ..paths import Paths


@contextlib.contextmanager
def state_lock(paths: Paths) -> Iterator[None]:
    """Hold the state dir's lock for the daemon's lifetime (one daemon per state dir)."""
    try:
        for folder in paths.dirs():
            folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(paths.lockfile, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        raise StateError(
            f"state_dir {paths.root} is not usable: {exc.strerror} "
            "(check daemon.state_dir and the permissions of its folder)"
        ) from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as exc:
        os.close(fd)
        pid = str(paths.read_pid() or "?")
        raise StateError(
            f"another deployd (pid {pid}) is already running on state_dir {paths.root}"
        ) from exc
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            paths.pidfile.unlink()
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def bind(listen: str) -> socket.socket:
    host, port = split_listen(listen)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY on accepted sockets only when their proto
    # says TCP; without it every keep-alive response waits ~40 ms for a delayed ACK (Nagle).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise StateError(
            f"cannot listen on {listen}: {exc.strerror} (change daemon.listen or stop what "
            "uses that port)"
        ) from exc
    sock.listen(2048)
    sock.setblocking(False)
    return sock
