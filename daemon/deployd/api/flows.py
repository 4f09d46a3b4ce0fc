"""HTTP routes that change flows (`/api/v1/flows/...`); every one requires the bearer token."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Depends
from pydantic import BaseModel

from .auth import answer, token_required

if TYPE_CHECKING:
    from ..flows.deployer import Deployer


class ApplyBody(BaseModel):
    text: str
    draft: bool = False


class RollbackBody(BaseModel):
    to: int | None = None


def router(
    deployer: Deployer, token: Callable[[], str], accepting: Callable[[], bool]
) -> APIRouter:
    """apply / publish / start / stop / rollback, each one call of the deployer."""
    api = APIRouter(prefix="/api/v1", dependencies=[Depends(token_required(token))])

    def run(coro: Any) -> Any:
        return answer(accepting, coro)

    @api.post("/flows/apply")
    async def apply(body: ApplyBody) -> Any:
        return await run(deployer.apply(body.text, draft_only=body.draft))

    @api.post("/flows/{name}/publish")
    async def publish(name: str) -> Any:
        return await run(deployer.publish(name))

    @api.post("/flows/{name}/start")
    async def start(name: str) -> Any:
        return await run(deployer.start_flow(name))

    @api.post("/flows/{name}/stop")
    async def stop(name: str) -> Any:
        return await run(deployer.stop_flow(name))

    @api.post("/flows/{name}/rollback")
    async def rollback(name: str, body: RollbackBody) -> Any:
        return await run(deployer.rollback(name, body.to))

    return api
