"""The object store on its own: `FileStore`, the per-flow tokens, retention of objects."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import pytest

from deployd.objects import FileStore, ObjectInfo, flow_token, new_info, token_flow
from deployd.retention import ObjectRefs, expire_objects

KEY = b"k" * 32
A = "aaaaaaaa-0000-4000-8000-000000000001"
B = "bbbbbbbb-0000-4000-8000-000000000002"


def _put(store: FileStore, oid: str, data: bytes, flow: str = "f", **kw: object) -> ObjectInfo:
    upload = store.scratch() / f"{oid}.part"
    upload.write_bytes(data)
    info = new_info(oid, flow, len(data), "text/plain", "md5", {}, {}, None)
    if kw:
        info = replace(info, **kw)  # type: ignore[arg-type]
    store.put(info, upload)
    assert not upload.exists()
    return info


def test_a_file_store_puts_gets_stats_lists_and_deletes(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "objects")
    assert store.stat(A) is None and store.get(A) is None and list(store.list()) == []
    info = _put(store, A, b"hello", metadata={"k": "v"}, queriable={"q": "1"})
    _put(store, B, b"other", flow="g")
    got = store.get(A)
    assert got is not None
    with got[1] as fh:
        assert fh.read() == b"hello"
    assert got[0] == info == store.stat(A)
    assert info.headers()["x-meta-k"] == "v" and info.headers()["x-query-q"] == "1"
    assert info.as_json()["objectId"] == A and info.as_json()["contentLength"] == 5
    assert sorted(i.id for i in store.list()) == [A, B]
    assert store.delete(A) is True and store.delete(A) is False
    assert store.stat(A) is None and [i.id for i in store.list()] == [B]


def test_a_file_store_takes_no_path_from_outside(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "objects")
    for bad in ("../../etc/passwd", "AAAAAAAA-0000-4000-8000-000000000001", ""):
        with pytest.raises(ValueError, match="not an object id"):
            store.stat(bad)
        with pytest.raises(ValueError, match="not an object id"):
            store.delete(bad)


def test_a_sweep_removes_what_a_crash_left_and_keeps_whole_objects(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "objects")
    _put(store, A, b"whole")
    (store.scratch() / "half-upload").write_bytes(b"x")
    orphan = tmp_path / "objects" / "bb" / B  # bytes without their description
    orphan.parent.mkdir(parents=True)
    orphan.write_bytes(b"y")
    assert store.sweep(time.time() - 3600) == 0  # too young
    assert store.sweep(time.time() + 1) == 2
    assert not orphan.exists() and store.stat(A) is not None
    assert list(store.scratch().iterdir()) == []


def test_a_flow_token_opens_its_own_flow_only() -> None:
    token = flow_token(KEY, "billing")
    assert token.count(".") == 2
    assert token_flow(KEY, f"Bearer {token}") == "billing"
    assert token_flow(KEY, f"bearer {token}") == "billing"
    assert token_flow(b"x" * 32, f"Bearer {token}") is None  # another key
    assert token_flow(KEY, token) is None  # no scheme
    assert token_flow(KEY, None) is None
    assert token_flow(KEY, "Bearer a.b.c") is None
    head, _body, sig = token.split(".")
    forged = flow_token(b"x" * 32, "other").split(".")[1]
    assert token_flow(KEY, f"Bearer {head}.{forged}.{sig}") is None


def test_retention_keeps_referenced_and_young_objects(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "objects")
    now = time.time()
    ids = [f"{i:08x}-0000-4000-8000-000000000000" for i in range(6)]
    old = now - 10_000
    _put(store, ids[0], b"queued", created_at=old, updated_at=old)
    _put(store, ids[1], b"seen long ago", created_at=old, updated_at=old)
    _put(store, ids[2], b"seen just now", created_at=old, updated_at=old)
    _put(store, ids[3], b"never attached, young")
    _put(store, ids[4], b"never attached, old", created_at=old, updated_at=old)
    _put(store, ids[5], b"ttl passed", ttl=1, created_at=now - 5, updated_at=now - 5)
    refs = ObjectRefs({ids[0]}, {ids[0]: old, ids[1]: old, ids[2]: now})
    removed, present = expire_objects(store, refs, keep_attachments=60, keep_objects=3600)
    assert sorted(i.id for i in removed) == [ids[1], ids[4], ids[5]]
    assert present == set(ids)
    assert sorted(i.id for i in store.list()) == [ids[0], ids[2], ids[3]]


def test_object_info_round_trips_through_its_json(tmp_path: Path) -> None:
    info = new_info(A, "f", 3, "a/b", "m", {"x": "1"}, {"q": "2"}, 30)
    again = new_info(A, "f", 4, "c/d", "n", {"y": "3"}, {}, None, previous=info)
    assert again.created_at == info.created_at and again.size == 4
    assert again.metadata == {"x": "1", "y": "3"} and again.queriable == {"q": "2"}
    assert again.ttl == 30 and not again.expired(time.time())


def test_a_jwt_signed_with_a_flows_token_opens_that_flow_only() -> None:
    """maester-client's `jwtPayloadOrToken` as a payload: signed HS256 with the token."""
    import base64
    import hashlib
    import hmac
    import json

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    def jwt(payload: dict[str, object], secret: str) -> str:
        head = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
        body = b64(json.dumps(payload).encode())
        mac = hmac.new(secret.encode(), f"{head}.{body}".encode(), hashlib.sha256).digest()
        return f"{head}.{body}.{b64(mac)}"

    token = flow_token(KEY, "billing")
    assert token_flow(KEY, "Bearer " + jwt({"flowId": "billing", "iat": 1}, token)) == "billing"
    # naming another flow than the one whose token signed it
    assert token_flow(KEY, "Bearer " + jwt({"flowId": "other", "iat": 1}, token)) is None
    # claiming to be deployd's own token, signed with a flow's token
    claim = {"flowId": "billing", "iss": "deployd", "scope": "object-storage"}
    assert token_flow(KEY, "Bearer " + jwt(claim, token)) is None
