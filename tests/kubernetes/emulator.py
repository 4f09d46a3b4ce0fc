"""A loopback Kubernetes API emulator: exactly the paths and shapes deployd's orchestrator uses
through lightkube, for Deployments, Secrets and Pods in namespaces — list (labelSelector),
get, server-side apply (PATCH application/apply-patch+yaml with fieldManager), merge patch,
delete, and watch from a resourceVersion (chunked JSON lines). The one fake of the project's
tests, at the Kubernetes API boundary.

It checks the requests as the API server documents them (content type and field manager of
an apply, the object's name and namespace matching the path, every applied object valid for
the pinned Kubernetes version with `kubernetes-validate --strict`: 422 otherwise), and tests
drive what a cluster would do: `set_status` (a Deployment's status: available, ReplicaFailure,
…), `set_pod`, `fail` (the next requests of a verb answer a Status error: Forbidden, quota).
PyPI's `kmock` has an emulator too; it needs aiohttp and brings a pytest-asyncio plugin into
the whole suite, so this one, on the standard library, is used.
"""

from __future__ import annotations

import copy
import itertools
import json
import socket
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from kubernetes_validate import utils as kv

K8S_VERSION = "1.33.0"
TOKEN = "emulator-token"  # the bearer token every request must carry (401 otherwise)
KINDS = {
    "deployments": ("apps/v1", "Deployment"),
    "secrets": ("v1", "Secret"),
    "pods": ("v1", "Pod"),
}


@dataclass
class Failure:
    method: str
    plural: str
    code: int
    reason: str
    message: str
    times: int


def _selector(text: str) -> dict[str, str]:
    out = {}
    for part in filter(None, text.split(",")):
        key, _, value = part.partition("=")
        out[key.strip()] = value.strip().lstrip("=")
    return out


def _matches(obj: dict[str, Any], selector: dict[str, str]) -> bool:
    meta = obj.get("metadata", {})
    labels = {**(meta.get("labels") or {}), "\0name": meta.get("name")}
    return all(labels.get(k) == v for k, v in selector.items())


