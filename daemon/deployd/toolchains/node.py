"""Node.js for `runtime = "node"` components: finding `node` and its version.

`detect()` finds the configured node (`daemon.node`: a name looked up on PATH, or a path) and
checks it is Node.js 18 or newer; its `error` is the one-line reason shown by validation,
builds, `check-config` and `status` when it is not. Light on imports (no asyncio): `deployd
status` and `check-config` use it. Shared by the pipeline (builds) and the runtime (steps);
starting Node step processes is the embedded runtime's `node_pool.py`; the default build's
npm commands are `npm.py`.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

# require('elasticio-node') falls back to the helper in here (NODE_PATH in builds; a resolve
# hook in the runtime's sailor.js).
SHIM_DIR = Path(__file__).with_name("node_shim")
MIN_MAJOR = 18
NEEDS = f'runtime = "node" needs Node.js {MIN_MAJOR} or newer'
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
