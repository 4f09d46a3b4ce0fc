"""Credential routes: `GET /api/v1/credentials` (names, components and field names, never a
value) and `POST /api/v1/credentials/{name}/verify` (the component's verifyCredentials, run
once in a step process with the credential's fields); token required."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Depends
from pydantic import BaseModel, ConfigDict, Field

from ..flows.metadata import MAX_TIMEOUT
from .auth import token_required
from .components import answer_call

if TYPE_CHECKING:
    from ..flows.deployer import Deployer


class VerifyBody(BaseModel):
    """The version to verify with (default: the component's recent one)."""

    model_config = ConfigDict(extra="forbid")

    version: int | None = Field(default=None, ge=1)
    timeout: float | None = Field(default=None, gt=0, le=MAX_TIMEOUT)


def router(
    deployer: Deployer, token: Callable[[], str], accepting: Callable[[], bool]
) -> APIRouter:
    api = APIRouter(prefix="/api/v1", dependencies=[Depends(token_required(token))])

    @api.get("/credentials")
    def credentials() -> Any:
        return deployer.credentials.describe()

    @api.post("/credentials/{name}/verify")
    async def verify(name: str, body: VerifyBody | None = None) -> Any:
        body = body or VerifyBody()
        work = deployer.verify_credential(name, body.version, body.timeout)
        return await answer_call(accepting, work)

    return api
