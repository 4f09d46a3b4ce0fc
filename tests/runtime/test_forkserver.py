"""The fork server loads the sailor and nothing of the daemon: every Python step inherits it."""

from __future__ import annotations

import json
import subprocess
import sys

# Modules a component may ship its own copy of (in `.deps`), or that only the daemon needs.
DAEMON_ONLY = ["pydantic", "jsonata", "sqlite3", "prometheus_client", "deployd.store"]


def test_the_fork_server_imports_none_of_the_daemons_modules() -> None:
    probe = (
        "import sys, json, deployd.runtime.embedded.forkserver; "
        f"print(json.dumps([m for m in {DAEMON_ONLY!r} if m in sys.modules]))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    )
    assert json.loads(out.stdout) == []
