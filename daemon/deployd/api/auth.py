"""What every mutating API route shares: the bearer-token check and error translation."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import HTTPException, Request

from ..auth import check
from ..errors import DeploydError, FlowFrozen, NoCanary


def token_required(token: Callable[[], str]) -> Callable[[Request], None]:
    """A FastAPI dependency: 401 unless `Authorization: Bearer <token()>`."""

    def require(request: Request) -> None:
        if not check(token(), request.headers.get("authorization")):
            raise HTTPException(
                status_code=401,
                detail="missing or wrong API token (the CLI reads it from daemon.api_token or "
                "state_dir/api-token)",
                headers={"WWW-Authenticate": "Bearer"},
            )

    return require


async def answer(accepting: Callable[[], bool], work: Awaitable[Any]) -> Any:
    """Run one daemon operation for a route: 503 while stopping, 400/404 with the message."""
    if not accepting():
        close = getattr(work, "close", None)
        if close is not None:
            close()
        raise HTTPException(status_code=503, detail="the daemon is stopping")
    try:
        return await work
    except DeploydError as exc:
        status = 404 if str(exc).startswith("unknown ") else 400
        if isinstance(exc, FlowFrozen):
            status = 409  # a freeze window: the same request succeeds after it (or --force)
        elif isinstance(exc, NoCanary):
            status = 409  # nothing in progress to end: the flow's state, not the request
        raise HTTPException(status_code=status, detail=str(exc)) from exc