class Emulator:
    """Start with `start()`; `url` is the API server; `requests` records (method, path)."""

    def __init__(self) -> None:
        self.objects: dict[tuple[str, str, str], dict[str, Any]] = {}  # (ns, plural, name)
        self.events: list[tuple[int, str, str, str, dict[str, Any]]] = []  # rv, type, ns, plural
        self.requests: list[tuple[str, str]] = []
        self.failures: list[Failure] = []
        self.auto_available = False  # a Deployment applied becomes available at once
        # Schema-check applied objects (tens of ms each in Python: the benchmark turns it off,
        # as a real API server's check costs next to nothing).
        self.validate = True
        self._rv = itertools.count(1)
        self.cond = threading.Condition()
        self.closing = False
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def start(self) -> Emulator:
        self.thread.start()
        return self

    def close(self) -> None:
        with self.cond:
            self.closing = True
            self.cond.notify_all()
        self.server.shutdown()
        self.server.server_close()

    # -- what tests drive ----------------------------------------------------------------

    def fail(
        self, method: str, plural: str, code: int, reason: str, message: str, times: int = 1000
    ) -> None:
        """The next `times` `method` requests on `plural` answer this Status error."""
        with self.cond:
            self.failures.append(Failure(method, plural, code, reason, message, times))

    def heal(self) -> None:
        with self.cond:
            self.failures.clear()

    def names(self, plural: str, ns: str = "deployd-flows") -> list[str]:
        with self.cond:
            return sorted(n for (o_ns, p, n) in self.objects if p == plural and o_ns == ns)

    def get(self, plural: str, name: str, ns: str = "deployd-flows") -> dict[str, Any] | None:
        with self.cond:
            obj = self.objects.get((ns, plural, name))
            return copy.deepcopy(obj) if obj else None

    def set_status(self, name: str, status: dict[str, Any], ns: str = "deployd-flows") -> None:
        with self.cond:
            obj = self.objects[(ns, "deployments", name)]
            obj["status"] = {"observedGeneration": obj["metadata"]["generation"], **status}
            self._changed("MODIFIED", ns, "deployments", obj)

    def make_available(self, name: str, ns: str = "deployd-flows") -> None:
        with self.cond:
            obj = self.objects[(ns, "deployments", name)]
            self._available(obj)
            self._changed("MODIFIED", ns, "deployments", obj)

    def set_pod(self, name: str, deployment: str, status: dict[str, Any]) -> None:
        """A pod of `deployment` (its template's labels) with `status`."""
        with self.cond:
            dep = self.objects[("deployd-flows", "deployments", deployment)]
            labels = dep["spec"]["template"]["metadata"]["labels"]
            pod = {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": name, "namespace": "deployd-flows", "labels": labels},
                "spec": {"containers": [{"name": "step", "image": "x"}]},
                "status": status,
            }
            kind = "MODIFIED" if ("deployd-flows", "pods", name) in self.objects else "ADDED"
            self._store("deployd-flows", "pods", pod)
            self._changed(kind, "deployd-flows", "pods", pod)

    def remove_pod(self, name: str) -> None:
        """Pod `name` is gone (its containers ended and the kubelet removed it)."""
        with self.cond:
            pod = self.objects.pop(("deployd-flows", "pods", name), None)
            if pod is not None:
                self._changed("DELETED", "deployd-flows", "pods", pod)

    # -- internals -----------------------------------------------------------------------

    def _available(self, obj: dict[str, Any]) -> None:
        replicas = obj["spec"].get("replicas", 1)
        obj["status"] = {
            "observedGeneration": obj["metadata"]["generation"],
            "replicas": replicas,
            "readyReplicas": replicas,
            "availableReplicas": replicas,
            "conditions": [
                {"type": "Available", "status": "True", "reason": "MinimumReplicasAvailable"}
            ],
        }

    def _store(self, ns: str, plural: str, obj: dict[str, Any]) -> None:
        meta = obj["metadata"]
        meta["resourceVersion"] = str(next(self._rv))
        meta.setdefault("uid", f"uid-{meta['resourceVersion']}")
        self.objects[(ns, plural, meta["name"])] = obj

    def _changed(self, kind: str, ns: str, plural: str, obj: dict[str, Any]) -> None:
        if kind != "ADDED" or "resourceVersion" not in obj["metadata"]:
            obj["metadata"]["resourceVersion"] = str(next(self._rv))
        rv = int(obj["metadata"]["resourceVersion"])
        self.events.append((rv, kind, ns, plural, copy.deepcopy(obj)))
        self.cond.notify_all()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        emu = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self) -> None:
                super().setup()
                # Headers and body are written apart: without this, Nagle's algorithm and a
                # delayed ACK hold every answer ~40 ms, as no API server does.
                self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _send(self, code: int, body: Any) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _status(self, code: int, reason: str, message: str) -> None:
                self._send(
                    code,
                    {
                        "kind": "Status",
                        "apiVersion": "v1",
                        "metadata": {},
                        "status": "Failure",
                        "message": message,
                        "reason": reason,
                        "code": code,
                    },
                )

            def _route(self) -> tuple[str, str, str | None, dict[str, list[str]]] | None:
                parts = urlsplit(self.path)
                seg = parts.path.strip("/").split("/")
                # /api/v1/namespaces/NS/PLURAL[/NAME] or /apis/apps/v1/namespaces/NS/PLURAL[/NAME]
                if seg[:2] == ["api", "v1"]:
                    rest = seg[2:]
                elif seg[:3] == ["apis", "apps", "v1"]:
                    rest = seg[3:]
                else:
                    return None
                if len(rest) < 3 or rest[0] != "namespaces" or rest[2] not in KINDS:
                    return None
                api = "v1" if seg[0] == "api" else "apps/v1"
                if KINDS[rest[2]][0] != api:
                    return None
                name = rest[3] if len(rest) > 3 else None
                return rest[1], rest[2], name, parse_qs(parts.query)

            def _body(self) -> Any:
                return json.loads(self.raw or b"null")

            def _failure(self, method: str, plural: str) -> bool:
                with emu.cond:
                    for f in emu.failures:
                        if f.method == method and f.plural == plural and f.times > 0:
                            f.times -= 1
                            self._status(f.code, f.reason, f.message)
                            return True
                return False

            def _handle(self, method: str) -> None:
                # Read first: an answer sent before the body was read would leave it on the
                # kept-alive connection.
                self.raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                route = self._route()
                emu.requests.append((method, self.path))
                if self.headers.get("Authorization") != f"Bearer {TOKEN}":
                    self._status(401, "Unauthorized", "Unauthorized")
                    return
                if route is None:
                    self._status(404, "NotFound", f"the server could not find {self.path}")
                    return
                ns, plural, name, query = route
                if self._failure(method, plural):
                    return
                getattr(self, f"_{method.lower()}")(ns, plural, name, query)

            def do_GET(self) -> None:
                self._handle("GET")

            def do_PATCH(self) -> None:
                self._handle("PATCH")

            def do_DELETE(self) -> None:
                self._handle("DELETE")

            def do_POST(self) -> None:
                self._handle("POST")

            def _get(self, ns: str, plural: str, name: str | None, query: Any) -> None:
                if name is not None:
                    obj = emu.get(plural, name, ns)
                    if obj is None:
                        self._status(404, "NotFound", f'{plural} "{name}" not found')
                    else:
                        self._send(200, obj)
                    return
                selector = _selector((query.get("labelSelector") or [""])[0])
                fields = _selector((query.get("fieldSelector") or [""])[0])
                if set(fields) - {"metadata.name"}:
                    self._status(400, "BadRequest", f"field selector {fields} not supported")
                    return
                if "metadata.name" in fields:
                    selector = {**selector, "\0name": fields["metadata.name"]}
                if (query.get("watch") or [""])[0] in ("true", "1"):
                    self._watch(ns, plural, selector, query)
                    return
                with emu.cond:
                    items = [
                        copy.deepcopy(o)
                        for (o_ns, p, _n), o in sorted(emu.objects.items())
                        if o_ns == ns and p == plural and _matches(o, selector)
                    ]
                    rv = str(next(emu._rv))
                api, kind = KINDS[plural]
                self._send(
                    200,
                    {
                        "apiVersion": api,
                        "kind": f"{kind}List",
                        "metadata": {"resourceVersion": rv},
                        "items": items,
                    },
                )

            def _watch(self, ns: str, plural: str, selector: dict[str, str], query: Any) -> None:
                since = int((query.get("resourceVersion") or ["0"])[0] or 0)
                timeout = float((query.get("timeoutSeconds") or ["300"])[0] or 300)
                deadline = time.monotonic() + timeout
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                sent = since
                try:
                    while True:
                        with emu.cond:
                            batch = [
                                e
                                for e in emu.events
                                if e[0] > sent and e[2] == ns and e[3] == plural
                            ]
                            if not batch:
                                left = deadline - time.monotonic()
                                if emu.closing or left <= 0:
                                    break
                                emu.cond.wait(min(left, 0.5))
                                continue
                        for rv, kind, _ns, _p, obj in batch:
                            sent = rv
                            if not _matches(obj, selector):
                                continue
                            line = json.dumps({"type": kind, "object": obj}).encode() + b"\n"
                            self.wfile.write(b"%x\r\n%s\r\n" % (len(line), line))
                            self.wfile.flush()
                    self.wfile.write(b"0\r\n\r\n")
                except OSError:
                    pass
                self.close_connection = True

            def _patch(self, ns: str, plural: str, name: str | None, query: Any) -> None:
                if name is None:
                    self._status(405, "MethodNotAllowed", "PATCH needs an object name")
                    return
                ctype = self.headers.get("Content-Type", "")
                body = self._body()
                if ctype.startswith("application/apply-patch"):
                    self._apply(ns, plural, name, query, body)
                    return
                if ctype not in (
                    "application/merge-patch+json",
                    "application/strategic-merge-patch+json",
                ):
                    self._status(415, "UnsupportedMediaType", f"content type {ctype}")
                    return
                with emu.cond:
                    obj = emu.objects.get((ns, plural, name))
                    if obj is None:
                        self._status(404, "NotFound", f'{plural} "{name}" not found')
                        return
                    spec_before = copy.deepcopy(obj.get("spec"))
                    _merge(obj, body)
                    if obj.get("spec") != spec_before:  # as the API server: a spec change only
                        obj["metadata"]["generation"] = obj["metadata"].get("generation", 1) + 1
                    if plural == "deployments" and emu.auto_available:
                        emu._available(obj)
                    emu._changed("MODIFIED", ns, plural, obj)
                    out = copy.deepcopy(obj)
                self._send(200, out)

            def _apply(self, ns: str, plural: str, name: str, query: Any, body: Any) -> None:
                if not (query.get("fieldManager") or [""])[0]:
                    self._status(400, "BadRequest", "fieldManager is required for apply patch")
                    return
                api, kind = KINDS[plural]
                meta = (body or {}).get("metadata") or {}
                if body.get("apiVersion") != api or body.get("kind") != kind:
                    self._status(400, "BadRequest", f"expected {api} {kind}")
                    return
                if meta.get("name") != name or meta.get("namespace", ns) != ns:
                    self._status(
                        400, "BadRequest", "the object's name/namespace differ from the path"
                    )
                    return
                try:
                    if emu.validate:
                        kv.validate(body, K8S_VERSION, strict=True)
                except kv.ValidationError as exc:
                    self._status(422, "Invalid", f"{kind} {name} is invalid: {exc.message}")
                    return
                with emu.cond:
                    old = emu.objects.get((ns, plural, name))
                    if (
                        old is not None
                        and old.get("immutable")
                        and old.get("data") != body.get("data")
                    ):
                        self._status(422, "Invalid", f"{kind} {name}: field is immutable")
                        return
                    obj = copy.deepcopy(body)
                    obj["metadata"].setdefault("namespace", ns)
                    generation = (old or {}).get("metadata", {}).get("generation", 0)
                    same = old is not None and old.get("spec") == obj.get("spec")
                    # The API server counts a generation per change of the spec: an apply of
                    # the same documents again leaves it (and so the availability) as it was.
                    obj["metadata"]["generation"] = generation if same else generation + 1
                    if old is not None and "status" in old:
                        obj["status"] = old["status"]
                    if plural == "deployments" and emu.auto_available:
                        emu._available(obj)
                    emu._store(ns, plural, obj)
                    emu._changed("MODIFIED" if old else "ADDED", ns, plural, obj)
                    out = copy.deepcopy(obj)
                self._send(200 if old else 201, out)

            def _delete(self, ns: str, plural: str, name: str | None, query: Any) -> None:
                with emu.cond:
                    obj = emu.objects.pop((ns, plural, name or ""), None)
                    if obj is None:
                        self._status(404, "NotFound", f'{plural} "{name}" not found')
                        return
                    emu._changed("DELETED", ns, plural, obj)
                self._send(200, {"kind": "Status", "apiVersion": "v1", "status": "Success"})

            def _post(self, ns: str, plural: str, name: str | None, query: Any) -> None:
                self._status(405, "MethodNotAllowed", "deployd applies (server-side)")

        return Handler


def _merge(target: dict[str, Any], patch: dict[str, Any]) -> None:
    for key, value in patch.items():
        if isinstance(value, dict) and isinstance(target.get(key), dict):
            _merge(target[key], value)
        elif value is None:
            target.pop(key, None)
        else:
            target[key] = value
