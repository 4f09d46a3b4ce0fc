"""HTTP routes of flows (`/api/v1/flows/...`); every one requires the bearer token.

That includes `GET /flows/{name}/errors`: unlike the status, a dead letter holds a message's
body and headers (customer data, perhaps credentials), so reading them needs the token too.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Annotated, Any, Literal

from fastapi import APIRouter, Depends, HTTPException, Query
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, model_validator

from ..errors import DeploydError
from ..flows.letters import MAX_IDS, Letters
from ..flows.runs import run_json
from ..store.runs import RunStore
from .auth import answer, token_required

if TYPE_CHECKING:
    from ..flows.deployer import Deployer


class ApplyBody(BaseModel):
    text: str
    draft: bool = False


class PublishBody(BaseModel):
    """`flow publish`: the draft (no body), or `version` "COMPONENT@N" on purpose; `force`
    in a freeze window."""

    model_config = ConfigDict(extra="forbid")

    version: str | None = Field(default=None, min_length=3, max_length=100)
    force: StrictBool = False  # publish even in a freeze window (recorded as forced)


class RollbackBody(BaseModel):
    to: int | None = None


class MoveBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    runtime: Literal["embedded", "rabbitmq"]


LetterId = Annotated[StrictInt, Field(ge=1, le=2**63 - 1)]


class ErrorsBody(BaseModel):
    """Which dead letters to retry or discard: `ids`, or `all` (of `step`, when given)."""

    model_config = ConfigDict(extra="forbid")

    step: str | None = Field(default=None, min_length=1, max_length=200)
    ids: list[LetterId] | None = Field(default=None, min_length=1, max_length=MAX_IDS)
    all: StrictBool = False

    @model_validator(mode="after")
    def _ids_or_all(self) -> ErrorsBody:
        if (self.ids is not None) == self.all:
            raise ValueError(
                "give either ids (a list of dead letter ids) or all: true, not both"
                if self.all
                else "ids or all: name the dead letters (ids: [1, 2]) or give all: true"
            )
        return self


def router(
    deployer: Deployer, token: Callable[[], str], accepting: Callable[[], bool]
) -> APIRouter:
    """apply / publish / start / stop / rollback / move, a canary's promote / rollback, and the
    dead letters (list, retry, discard), each one call of the deployer."""
    api = APIRouter(prefix="/api/v1", dependencies=[Depends(token_required(token))])

    def run(coro: Any) -> Any:
        return answer(accepting, coro)

    @api.post("/flows/apply")
    async def apply(body: ApplyBody) -> Any:
        return await run(deployer.apply(body.text, draft_only=body.draft))

    @api.post("/flows/{name}/publish")
    async def publish(name: str, body: PublishBody | None = None) -> Any:
        body = body or PublishBody()
        return await run(deployer.publish(name, version=body.version, force=body.force))

    @api.post("/flows/{name}/start")
    async def start(name: str) -> Any:
        return await run(deployer.start_flow(name))

    @api.post("/flows/{name}/stop")
    async def stop(name: str) -> Any:
        return await run(deployer.stop_flow(name))

    @api.post("/flows/{name}/rollback")
    async def rollback(name: str, body: RollbackBody) -> Any:
        return await run(deployer.rollback(name, body.to))

    @api.post("/flows/{name}/canary/promote")
    async def canary_promote(name: str) -> Any:
        """End the flow's canary in progress now: its new version takes over (`promoted`);
        409 when no canary is in progress."""
        return await run(deployer.promote(name))

    @api.post("/flows/{name}/canary/rollback")
    async def canary_rollback(name: str) -> Any:
        """End the flow's canary in progress now: its new version stops, the old one keeps
        running (`rolled_back`); 409 when no canary is in progress."""
        return await run(deployer.rollback_canary(name))

    @api.get("/flows/{name}/canary")
    async def canary(name: str) -> Any:
        """The flow's canary in progress (as in the status), or null."""
        if deployer.fs.flow(name) is None:
            raise HTTPException(status_code=404, detail=f"unknown flow {name!r}")
        return deployer.canary_status(name)

    @api.post("/flows/{name}/move")
    async def move(name: str, body: MoveBody) -> Any:
        return await run(deployer.move(name, body.runtime))

    @api.post("/flows/{name}/run")
    async def run_now(name: str) -> Any:
        """A run of an ordinary flow now: `{"flow", "run", "status": "running"}`."""
        return await run(deployer.run_flow(name))

    @api.get("/flows/{name}/runs")
    async def runs(name: str, limit: Annotated[int, Query(ge=1, le=1000)] = 50) -> Any:
        """The runs of an ordinary flow, newest first."""
        if deployer.fs.flow(name) is None:
            raise HTTPException(status_code=404, detail=f"unknown flow {name!r}")
        return [run_json(r) for r in RunStore(deployer.store).runs(name, limit)]

    @api.get("/flows/{name}/errors")
    async def errors(
        name: str,
        step: Annotated[str | None, Query(min_length=1, max_length=200)] = None,
        id: Annotated[int | None, Query(ge=1, le=2**63 - 1)] = None,
    ) -> Any:
        """The flow's dead letters, newest first (a list); with `id`, that one whole."""
        letters = Letters(deployer.store)
        try:
            return letters.listing(name, step) if id is None else letters.one(name, id, step)
        except DeploydError as exc:
            status = 404 if str(exc).startswith("unknown ") else 400
            raise HTTPException(status_code=status, detail=str(exc)) from exc

    @api.post("/flows/{name}/errors/retry")
    async def retry_errors(name: str, body: ErrorsBody) -> Any:
        return await run(deployer.retry_errors(name, body.step, body.ids))

    @api.post("/flows/{name}/errors/discard")
    async def discard_errors(name: str, body: ErrorsBody) -> Any:
        return await run(deployer.discard_errors(name, body.step, body.ids))

    return api
