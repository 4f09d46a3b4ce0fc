"""The object store over HTTP: the requests `@elastic.io/maester-client` makes (issue 17).

    POST   /objects                    upload (body: the bytes; content-type, x-meta-*,
                                       x-query-*, x-eio-ttl headers) → 201 {objectId, …}
    PUT    /objects/{id}               replace an object's bytes → 200 {objectId, …}
    GET    /objects/{id}               the bytes, with content-type, x-meta-*, x-query-*
    HEAD   /objects/{id}               the same headers, no body
    DELETE /objects/{id}               → 204
    GET    /objects?query[k]=v…        the objects whose x-query-k is v (every one given) → [{…}]
    DELETE /objects?query[k]=v…        removes those → 204

Every request needs `Authorization: Bearer <ELASTICIO_OBJECT_STORAGE_TOKEN>` (the step's
flow's token, `objects.token_flow`): 401 without a valid one, 403 for an object of another
flow, 404 for none, 400 for an id that is not a UUID (as maester), 413 over
`daemon.max_object_bytes`. An attachment's url is `<uri>/objects/<id>?storage_type=maester`
(the query is ignored here), as the platform's components library builds it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import time
import uuid
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, BinaryIO

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse

from ..objects import OBJECT_ID, ObjectInfo, ObjectStore, new_info, token_flow

if TYPE_CHECKING:
    from ..config import Config

CHUNK = 64 * 1024
MAX_HEADERS = 5  # query fields an object may have (maester's limit)


def _error(status: int, detail: str, **headers: str) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status, headers=headers or None)


def _unauthorized() -> JSONResponse:
    return _error(
        401,
        "missing or wrong object storage token: send 'Authorization: Bearer "
        "$ELASTICIO_OBJECT_STORAGE_TOKEN' (the token deployd gives the flow's steps)",
        **{"WWW-Authenticate": "Bearer"},
    )


def _chunks(fh: BinaryIO) -> Iterator[bytes]:
    with fh:
        while data := fh.read(CHUNK):
            yield data


def router(store: ObjectStore, key: Callable[[], bytes], config: Callable[[], Config]) -> APIRouter:
    api = APIRouter()

    def flow_of(request: Request) -> str | None:
        return token_flow(key(), request.headers.get("authorization"))

    async def owned(request: Request, object_id: str) -> tuple[str, ObjectInfo] | JSONResponse:
        """The caller's flow and the object, or the error to answer."""
        flow = flow_of(request)
        if flow is None:
            return _unauthorized()
        if not OBJECT_ID.match(object_id):
            return _error(400, f"{object_id!r} is not an object id (a lowercase UUID)")
        info = await asyncio.to_thread(store.stat, object_id)
        if info is None or info.expired(time.time()):
            return _error(404, f"no object {object_id}")
        if info.flow != flow:
            return _error(
                403, f"object {object_id} belongs to another flow: this token is of flow {flow}"
            )
        return flow, info

    async def upload(
        request: Request, flow: str, object_id: str, previous: ObjectInfo | None
    ) -> ObjectInfo | JSONResponse:
        limit = config().daemon.max_object_bytes
        try:
            declared = int(request.headers.get("content-length") or 0)
        except ValueError:
            return _error(400, "content-length is not a number")
        if declared > limit:
            return _too_large(declared, limit)
        fields = _fields(request)
        if isinstance(fields, JSONResponse):
            return fields
        metadata, queriable, ttl = fields
        scratch = await asyncio.to_thread(store.scratch)
        path = scratch / f"{object_id}.{uuid.uuid4().hex[:8]}"
        digest = hashlib.md5(usedforsecurity=False)
        size = 0
        try:
            with path.open("wb") as fh:
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > limit:
                        return _too_large(size, limit)
                    digest.update(chunk)
                    fh.write(chunk)
            info = new_info(
                object_id,
                flow,
                size,
                request.headers.get("content-type") or "application/octet-stream",
                digest.hexdigest(),
                metadata,
                queriable,
                ttl,
                previous,
            )
            await asyncio.to_thread(store.put, info, path)
            return info
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

    @api.post("/objects", include_in_schema=False)
    async def create(request: Request) -> Response:
        flow = flow_of(request)
        if flow is None:
            return _unauthorized()
        result = await upload(request, flow, str(uuid.uuid4()), None)
        if isinstance(result, JSONResponse):
            return result
        return JSONResponse(result.as_json(), status_code=201)

    @api.put("/objects/{object_id}", include_in_schema=False)
    async def update(request: Request, object_id: str) -> Response:
        found = await owned(request, object_id)
        if isinstance(found, JSONResponse):
            return found
        flow, info = found
        result = await upload(request, flow, object_id, info)
        if isinstance(result, JSONResponse):
            return result
        return JSONResponse(result.as_json())

    @api.api_route("/objects/{object_id}", methods=["GET", "HEAD"], include_in_schema=False)
    async def read(request: Request, object_id: str) -> Response:
        found = await owned(request, object_id)
        if isinstance(found, JSONResponse):
            return found
        if request.method == "HEAD":
            return Response(status_code=200, headers=found[1].headers())
        got = await asyncio.to_thread(store.get, object_id)
        if got is None:
            return _error(404, f"no object {object_id}")
        info, fh = got
        return StreamingResponse(_chunks(fh), headers=info.headers())

    @api.delete("/objects/{object_id}", include_in_schema=False)
    async def delete(request: Request, object_id: str) -> Response:
        found = await owned(request, object_id)
        if isinstance(found, JSONResponse):
            return found
        await asyncio.to_thread(store.delete, object_id)
        return Response(status_code=204)

    async def matching(request: Request) -> tuple[list[ObjectInfo], None] | tuple[None, Response]:
        flow = flow_of(request)
        if flow is None:
            return None, _unauthorized()
        query: dict[str, str] = {}
        for name, value in request.query_params.multi_items():
            if name.startswith("query[") and name.endswith("]") and len(name) > 7:
                query[name[6:-1]] = value
            elif name != "storage_type":
                return None, _error(
                    400, f"unknown parameter {name!r}: search with query[<key>]=<value>"
                )
        if not query:
            return None, _error(
                400, "give at least one query[<key>]=<value> (an object's x-query-<key> header)"
            )
        if len(query) > MAX_HEADERS:
            return None, _error(400, f"at most {MAX_HEADERS} query parameters")
        now = time.time()

        def find() -> list[ObjectInfo]:
            return [
                info
                for info in store.list()
                if info.flow == flow
                and not info.expired(now)
                and all(info.queriable.get(k) == v for k, v in query.items())
            ]

        return await asyncio.to_thread(find), None

    @api.get("/objects", include_in_schema=False)
    async def search(request: Request) -> Response:
        found, error = await matching(request)
        if found is None:
            assert error is not None
            return error
        found.sort(key=lambda info: info.created_at)
        return JSONResponse([info.as_json() for info in found])

    @api.delete("/objects", include_in_schema=False)
    async def delete_many(request: Request) -> Response:
        found, error = await matching(request)
        if found is None:
            assert error is not None
            return error
        for info in found:
            await asyncio.to_thread(store.delete, info.id)
        return Response(status_code=204)

    return api


def _too_large(size: int, limit: int) -> JSONResponse:
    return _error(
        413,
        f"the object is {size} bytes or more, over daemon.max_object_bytes ({limit}): "
        "upload a smaller one, or raise daemon.max_object_bytes in the config",
    )


def _fields(request: Request) -> tuple[dict[str, str], dict[str, str], int | None] | JSONResponse:
    """x-meta-*, x-query-* and x-eio-ttl of an upload."""
    metadata: dict[str, str] = {}
    queriable: dict[str, str] = {}
    ttl: int | None = None
    for name, value in request.headers.items():
        name = name.lower()
        if name.startswith("x-meta-") and len(name) > 7:
            metadata[name[7:]] = value
        elif name.startswith("x-query-") and len(name) > 8:
            queriable[name[8:]] = value
        elif name == "x-eio-ttl":
            try:
                ttl = int(value)
            except ValueError:
                return _error(400, f"x-eio-ttl {value!r} is not a whole number of seconds")
            if ttl <= 0:
                return _error(400, "x-eio-ttl must be a positive number of seconds")
    if len(queriable) > MAX_HEADERS:
        return _error(400, f"at most {MAX_HEADERS} x-query-* headers (maester's limit)")
    return metadata, queriable, ttl
