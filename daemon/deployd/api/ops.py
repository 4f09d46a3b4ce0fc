"""Operator routes (`/api/v1/gc|pause|resume|components/{name}/redeploy|plan/{component}`),
bearer token required."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Depends
from pydantic import BaseModel, ConfigDict, Field, StrictStr

from .auth import answer, token_required

if TYPE_CHECKING:
    from ..ops import Operator


class NameBody(BaseModel):
    name: str


class RedeployBody(BaseModel):
    sha: str | None = None


class PlanBody(BaseModel):
    """The commit to plan: a sha (full or abbreviated); null or absent: the branch head."""

    model_config = ConfigDict(extra="forbid")

    sha: StrictStr | None = Field(default=None, min_length=1, max_length=64)


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

    @api.post("/plan/{component}")
    async def plan(component: str, body: PlanBody | None = None) -> Any:
        """What a push of `sha` would do: the same object as `deployd plan --json`."""
        return await run(operator.plan(component, body.sha if body else None))

    return api
