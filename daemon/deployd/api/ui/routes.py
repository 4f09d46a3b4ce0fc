"""The dashboard's routes: pages (each also as a fragment, `?fragment=1`, which the page's
script fetches again when the event stream says something happened), login, the actions,
the static files and the event stream."""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from importlib import resources
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, quote

from fastapi import APIRouter, HTTPException, Request, Response
from fastapi.responses import HTMLResponse, RedirectResponse

from ..auth import answer
from . import data
from .access import COOKIE, Session, Sessions, reads_without_login
from .stream import EventHub, resume_from
from .stream import response as stream_response
from .views import render

if TYPE_CHECKING:
    from ...config import Config
    from ...flows.deployer import Deployer
    from ...ops import Operator
    from ...paths import Paths
    from ...store import Store

# No inline script or style anywhere; every file from this daemon; no framing.
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
STATIC = {
    "dashboard.js": "text/javascript; charset=utf-8",
    "dashboard.css": "text/css; charset=utf-8",
    "favicon.svg": "image/svg+xml",
}
MAX_FORM_BYTES = 16 * 1024
FLOW_ACTIONS = ("pause", "resume", "publish", "rollback", "retry", "discard")
COMPONENT_ACTIONS = ("pause", "resume")


@dataclass(frozen=True)
class UiParts:
    """What the dashboard needs of the daemon (values that change at runtime are getters)."""

    config: Callable[[], Config]
    token: Callable[[], str]
    accepting: Callable[[], bool]
    store: Store
    paths: Paths
    deployer: Deployer
    operator: Operator
    hub: EventHub


@dataclass(frozen=True)
class Viewer:
    """Who asks: logged in (`session`), or reading without a login on loopback (`open`)."""

    session: Session | None
    open: bool
    csrf: str | None

    @property
    def allowed(self) -> bool:
        return self.open or self.session is not None


def _secure(response: Response) -> Response:
    for key, value in SECURITY_HEADERS.items():
        response.headers.setdefault(key, value)
    return response


def _safe_next(value: str | None) -> str:
    """Where a login goes back to: a dashboard path only (never another site)."""
    if value and value.startswith("/ui") and "//" not in value and "\\" not in value:
        return value
    return "/ui"


