"""The status object (`deployd status --json`, `GET /api/v1/status`), built from the state.

It reads only: the config, the state database (read-only) and the daemon's lock file, so it
works the same whether or not the daemon runs.
"""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path
from typing import Any

from .config import Config
from .paths import Paths
from .store import Store


def daemon_state(paths: Paths) -> tuple[bool, int | None]:
    """(running, pid): running when some process holds the state dir's lock."""
    try:
        fd = os.open(paths.lockfile, os.O_RDONLY)
    except OSError:
        return False, None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        running = True
    except OSError:
        running = False
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        running = False
    finally:
        os.close(fd)
    pid = None
    if running:
        try:
            pid = int(json.loads(paths.pidfile.read_text())["pid"])
        except (OSError, ValueError, KeyError, TypeError):
            pid = None
    return running, pid


def build_status(config: Config, store: Store | None, paths: Paths | None = None) -> dict[str, Any]:
    """The whole status object of the contract (see README: `deployd status --json`)."""
    paths = paths or Paths(config.state_dir)
    running, pid = daemon_state(paths)
    recent = store.recent_all() if store else {}
    last = store.last_builds_all() if store else {}
    components = []
    for comp in config.components:
        r = recent.get(comp.name)
        b = last.get(comp.name)
        components.append(
            {
                "name": comp.name,
                "branch": comp.branch,
                "url": comp.url if comp.url is not None else str(paths.hosted_repo(comp.name)),
                "recent": {
                    "version": r["version"],
                    "sha": r["sha"],
                    "semver": r["semver"],
                    "built_at": r["built_at"],
                }
                if r
                else None,
                "last_build": {
                    "id": b["id"],
                    "sha": b["sha"],
                    "status": b["status"],
                    "error": b["error"],
                }
                if b
                else None,
            }
        )
    status: dict[str, Any] = {
        "daemon": {"running": running, "pid": pid, "listen": config.daemon.listen},
        "components": components,
        "runtimes": runtimes(config),
        "flows": [],
    }
    return status


def runtimes(config: Config) -> dict[str, str | None]:
    """The languages step processes run in: their versions (None: node cannot be used)."""
    import platform

    from .runtime.node import detect

    node = detect(config.daemon.node)
    return {"python": platform.python_version(), "node": node.version if node.ok else None}


def open_reader(config: Config) -> Store | None:
    return Store.readonly(Paths(config.state_dir).db)


def state_path(config: Config) -> Path:
    return Paths(config.state_dir).root
