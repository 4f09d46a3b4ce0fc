"""The object store steps keep attachments in (issue 17), and its per-flow tokens.

Steps reach it over deployd's HTTP API with the requests `@elastic.io/maester-client` makes
(`api/objects.py`), at `ELASTICIO_OBJECT_STORAGE_URI` with `ELASTICIO_OBJECT_STORAGE_TOKEN`.

**Tokens.** A step's token is a JWT (HS256) whose payload names its flow
(`{"flowId": …, "iss": "deployd", "scope": "object-storage"}`), signed with a key generated
once into `state_dir/object-storage-key` (0600). Nothing about it is stored in the database:
a token is checked by signing its payload again (constant-time compare), so a token of flow A
never opens an object of flow B, and deleting the key file revokes every token (steps get new
ones when they start next).

**The store** is an `ObjectStore` (put/get/stat/delete/list): `FileStore` keeps each object
under `state_dir/objects` as its bytes (`<id[:2]>/<id>`) and its description (`<id>.json`,
written after the bytes, each by an atomic rename, so a crash leaves no half object). An
S3-compatible store can replace it behind the same interface.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
import os
import re
import secrets
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import BinaryIO, Protocol

from .paths import Paths

OBJECT_ID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
# An object named by an attachment's url (`…/objects/<id>?storage_type=maester`).
OBJECT_URL = re.compile(r"/objects/([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})")
_HEADER = {"alg": "HS256", "typ": "JWT"}
SCOPE = "object-storage"


# -- tokens ----------------------------------------------------------------------------------


MAX_TOKEN_CHARS = 4096  # a longer bearer token is not one deployd or maester-client makes


def ensure_key(paths: Paths) -> bytes:
    """The key tokens are derived from; generated into state_dir at first start (0600)."""
    path = paths.object_key
    try:
        return bytes.fromhex(path.read_text().strip())
    except FileNotFoundError:
        pass
    key = secrets.token_bytes(32)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # written meanwhile by another process: use that one
        return bytes.fromhex(path.read_text().strip())
    with os.fdopen(fd, "w") as fh:
        fh.write(key.hex() + "\n")
    return key


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _sign(key: bytes, signing_input: str) -> str:
    return _b64(hmac.new(key, signing_input.encode(), hashlib.sha256).digest())


def sign_token(key: bytes, payload: dict[str, object]) -> str:
    """An HS256 JWT of `payload` signed with `key` (the object storage's, the artifacts')."""
    header = _b64(json.dumps(_HEADER, separators=(",", ":")).encode())
    body = _b64(json.dumps(payload, separators=(",", ":")).encode())
    return f"{header}.{body}.{_sign(key, f'{header}.{body}')}"


def verified_claims(key: bytes, authorization: str | None) -> dict[str, object] | None:
    """The payload of an `Authorization: Bearer <token>` header's token signed by deployd
    with `key`; None when there is none or its signature is wrong. The signature is checked
    (constant time) before anything of the token is parsed."""
    scheme, _, token = (authorization or "").partition(" ")
    parts = token.strip().split(".")
    if scheme.lower() != "bearer" or len(parts) != 3 or len(token) > MAX_TOKEN_CHARS:
        return None
    if not hmac.compare_digest(parts[2].encode(), _sign(key, f"{parts[0]}.{parts[1]}").encode()):
        return None
    payload = _claims(parts)
    return payload if payload is not None and payload.get("iss") == "deployd" else None


def flow_token(key: bytes, flow: str) -> str:
    """The object storage token of `flow`'s steps (the same for every start of them)."""
    return sign_token(key, {"flowId": flow, "iss": "deployd", "scope": SCOPE})


