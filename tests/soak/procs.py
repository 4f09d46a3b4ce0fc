"""Processes seen through /proc: descendants, liveness (pid reuse aware), fds, strays."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


def start_time(pid: int) -> str | None:
    """The kernel's start time of `pid` (tells a live process from a reused pid); None if gone
    or a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    if fields[0] in ("Z", "X"):
        return None
    return fields[19]


def descendants(pid: int) -> set[int]:
    """Every live descendant of `pid` (children of all its threads, recursively)."""
    out: set[int] = set()
    stack = [pid]
    while stack:
        p = stack.pop()
        try:
            tasks = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for task in tasks:
            try:
                children = Path(f"/proc/{p}/task/{task}/children").read_text().split()
            except OSError:
                continue
            for c in map(int, children):
                if c not in out:
                    out.add(c)
                    stack.append(c)
    return out


def fd_count(pid: int) -> int | None:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def processes_touching(root: Path) -> list[tuple[int, str]]:
    """Processes (other than this one) whose cwd, stdout/stderr or cmdline is under `root`."""
    me = os.getpid()
    found = []
    prefix = str(root)
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me or start_time(int(entry)) is None:
            continue
        links = []
        for rel in ("cwd", "fd/1", "fd/2"):
            with contextlib.suppress(OSError):
                links.append(os.readlink(f"/proc/{entry}/{rel}"))
        with contextlib.suppress(OSError):
            links.append(Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode())
        hit = next((link for link in links if prefix in link), None)
        if hit is not None:
            found.append((int(entry), hit))
    return found
