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

from .config import Config, redact_url
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
    polls = store.poll_states() if store else {}
    components = []
    for comp in config.components:
        r = recent.get(comp.name)
        b = last.get(comp.name)
        components.append(
            {
                "name": comp.name,
                "branch": comp.branch,
                "url": redact_url(comp.url)
                if comp.url is not None
                else str(paths.hosted_repo(comp.name)),
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
                "poll": poll_status(polls.get(comp.name))
                if comp.mirrored or comp.poll_every(config.daemon.poll_interval) > 0
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


def poll_status(row: dict[str, Any] | None) -> dict[str, Any] | None:
    """A component's `"poll"` object: last success, last error (if the last poll failed), next."""
    if row is None:
        return None
    error = None
    if row.get("last_error"):
        error = {"at": row.get("last_error_at"), "message": row["last_error"]}
    return {
        "interval": row["interval"],
        "last_ok": row.get("last_ok"),
        "last_error": error,
        "failures": row.get("failures", 0),
        "head": row.get("head"),
        "next_at": row.get("next_at"),
    }


def open_reader(config: Config) -> Store | None:
    return Store.readonly(Paths(config.state_dir).db)


def state_path(config: Config) -> Path:
    return Paths(config.state_dir).root