def token_flow(key: bytes, authorization: str | None) -> str | None:
    """The flow an `Authorization: Bearer <token>` header's token belongs to; None when there
    is no token or it is not one deployd signed (with this key) for the object store.

    maester-client may also send a JWT it signed itself (`jwtPayloadOrToken` given as a
    payload object, signed HS256 with the token as the secret): accepted when its payload's
    `flowId` names the flow whose token signed it."""
    scheme, _, token = (authorization or "").partition(" ")
    parts = token.strip().split(".")
    if scheme.lower() != "bearer" or len(parts) != 3 or len(token) > MAX_TOKEN_CHARS:
        return None
    signing_input = f"{parts[0]}.{parts[1]}"
    # A token deployd gave: its signature is checked before anything of it is parsed.
    if hmac.compare_digest(parts[2].encode(), _sign(key, signing_input).encode()):
        payload = verified_claims(key, authorization)
        if payload is None or payload.get("scope") != SCOPE:
            return None
        flow = payload.get("flowId")
        return flow if isinstance(flow, str) and flow else None
    # A JWT the client signed with a flow's token: which flow's token is the secret is in
    # the payload, so it is read (bounded in size) and the signature then checked with it.
    payload = _claims(parts)
    if payload is None or (payload.get("scope") == SCOPE and payload.get("iss") == "deployd"):
        return None  # (one claiming to be deployd's own is only valid signed with the key)
    flow = payload.get("flowId")
    if not isinstance(flow, str) or not flow:
        return None
    secret = flow_token(key, flow).encode()
    if not hmac.compare_digest(parts[2].encode(), _sign(secret, signing_input).encode()):
        return None
    return flow


def _claims(parts: list[str]) -> dict[str, object] | None:
    """The payload of an HS256 JWT's parts (None: not one)."""
    try:
        header = json.loads(_unb64(parts[0]))
        payload = json.loads(_unb64(parts[1]))
    except ValueError:
        return None
    if not isinstance(header, dict) or header.get("alg") != "HS256":
        return None
    return payload if isinstance(payload, dict) else None


# -- objects ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ObjectInfo:
    """What the store knows of one object besides its bytes."""

    id: str
    flow: str  # the flow whose token wrote it: only that flow's tokens open it
    size: int
    content_type: str
    md5: str
    created_at: float  # epoch seconds
    updated_at: float
    metadata: dict[str, str] = field(default_factory=dict)  # x-meta-<key>
    queriable: dict[str, str] = field(default_factory=dict)  # x-query-<key>
    ttl: int | None = None  # seconds from updated_at (x-eio-ttl), None: no own expiry

    def expired(self, now: float) -> bool:
        return self.ttl is not None and now >= self.updated_at + self.ttl

    def as_json(self) -> dict[str, object]:
        """The object as the maester API describes it (POST/PUT answers, query results)."""
        return {
            "objectId": self.id,
            "contentType": self.content_type,
            "contentLength": self.size,
            "md5": self.md5,
            "createdAt": int(self.created_at * 1000),
            "updatedAt": int(self.updated_at * 1000),
            "metadata": dict(self.metadata),
            "queriableFields": dict(self.queriable),
        }

    def headers(self) -> dict[str, str]:
        """The response headers of GET/HEAD /objects/{id}, as maester sends them."""
        out = {
            "content-type": self.content_type,
            "content-length": str(self.size),
            "etag": f'"{self.md5}"',
            "x-eio-created-at": str(int(self.created_at * 1000)),
        }
        if self.ttl is not None:
            out["x-eio-ttl"] = str(self.ttl)
        out.update({f"x-meta-{k}": v for k, v in self.metadata.items()})
        out.update({f"x-query-{k}": v for k, v in self.queriable.items()})
        return out

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> ObjectInfo:
        return cls(**data)  # type: ignore[arg-type]


class ObjectStore(Protocol):
    """Where objects live. Blocking calls: the API runs them in a worker thread."""

    def scratch(self) -> Path:
        """A folder for uploads in progress (a file there is handed to `put` when whole)."""

    def put(self, info: ObjectInfo, upload: Path) -> None:
        """Make the finished upload at `upload` object `info.id` (replacing it), with `info`."""

    def get(self, object_id: str) -> tuple[ObjectInfo, BinaryIO] | None:
        """The object's description and its bytes opened for reading; None: no such object."""

    def stat(self, object_id: str) -> ObjectInfo | None: ...

    def delete(self, object_id: str) -> bool:
        """Remove the object; False when there was none."""

    def list(self) -> Iterator[ObjectInfo]:
        """Every object (in no particular order)."""

    def sweep(self, older_than: float) -> int:
        """Remove what a crash left half-written, untouched since `older_than` (epoch
        seconds); how many pieces went (a store with nothing to sweep returns 0)."""


