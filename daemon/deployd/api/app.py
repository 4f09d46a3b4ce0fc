"""HTTP: FastAPI routes on the daemon's own event loop (uvicorn without its signal handling).

Thin: each route parses, calls one function of a handle in `ApiParts`, and formats the
result. `create_server` is the `HttpFactory` the CLI's `serve` hands the service: it gets the
assembled `service.Parts` and gives the routes only the handles they use.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import uvicorn
from fastapi import FastAPI

from . import artifacts, components, credentials, flows, hooks, objects, ops, poll, status, ui

if TYPE_CHECKING:
    from ..config import Config
    from ..flows.deployer import Deployer
    from ..flows.intake import FlowIntake
    from ..health import LagMonitor
    from ..metrics import Metrics
    from ..objects import ObjectStore
    from ..ops import Operator
    from ..paths import Paths
    from ..service import Parts
    from ..sources.poll import Poller
    from ..sources.webhook import WebhookIntake
    from ..store import Store


@dataclass(frozen=True)
class ApiParts:
    """What the routes need, and nothing else. Values that change at runtime are getters."""

    config: Callable[[], Config]  # a reload replaces the config (webhook secrets at once)
    token: Callable[[], str]  # the API bearer token
    accepting: Callable[[], bool]  # False once stopping: mutating routes and webhooks 503
    store: Store
    paths: Paths
    lag: LagMonitor
    metrics: Metrics
    deployer: Deployer
    operator: Operator
    poller: Poller | None
    intake: WebhookIntake
    flow_intake: FlowIntake  # POST /flows/{name}/in
    object_store: ObjectStore  # attachments (the maester API at /objects)
    object_key: Callable[[], bytes]  # what the steps' object storage tokens derive from
    hub: ui.EventHub  # wakes the dashboard's event streams (the store's event listener)


class Server(uvicorn.Server):
    """uvicorn on an already-bound socket; the daemon, not uvicorn, owns the signals."""

    def __init__(self, app: hooks.FastPath | FastAPI, sock: socket.socket) -> None:
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


def create_app(parts: ApiParts) -> hooks.FastPath:
    """The FastAPI app behind the webhook fast path (see `hooks.FastPath`)."""
    app = FastAPI(title="deployd", version="1", docs_url=None, redoc_url=None)
    app.include_router(
        status.router(
            parts.config, parts.store, parts.paths, parts.lag, parts.metrics, parts.deployer
        )
    )
    app.include_router(flows.router(parts.deployer, parts.token, parts.accepting))
    app.include_router(ops.router(parts.operator, parts.token, parts.accepting))
    app.include_router(components.router(parts.deployer, parts.token, parts.accepting))
    app.include_router(credentials.router(parts.deployer, parts.token, parts.accepting))
    app.include_router(hooks.router(parts.intake, parts.flow_intake))  # /hooks/…, /flows/…/in
    app.include_router(poll.router(parts.poller, parts.config, parts.token))  # /api/v1/poll
    app.include_router(objects.router(parts.object_store, parts.object_key, parts.config))
    app.include_router(artifacts.router(parts.store, parts.paths, parts.object_key))
    app.include_router(
        ui.router(
            ui.UiParts(
                config=parts.config,
                token=parts.token,
                accepting=parts.accepting,
                store=parts.store,
                paths=parts.paths,
                deployer=parts.deployer,
                operator=parts.operator,
                hub=parts.hub,
            )
        )
    )  # GET /ui (the dashboard), GET /api/v1/events/stream
    return hooks.FastPath(app, parts.intake, parts.flow_intake)


def create_server(parts: Parts, sock: socket.socket) -> Server:
    """The daemon's HTTP server on `sock`, its routes built from the daemon's parts."""
    hub = ui.EventHub(parts.paths.db, parts.stopping)
    hub.bind(asyncio.get_running_loop())
    parts.store.add_event_listener(hub.notify)
    api = ApiParts(
        config=lambda: parts.config,
        token=lambda: parts.api_token,
        accepting=lambda: parts.accepting,
        store=parts.store,
        paths=parts.paths,
        lag=parts.lag,
        metrics=parts.metrics,
        deployer=parts.deployer,
        operator=parts.operator,
        poller=parts.poller,
        intake=parts.intake,
        flow_intake=parts.flow_intake,
        object_store=parts.object_store,
        object_key=lambda: parts.object_key,
        hub=hub,
    )
    return Server(create_app(api), sock)
