"""Operator routes (`/api/v1/gc|pause|resume|components/{name}/redeploy`), bearer token required."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Depends
from pydantic import BaseModel

from .auth import answer, token_required

if TYPE_CHECKING:
    from ..ops import Operator


class NameBody(BaseModel):
    name: str


class RedeployBody(BaseModel):
    sha: str | None = None


def router(
    operator: Operator, token: Callable[[], str], accepting: Callable[[], bool]
) -> APIRouter:
    """gc / pause / resume / redeploy, each one call of the `Operator`."""
    api = APIRouter(prefix="/api/v1", dependencies=[Depends(token_required(token))])

    def run(coro: Any) -> Any:
        return answer(accepting, coro)

    @api.post("/gc")
    async def gc() -> Any:
        return await run(operator.gc())

    @api.post("/pause")
    async def pause(body: NameBody) -> Any:
        return await run(operator.pause(body.name))

    @api.post("/resume")
    async def resume(body: NameBody) -> Any:
        return await run(operator.resume(body.name))

    @api.post("/components/{name}/redeploy")
    async def redeploy(name: str, body: RedeployBody) -> Any:
        return await run(operator.redeploy(name, body.sha))

    return api
