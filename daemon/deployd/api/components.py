"""Component routes (`/api/v1/components/{name}/call`): a service verb of a component
version (getMetaModel, a select model method), run once in a step process; token required."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Depends, HTTPException
from pydantic import BaseModel, ConfigDict, Field, StrictStr

from ..flows.metadata import MAX_TIMEOUT, CallError
from .auth import answer, token_required

if TYPE_CHECKING:
    from ..flows.deployer import Deployer


class CallBody(BaseModel):
    """`method` of `function` with `config` as its cfg (`${VAR}` expanded by the daemon)."""

    model_config = ConfigDict(extra="forbid")

    method: StrictStr = Field(min_length=1, max_length=128)
    function: StrictStr = Field(min_length=1, max_length=128)
    config: dict[str, Any] = Field(default_factory=dict)
    version: int | None = Field(default=None, ge=1)
    field: StrictStr | None = Field(default=None, min_length=1, max_length=128)
    timeout: float | None = Field(default=None, gt=0, le=MAX_TIMEOUT)
    credential: StrictStr | None = Field(default=None, min_length=1, max_length=128)


def router(
    deployer: Deployer, token: Callable[[], str], accepting: Callable[[], bool]
) -> APIRouter:
    api = APIRouter(prefix="/api/v1", dependencies=[Depends(token_required(token))])

    @api.post("/components/{name}/call")
    async def call(name: str, body: CallBody) -> Any:
        work = deployer.call_method(
            name,
            body.method,
            body.function,
            body.config,
            body.version,
            body.field,
            body.timeout,
            body.credential,
        )
        return await answer_call(accepting, work)

    return api


async def answer_call(accepting: Callable[[], bool], work: Awaitable[Any]) -> Any:
    """`answer` for a one-off step call: a CallError is its own HTTP status (404 no such
    version, 502 the code failed to load, 504 timeout…), not answer's generic one."""
    try:
        return await answer(accepting, work)
    except HTTPException as exc:
        cause = exc.__cause__
        if isinstance(cause, CallError):
            raise HTTPException(status_code=cause.status, detail=str(cause)) from cause
        raise
