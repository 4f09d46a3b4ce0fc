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
from fastapi import FastAPI, Response
from fastapi.responses import JSONResponse

from . import health, ops
from .flows import routes as flow_routes
from .metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from .sources import webhook
from .status import build_status

if TYPE_CHECKING:
    from .service import Parts as Daemon


class Server(uvicorn.Server):
    """uvicorn on an already-bound socket; the daemon, not uvicorn, owns the signals."""

    def __init__(self, app: webhook.FastPath | FastAPI, sock: socket.socket) -> None:
        super().__init__(
            uvicorn.Config(
                app,
                log_level="warning",
                log_config=None,  # uvicorn logs through ours: key=value/JSON, secrets redacted
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


def create_server(parts: Daemon, sock: socket.socket) -> Server:
    """The daemon's HTTP server on `sock` (the `HttpFactory` that `serve` is given)."""
    return Server(create_app(parts), sock)


def create_app(daemon: Daemon) -> webhook.FastPath:
    """The FastAPI app behind the webhook fast path (see `webhook.FastPath`)."""
    app = FastAPI(title="deployd", version="1", docs_url=None, redoc_url=None)

    @app.get("/healthz")
    async def healthz() -> Response:
        d = daemon.config.daemon
        limits = health.Limits(
            max_loop_lag=d.health_max_loop_lag,
            min_free_bytes=d.health_min_free_mb * 1024 * 1024,
            min_free_ratio=d.health_min_free_percent / 100,
        )
        body = health.check(getattr(daemon, "store", None), daemon.paths.root, daemon.lag, limits)
        return JSONResponse(body, status_code=200 if body["ok"] else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        daemon.deployer.update_gauges()
        return Response(daemon.metrics.render(), media_type=METRICS_CONTENT_TYPE)

    @app.get("/api/v1/status")
    async def status() -> dict[str, Any]:
        return build_status(daemon.config, daemon.store, daemon.paths, daemon.deployer)

    app.include_router(flow_routes.router(daemon))
    app.include_router(ops.router(daemon))
    intake = webhook.WebhookIntake(daemon)
    app.include_router(webhook.create_router(daemon, intake))  # /hooks/{component}, /api/v1/poll
    return webhook.FastPath(app, intake)
