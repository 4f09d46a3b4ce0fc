"""`POST /hooks/{component}` and `POST /flows/{name}/in` over HTTP: the raw-ASGI fast path
and the same routes in FastAPI.

Both hand the name, the headers and the body stream to the (framework-free) intake —
`sources.webhook.WebhookIntake` for push webhooks, `flows.intake.FlowIntake` for HTTP-fed
flows — and send its answer.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Request, Response
from starlette.routing import Route

if TYPE_CHECKING:
    from ..flows.intake import Answer, FlowIntake
    from ..sources.webhook import Decision, WebhookIntake


def _response(decision: Decision) -> Response:
    return Response(
        json.dumps(decision.body).encode(),
        status_code=decision.status,
        media_type="application/json",
        headers=decision.headers,
    )


def _answer(answer: Answer) -> Response:
    return Response(answer.body, status_code=answer.status, headers=answer.headers)


class FastPath:
    """POST /hooks/{component} straight to the intake, ahead of FastAPI's middleware stack.

    That stack (error, telemetry, body-limit and exception middleware, router and
    included-router dispatch) was ~1/6 of the daemon's CPU per hook under load (see
    docs/benchmarks.md). Anything else, including a hook path with more than one segment,
    goes to `app` unchanged (the same route is registered there too).
    """

    def __init__(self, app: Any, intake: WebhookIntake, flows: FlowIntake | None = None) -> None:
        self.app = app
        self.intake = intake
        self.flows = flows

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            path: str = scope["path"]
            name = path[7:] if path.startswith("/hooks/") else ""
            if name and "/" not in name:
                request = Request(scope, receive)
                decision = await self.intake.handle(name, request.headers, request.stream())
                await _response(decision)(scope, receive, send)
                return
            flow = path[7:-3] if path.startswith("/flows/") and path.endswith("/in") else ""
            if flow and "/" not in flow and self.flows is not None:
                request = Request(scope, receive)
                answer = await self.flows.handle(flow, request.headers, request.stream())
                await _answer(answer)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def router(intake: WebhookIntake, flows: FlowIntake | None = None) -> APIRouter:
    """The webhook and flow-intake routes for requests that did not take the fast path."""
    api = APIRouter()

    async def flow_in(request: Request) -> Response:
        assert flows is not None
        name = request.path_params["name"]
        return _answer(await flows.handle(name, request.headers, request.stream()))

    if flows is not None:
        api.routes.append(Route("/flows/{name}/in", flow_in, methods=["POST"]))

    async def hook(request: Request) -> Response:
        name = request.path_params["component"]
        return _response(await intake.handle(name, request.headers, request.stream()))

    # A plain Starlette route: no dependency solving or response model on the hot path
    # (the route must answer ≥ 1,000 signed pushes a second; see docs/benchmarks.md).
    api.routes.append(Route("/hooks/{component}", hook, methods=["POST"]))
    return api
