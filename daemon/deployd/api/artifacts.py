"""`GET /api/v1/artifacts/{component}/{version}`: a component version's code as a pod of a
step on Kubernetes downloads it (issue 13).

The answer is the version's reproducible `.tar.gz` (`runtime/kubernetes/artifacts.py`) with
its sha256 in `X-Deployd-Sha256` and the ETag; the pod checks the bytes against the sha256
its Deployment names before using them. The bearer token is a flow version's artifact token
(`artifact_token`, signed with the object storage's key and checked before it is parsed): it
opens only the component versions that flow version runs. 401 without a valid token, 403 for
a component version that flow version does not run, 404 for one that does not exist, 410 for
one whose code retention removed.

`GET /api/v1/snapshots/{flow}/{step}`: the step's snapshot as deployd keeps it, with the same
token (only a step of the token's own flow version): a pod reads it before its first call.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

from fastapi import APIRouter, Request, Response
from fastapi.responses import FileResponse, JSONResponse

from ..config import NAME_RE
from ..paths import Paths
from ..runtime.kubernetes.artifacts import ensure_archive, token_flow_version
from ..store import FlowStore, Store


def _error(status: int, detail: str, **headers: str) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status, headers=headers or None)


def _unauthorized() -> JSONResponse:
    return _error(
        401,
        "missing or wrong artifact token: send 'Authorization: Bearer "
        "$DEPLOYD_ARTIFACT_TOKEN' (the token deployd gives a flow version's pods)",
        **{"WWW-Authenticate": "Bearer"},
    )


def router(store: Store, paths: Paths, key: Callable[[], bytes]) -> APIRouter:
    api = APIRouter()
    flows = FlowStore(store)

    @api.get("/api/v1/artifacts/{component}/{version}")
    async def artifact(request: Request, component: str, version: str) -> Response:
        owner = token_flow_version(key(), request.headers.get("authorization"))
        if owner is None:
            return _unauthorized()
        flow, flow_version = owner
        if not NAME_RE.match(component) or not version.isdigit() or len(version) > 9:
            return _error(404, f"no component version {component}/{version}")
        number = int(version)
        row = flows.flow_version(flow, flow_version)
        steps = (row or {}).get("steps") or []
        if not any(s.get("component") == component and s.get("version") == number for s in steps):
            return _error(
                403,
                f"this token is of flow {flow} v{flow_version}, which does not run "
                f"{component} v{number}",
            )
        found = store.version(component, number)
        if found is None:
            return _error(404, f"no component version {component} v{number}")
        if not found["artifact_dir"]:
            return _error(410, f"the code of {component} v{number} was removed by retention")
        path, sha = await asyncio.to_thread(
            ensure_archive, paths.artifacts, component, number, Path(found["artifact_dir"])
        )
        return FileResponse(
            path,
            media_type="application/gzip",
            filename=f"{component}-{number}.tar.gz",
            headers={"X-Deployd-Sha256": sha, "ETag": f'"{sha}"', "Cache-Control": "no-store"},
        )

    @api.get("/api/v1/snapshots/{flow}/{step}")
    async def snapshot(request: Request, flow: str, step: str) -> Response:
        """A step's snapshot, for a pod of that flow version (its artifact token)."""
        owner = token_flow_version(key(), request.headers.get("authorization"))
        if owner is None:
            return _unauthorized()
        token_flow, flow_version = owner
        row = flows.flow_version(token_flow, flow_version)
        steps = (row or {}).get("steps") or []
        if flow != token_flow or not any(s.get("id") == step for s in steps):
            return _error(
                403, f"this token is of flow {token_flow} v{flow_version}, which has no step {step}"
            )
        return JSONResponse(
            {"flow": flow, "step": step, "snapshot": flows.snapshot(flow, step)},
            headers={"Cache-Control": "no-store"},
        )

    return api