class FileStore:
    """Objects as files under one folder (the embedded default: `state_dir/objects`)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def _data(self, object_id: str) -> Path:
        if not OBJECT_ID.match(object_id):  # never a path from outside
            raise ValueError(f"{object_id!r} is not an object id")
        return self.root / object_id[:2] / object_id

    def _info(self, object_id: str) -> Path:
        return self._data(object_id).with_suffix(".json")

    def scratch(self) -> Path:
        path = self.root / ".uploads"
        path.mkdir(parents=True, exist_ok=True)
        return path

    def put(self, info: ObjectInfo, upload: Path) -> None:
        data = self._data(info.id)
        data.parent.mkdir(parents=True, exist_ok=True)
        meta = data.parent / f".{info.id}.{secrets.token_hex(4)}.json"
        meta.write_text(json.dumps(asdict(info)))
        os.replace(upload, data)
        os.replace(meta, self._info(info.id))

    def stat(self, object_id: str) -> ObjectInfo | None:
        path = self._info(object_id)
        try:
            return ObjectInfo.from_dict(json.loads(path.read_text()))
        except (FileNotFoundError, ValueError, TypeError):
            return None

    def get(self, object_id: str) -> tuple[ObjectInfo, BinaryIO] | None:
        info = self.stat(object_id)
        if info is None:
            return None
        try:
            return info, self._data(object_id).open("rb")
        except FileNotFoundError:
            return None

    def delete(self, object_id: str) -> bool:
        found = False
        for path in (self._info(object_id), self._data(object_id)):  # description first
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                found = True
        return found

    def list(self) -> Iterator[ObjectInfo]:
        if not self.root.is_dir():
            return
        for meta in self.root.glob("??/*.json"):
            if not OBJECT_ID.match(meta.stem):  # a description being written (".…json")
                continue
            info = self.stat(meta.stem)
            if info is not None:
                yield info

    def sweep(self, older_than: float) -> int:
        """Remove what a crash left: uploads in progress and bytes without a description,
        untouched since `older_than` (epoch seconds); how many files went."""
        gone = 0
        if not self.root.is_dir():
            return 0
        candidates = [*self.root.glob(".uploads/*"), *self.root.glob("??/.*.json")]
        candidates += [p for p in self.root.glob("??/*") if p.suffix != ".json"]
        for path in candidates:
            try:
                described = path.with_suffix(".json").exists()
                if path.suffix != ".json" and path.parent.name != ".uploads" and described:
                    continue
                if path.stat().st_mtime < older_than:
                    path.unlink()
                    gone += 1
            except OSError:
                continue
        return gone


def new_info(
    object_id: str,
    flow: str,
    size: int,
    content_type: str,
    md5: str,
    metadata: dict[str, str],
    queriable: dict[str, str],
    ttl: int | None,
    previous: ObjectInfo | None = None,
) -> ObjectInfo:
    """The description of an object just written (`previous`: the one it replaces, whose
    creation time, metadata and query fields it keeps where not given anew)."""
    now = time.time()
    if previous is None:
        return ObjectInfo(
            object_id, flow, size, content_type, md5, now, now, metadata, queriable, ttl
        )
    return replace(
        previous,
        size=size,
        content_type=content_type,
        md5=md5,
        updated_at=now,
        metadata={**previous.metadata, **metadata},
        queriable={**previous.queriable, **queriable},
        ttl=ttl if ttl is not None else previous.ttl,
    )


def referenced(texts: list[str]) -> set[str]:
    """The object ids attachments (JSON texts) name by their urls."""
    out: set[str] = set()
    for text in texts:
        out.update(OBJECT_URL.findall(text))
    return out
