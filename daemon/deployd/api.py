"""HTTP: FastAPI routes on the daemon's own event loop (uvicorn without its signal handling).

Thin: each route parses, calls one function of the daemon, and formats the result.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import uvicorn
from fastapi import FastAPI

from .status import build_status

if TYPE_CHECKING:
    from .service import Daemon


class Server(uvicorn.Server):
    """uvicorn on an already-bound socket; the daemon, not uvicorn, owns the signals."""

    def __init__(self, app: FastAPI, sock: socket.socket) -> None:
        super().__init__(
            uvicorn.Config(
                app,
                log_level="warning",
                access_log=False,
                lifespan="off",
                timeout_graceful_shutdown=3,
                server_header=False,
            )
        )
        self.sock = sock
        self.ready = asyncio.Event()

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        self.ready.set()

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield

    async def serve_forever(self) -> None:
        await self.serve(sockets=[self.sock])


def create_app(daemon: Daemon) -> FastAPI:
    app = FastAPI(title="deployd", version="1", docs_url=None, redoc_url=None)

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        return {"ok": True}

    @app.get("/api/v1/status")
    async def status() -> dict[str, Any]:
        return build_status(daemon.config, daemon.store, daemon.paths)

    return app
