"""Read-only routes, no token: `/healthz`, `/metrics` (Prometheus) and `/api/v1/status`."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse

from .. import health
from ..metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from ..status import build_status

if TYPE_CHECKING:
    from ..config import Config
    from ..flows.deployer import Deployer
    from ..health import LagMonitor
    from ..metrics import Metrics
    from ..paths import Paths
    from ..store import Store


def router(
    config: Callable[[], Config],
    store: Store,
    paths: Paths,
    lag: LagMonitor,
    metrics: Metrics,
    deployer: Deployer,
) -> APIRouter:
    """Health (200/503 with the reasons), the metrics text, and the status document."""
    api = APIRouter()

    @api.get("/healthz")
    async def healthz() -> Response:
        d = config().daemon
        limits = health.Limits(
            max_loop_lag=d.health_max_loop_lag,
            min_free_bytes=d.health_min_free_mb * 1024 * 1024,
            min_free_ratio=d.health_min_free_percent / 100,
        )
        body = health.check(store, paths.root, lag, limits)
        return JSONResponse(body, status_code=200 if body["ok"] else 503)

    @api.get("/metrics", name="metrics")  # the name the OpenAPI operation id has always had
    async def metrics_text() -> Response:
        deployer.update_gauges()
        return Response(metrics.render(), media_type=METRICS_CONTENT_TYPE)

    @api.get("/api/v1/status")
    async def status() -> dict[str, Any]:
        return build_status(config(), store, paths, deployer)

    return api
