"""`POST /api/v1/poll {"component": NAME|null}`: poll now (`deployd poll`), token required."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse

from ..config import redact_url
from .auth import token_required

if TYPE_CHECKING:
    from ..config import Config
    from ..sources.poll import Poller


def router(
    poller: Poller | None, config: Callable[[], Config], token: Callable[[], str]
) -> APIRouter:
    """The poll route; `poller` None (not set up yet) is answered 503."""
    api = APIRouter()

    @api.post(
        "/api/v1/poll", include_in_schema=False, dependencies=[Depends(token_required(token))]
    )
    async def poll(request: Request) -> Response:
        try:
            body = await request.json() if await request.body() else {}
        except ValueError:
            return JSONResponse({"detail": "body must be JSON"}, status_code=400)
        name = body.get("component") if isinstance(body, dict) else None
        if poller is None:
            return JSONResponse({"detail": "the daemon is starting; retry"}, status_code=503)
        if name is not None:
            comp = config().component(str(name))
            if comp is None:
                return JSONResponse({"detail": f"unknown component {name!r}"}, status_code=404)
            if comp.name not in poller.targets:
                where = "hosted by deployd" if comp.hosted else "watched on this machine"
                return JSONResponse(
                    {
                        "detail": f"{comp.name} is not polled: its repository is {where} "
                        "(set poll_interval on it to poll anyway)"
                    },
                    status_code=400,
                )
        results = await poller.poll_now(name)
        for r in results:
            comp = config().component(r["component"])
            if comp is not None and comp.url:
                r["url"] = redact_url(comp.url)
        return JSONResponse({"polled": results})

    return api
