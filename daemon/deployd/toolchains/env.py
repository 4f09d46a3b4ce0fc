"""The clean environment of builds and step processes, and reading the tail of their logs."""

from __future__ import annotations

import os
import sys
from pathlib import Path

TAIL_BYTES = 2000


def clean_env(workdir: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The whole environment of a build or step: nothing of the daemon's (so no secret) leaks in.

    The daemon's own interpreter comes first on PATH, so `python` and `pip` in a build are
    the ones the step processes will run with.
    """
    path = os.pathsep.join(
        dict.fromkeys([str(Path(sys.executable).parent), "/usr/local/bin", "/usr/bin", "/bin"])
    )
    env = {
        "PATH": path,
        "HOME": str(workdir),
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "PYTHONDONTWRITEBYTECODE": "1",
        "CI": "true",
    }
    if extra:
        env.update(extra)
    return env


def log_tail(path: Path, limit: int = TAIL_BYTES) -> str:
    """The last `limit` bytes of a log file, as text ("" when it cannot be read)."""
    try:
        with path.open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - limit))
            return fh.read().decode("utf-8", "replace")
    except OSError:
        return ""
