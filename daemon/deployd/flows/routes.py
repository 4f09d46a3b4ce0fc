"""HTTP routes that change flows (`/api/v1/flows/...`); every one requires the bearer token."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Depends, HTTPException, Request
from pydantic import BaseModel

from ..auth import check
from ..errors import DeploydError

if TYPE_CHECKING:
    from ..service import Daemon


class ApplyBody(BaseModel):
    text: str
    draft: bool = False


class RollbackBody(BaseModel):
    to: int | None = None


def router(daemon: Daemon) -> APIRouter:
    def require_token(request: Request) -> None:
        if not check(daemon.api_token, request.headers.get("authorization")):
            raise HTTPException(
                status_code=401,
                detail="missing or wrong API token (the CLI reads it from state_dir/api-token)",
                headers={"WWW-Authenticate": "Bearer"},
            )

    api = APIRouter(prefix="/api/v1", dependencies=[Depends(require_token)])

    async def run(coro: Any) -> Any:
        if daemon.stopping.is_set():
            raise HTTPException(status_code=503, detail="the daemon is stopping")
        try:
            return await coro
        except DeploydError as exc:
            status = 404 if str(exc).startswith("unknown flow") else 400
            raise HTTPException(status_code=status, detail=str(exc)) from exc

    @api.post("/flows/apply")
    async def apply(body: ApplyBody) -> Any:
        return await run(daemon.deployer.apply(body.text, draft_only=body.draft))

    @api.post("/flows/{name}/publish")
    async def publish(name: str) -> Any:
        return await run(daemon.deployer.publish(name))

    @api.post("/flows/{name}/start")
    async def start(name: str) -> Any:
        return await run(daemon.deployer.start_flow(name))

    @api.post("/flows/{name}/stop")
    async def stop(name: str) -> Any:
        return await run(daemon.deployer.stop_flow(name))

    @api.post("/flows/{name}/rollback")
    async def rollback(name: str, body: RollbackBody) -> Any:
        return await run(daemon.deployer.rollback(name, body.to))

    return api