def router(parts: UiParts) -> APIRouter:
    """Every route of the dashboard and the event stream."""
    api = APIRouter(include_in_schema=False)
    sessions = Sessions(parts.token)
    flashes: collections.OrderedDict[str, str] = collections.OrderedDict()

    def viewer(request: Request) -> Viewer:
        cfg = parts.config()
        client = request.client.host if request.client else None
        open_ = reads_without_login(
            client, cfg.daemon.listen_is_loopback, cfg.daemon.ui_auth, request.headers
        )
        session = sessions.verify(request.cookies.get(COOKIE))
        return Viewer(session, open_, sessions.csrf(session) if session else None)

    def flash(who: Viewer, message: str | None = None) -> str | None:
        """Set (with `message`) or take the message an action left for the next page."""
        if who.session is None:
            return None
        if message is not None:
            flashes[who.session.nonce] = message
            while len(flashes) > 256:
                flashes.popitem(last=False)
            return None
        return flashes.pop(who.session.nonce, None)

    async def page(
        request: Request,
        template: str,
        build: Callable[[], dict[str, Any]],
        enrich: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
        title: str = "",
    ) -> Response:
        who = viewer(request)
        fragment = request.query_params.get("fragment") == "1"
        if not who.allowed:
            if fragment:
                return _secure(Response("log in first", status_code=401))
            target = quote(
                request.url.path + (f"?{request.url.query}" if request.url.query else "")
            )
            return _secure(RedirectResponse(f"/ui/login?next={target}", status_code=303))
        try:
            last_id = parts.hub.last_id()
            ctx = build()
        except data.NotFound as exc:
            return _secure(
                HTMLResponse(
                    render(
                        "notfound.html",
                        {
                            "message": str(exc),
                            "viewer": who,
                            "title": "not found",
                            "path": request.url.path,
                        },
                        fragment=fragment,
                    ),
                    status_code=404,
                )
            )
        if enrich is not None:
            ctx = await asyncio.to_thread(enrich, ctx)
        query = [(k, v) for k, v in request.query_params.multi_items() if k != "fragment"]
        query.append(("fragment", "1"))
        frag_url = request.url.path + "?" + "&".join(f"{quote(k)}={quote(v)}" for k, v in query)
        html = render(
            template,
            {
                **ctx,
                "viewer": who,
                "flash": None if fragment else flash(who),
                "title": title,
                "fragment_url": frag_url,
                "last_event_id": last_id,
                "path": request.url.path,
            },
            fragment=fragment,
        )
        return _secure(HTMLResponse(html))

    # -- pages -----------------------------------------------------------------------------

    @api.get("/")
    async def root() -> Response:
        return RedirectResponse("/ui", status_code=307)

    @api.get("/ui")
    async def overview(request: Request) -> Response:
        cfg = parts.config()
        return await page(
            request,
            "overview.html",
            lambda: {"status": data.overview(cfg, parts.store, parts.paths, parts.deployer)},
            lambda ctx: {"status": data.enrich_overview(cfg, parts.paths, ctx["status"])},
            title="overview",
        )

    @api.get("/ui/components/{name}")
    async def component_page(request: Request, name: str) -> Response:
        cfg = parts.config()
        return await page(
            request,
            "component.html",
            lambda: data.component(cfg, parts.store, parts.paths, parts.deployer, name),
            lambda ctx: data.enrich_component(cfg, parts.paths, ctx),
            title=f"component {name}",
        )

    @api.get("/ui/builds/{build_id}")
    async def build_page(request: Request, build_id: int) -> Response:
        def full_log(ctx: dict[str, Any]) -> dict[str, Any]:
            ctx["build"]["log"], _ = data.read_log(ctx["build"].get("log_path"), None)
            return ctx

        return await page(
            request,
            "build.html",
            lambda: {"build": data.build(parts.store, build_id)},
            full_log,
            title=f"build {build_id}",
        )

    @api.get("/ui/flows/{name}")
    async def flow_page(request: Request, name: str) -> Response:
        cfg = parts.config()
        return await page(
            request,
            "flow.html",
            lambda: data.flow(cfg, parts.store, parts.paths, parts.deployer, name),
            title=f"flow {name}",
        )

    @api.get("/ui/events")
    async def events_page(
        request: Request,
        component: str | None = None,
        flow: str | None = None,
        kind: str | None = None,
        limit: int = 200,
    ) -> Response:
        cfg = parts.config()
        limit = max(1, min(limit, 2000))
        return await page(
            request,
            "events.html",
            lambda: data.events(cfg, parts.store, component, flow, kind, limit),
            title="events",
        )

    # -- login -----------------------------------------------------------------------------

    async def form(request: Request) -> dict[str, str]:
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_FORM_BYTES:
                raise HTTPException(status_code=413, detail="form too large")
        fields = parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True)
        return {k: v[0] for k, v in fields.items() if v}

    def login_page(who: Viewer, next_: str, error: str | None, status: int = 200) -> Response:
        html = render(
            "login.html",
            {"viewer": who, "next": next_, "error": error, "title": "log in", "path": "/ui/login"},
        )
        return _secure(HTMLResponse(html, status_code=status))

    @api.get("/ui/login")
    async def login_form(request: Request, next: str | None = None) -> Response:
        return login_page(viewer(request), _safe_next(next), None)

    @api.post("/ui/login")
    async def login(request: Request) -> Response:
        fields = await form(request)
        next_ = _safe_next(fields.get("next"))
        if not sessions.check_token(fields.get("token", "")):
            return login_page(viewer(request), next_, "wrong API token", status=401)
        response = RedirectResponse(next_, status_code=303)
        response.set_cookie(
            COOKIE,
            sessions.issue(),
            max_age=sessions.ttl,
            path="/",
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
        )
        return _secure(response)

    @api.post("/ui/logout")
    async def logout(request: Request) -> Response:
        fields = await form(request)
        who = viewer(request)
        if not sessions.check_csrf(who.session, fields.get("csrf")):
            return _secure(Response("missing or wrong CSRF token", status_code=403))
        response = RedirectResponse("/ui", status_code=303)
        response.delete_cookie(COOKIE, path="/", httponly=True, samesite="strict")
        return _secure(response)

    # -- actions ---------------------------------------------------------------------------

    async def act(
        request: Request, back: str, work: Callable[[dict[str, str]], Awaitable[Any]]
    ) -> Response:
        fields = await form(request)
        who = viewer(request)
        if who.session is None:
            return _secure(Response("log in first (POST /ui/login)", status_code=401))
        if not sessions.check_csrf(who.session, fields.get("csrf")):
            return _secure(Response("missing or wrong CSRF token", status_code=403))
        try:
            result = await answer(parts.accepting, work(fields))
            flash(who, describe(result))
        except HTTPException as exc:
            flash(who, f"failed: {exc.detail}")
        return _secure(RedirectResponse(back, status_code=303))

    @api.post("/ui/flows/{name}/{action}")
    async def flow_action(request: Request, name: str, action: str) -> Response:
        if action not in FLOW_ACTIONS:
            raise HTTPException(status_code=404, detail=f"no action {action!r}")
        d, op = parts.deployer, parts.operator

        def work(fields: dict[str, str]) -> Awaitable[Any]:
            step = fields.get("step") or None
            return {
                "pause": lambda: op.pause(name),
                "resume": lambda: op.resume(name),
                "publish": lambda: d.publish(name),
                "rollback": lambda: d.rollback(name, None),
                "retry": lambda: d.retry_errors(name, step, None),
                "discard": lambda: d.discard_errors(name, step, None),
            }[action]()

        return await act(request, f"/ui/flows/{quote(name)}", work)

    @api.post("/ui/components/{name}/{action}")
    async def component_action(request: Request, name: str, action: str) -> Response:
        if action not in COMPONENT_ACTIONS:
            raise HTTPException(status_code=404, detail=f"no action {action!r}")
        op = parts.operator

        def work(_fields: dict[str, str]) -> Awaitable[Any]:
            return op.pause(name) if action == "pause" else op.resume(name)

        return await act(request, f"/ui/components/{quote(name)}", work)

    # -- static files and the stream -------------------------------------------------------

    @api.get("/ui/static/{name}")
    async def static(name: str) -> Response:
        if name not in STATIC:
            raise HTTPException(status_code=404, detail="no such file")
        body = resources.files(__package__).joinpath("static", name).read_bytes()
        response = Response(body, media_type=STATIC[name])
        _secure(response)
        response.headers["Cache-Control"] = "no-cache"
        return response

    @api.get("/api/v1/events/stream")
    async def event_stream(request: Request, after: str | None = None) -> Response:
        """The event log as server-sent events (`text/event-stream`), each with its event id;
        `Last-Event-ID` (or `after=ID`) resumes after that id. Open on loopback; else the
        dashboard's login cookie or `Authorization: Bearer <API token>`."""
        who = viewer(request)
        bearer = request.headers.get("authorization", "")
        scheme, _, given = bearer.partition(" ")
        token_ok = scheme.lower() == "bearer" and sessions.check_token(given)
        if not (who.allowed or token_ok):
            return _secure(
                Response(
                    "missing or wrong API token (log in at /ui/login, or send"
                    " Authorization: Bearer <token>)",
                    status_code=401,
                    headers={"WWW-Authenticate": "Bearer"},
                )
            )
        start = resume_from(request.headers.get("last-event-id"), after)
        return stream_response(parts.hub, start, {"X-Content-Type-Options": "nosniff"})

    return api


def describe(result: Any) -> str:
    """One line saying what an action did (its result as the CLI would say it)."""
    if not isinstance(result, dict):
        return "done"
    if "paused" in result:
        return f"{result['name']} paused ({', '.join(result['paused'])})"
    if "resumed" in result:
        return f"{result['name']} resumed ({', '.join(result['resumed'])})"
    if "retried" in result:
        return f"{result['flow']}: {result['retried']} dead letter(s) put back"
    if "discarded" in result:
        return f"{result['flow']}: {result['discarded']} dead letter(s) discarded"
    line = f"{result.get('flow', '')} v{result.get('version')}: {result.get('status', 'done')}"
    if result.get("gap_ms") is not None:
        line += f" (gap {result['gap_ms']:.1f} ms)"
    if result.get("reason"):
        line += f": {result['reason']}"
    return line
