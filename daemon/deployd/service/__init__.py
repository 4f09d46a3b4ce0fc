"""`deployd serve`: the daemon's parts assembled onto one event loop, and their lifecycle.

`parts.py` builds every part with its collaborators; `daemon.py` starts, reloads and stops
them; `repos.py` sets up each component's repository source; `logs.py` and `host.py` are the
logging and the host resources (state lock, socket).
"""

from __future__ import annotations

import asyncio

from ..config import Config
from .daemon import Daemon, HttpFactory
from .logs import config_secrets, set_redactions, setup_logging
from .parts import Parts

__all__ = ["Daemon", "HttpFactory", "Parts", "serve"]


def serve(config: Config, http: HttpFactory, debug: bool = False) -> None:
    """Run the daemon in the foreground until SIGTERM/SIGINT; `http` builds its HTTP server."""
    setup_logging(config.daemon.log_format, debug)
    set_redactions(config_secrets(config))
    asyncio.run(Daemon(config, http).run())
