"""Who may see and change what on the dashboard, over plain HTTP (httpx).

Away from loopback the dashboard asks for the API token. A test client is always on
loopback, so the daemon under test sets `daemon.ui_auth = "always"`, which makes it ask
everyone — the same code path as a remote client (`reads_without_login` decides, and is
tested directly below for the remote case, proxies included). What loopback clients get
(open, read-only) is tested on the default daemon of test_dashboard_browser.py.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import closing
from pathlib import Path

import httpx
import pytest

from deployd.api.ui.access import COOKIE, Sessions, reads_without_login
from tests.conftest import Daemon
from tests.ui.sse import read_events


@pytest.fixture(scope="module")
def locked(module_daemon: Callable[..., Daemon]) -> Daemon:
    """A daemon asking everyone for the token (as for a remote client)."""
    return module_daemon(ui_auth="always")


def token(d: Daemon) -> str:
    return (d.state_dir / "api-token").read_text().strip()


def client(d: Daemon) -> httpx.Client:
    return httpx.Client(base_url=d.url, timeout=10, follow_redirects=False)


def login(d: Daemon) -> httpx.Client:
    c = client(d)
    r = c.post("/ui/login", data={"token": token(d), "next": "/ui/components/hello"})
    assert r.status_code == 303, r.text
    return c


def csrf_of(html: str) -> str:
    marker = 'name="csrf" value="'
    start = html.index(marker) + len(marker)
    return html[start : html.index('"', start)]


# -- the decision, for clients that are not on loopback ------------------------------------


@pytest.mark.parametrize(
    ("client_host", "listen_loopback", "mode", "headers", "open_"),
    [
        ("127.0.0.1", True, "loopback", {}, True),
        ("::1", True, "loopback", {}, True),
        ("::ffff:127.0.0.1", True, "loopback", {}, True),
        ("192.0.2.7", True, "loopback", {}, False),  # not loopback
        ("10.0.0.1", False, "loopback", {}, False),
        ("127.0.0.1", False, "loopback", {}, False),  # the daemon listens beyond loopback
        ("127.0.0.1", True, "always", {}, False),
        ("127.0.0.1", True, "loopback", {"x-forwarded-for": "192.0.2.7"}, False),  # a proxy
        ("127.0.0.1", True, "loopback", {"forwarded": "for=192.0.2.7"}, False),
        ("127.0.0.1", True, "loopback", {"x-real-ip": "192.0.2.7"}, False),
        (None, True, "loopback", {}, False),
        ("localhost", True, "loopback", {}, False),  # an address, not a name, is trusted
    ],
)
def test_who_reads_without_login(
    client_host: str | None,
    listen_loopback: bool,
    mode: str,
    headers: dict[str, str],
    open_: bool,
) -> None:
    assert reads_without_login(client_host, listen_loopback, mode, headers) is open_


def test_sessions_are_signed_expire_and_end_with_the_token() -> None:
    now = [1_000_000.0]
    secret = ["s3cret-token"]
    sessions = Sessions(lambda: secret[0], ttl=60, clock=lambda: now[0])
    value = sessions.issue()
    assert "s3cret-token" not in value
    session = sessions.verify(value)
    assert session is not None
    csrf = sessions.csrf(session)
    assert sessions.check_csrf(session, csrf)
    assert not sessions.check_csrf(session, csrf[:-1] + ("A" if csrf[-1] != "A" else "B"))
    assert not sessions.check_csrf(session, "")
    assert not sessions.check_csrf(None, csrf)
    body, _, sig = value.rpartition(".")
    forged = body.replace("v1.", "v1.9", 1) + "." + sig  # a later expiry, same signature
    assert sessions.verify(forged) is None
    assert sessions.verify(value + "x") is None
    assert sessions.verify("") is None
    assert sessions.verify("a.b.c.d") is None
    now[0] += 61
    assert sessions.verify(value) is None  # expired
    now[0] -= 61
    secret[0] = "another-token"
    assert sessions.verify(value) is None  # a new token ends every session
    assert sessions.check_token("another-token")
    assert not sessions.check_token("s3cret-token")


# -- over HTTP, a daemon that asks everyone ------------------------------------------------


def test_pages_need_a_login(locked: Daemon) -> None:
    with client(locked) as c:
        r = c.get("/ui")
        assert r.status_code == 303
        assert r.headers["location"] == "/ui/login?next=/ui"
        r = c.get("/ui/flows/counter?fragment=1")
        assert r.status_code == 401
        r = c.get("/api/v1/events/stream")
        assert r.status_code == 401
        r = c.get("/ui/login")
        assert r.status_code == 200
        assert 'name="token"' in r.text
        assert r.headers["content-security-policy"].startswith("default-src 'none'")


def test_login_sets_a_signed_httponly_strict_cookie(locked: Daemon) -> None:
    with client(locked) as c:
        r = c.post("/ui/login", data={"token": "wrong", "next": "/ui"})
        assert r.status_code == 401
        assert "wrong API token" in r.text
        assert COOKIE not in r.cookies
        r = c.post("/ui/login", data={"token": token(locked), "next": "https://evil.example/"})
        assert r.status_code == 303
        assert r.headers["location"] == "/ui"  # never to another site
        cookie = r.headers["set-cookie"]
        assert cookie.startswith(f"{COOKIE}=")
        assert "HttpOnly" in cookie
        assert "SameSite=strict" in cookie or "SameSite=Strict" in cookie
        assert "Secure" not in cookie  # plain HTTP: a Secure cookie would never come back
        assert token(locked) not in cookie
        r = c.get("/ui")
        assert r.status_code == 200
        assert "logged in" in r.text


def test_a_forged_cookie_is_refused(locked: Daemon) -> None:
    with closing(login(locked)) as c:
        value = c.cookies[COOKIE]
        body, _, _sig = value.rpartition(".")
    with client(locked) as c:
        c.cookies.set(COOKIE, body + ".AAAA")
        assert c.get("/ui").status_code == 303
        c.cookies.set(COOKIE, token(locked))  # the raw token is not a session either
        assert c.get("/ui").status_code == 303


def test_actions_need_the_csrf_token(locked: Daemon) -> None:
    with closing(login(locked)) as c:
        page = c.get("/ui/components/hello")
        assert page.status_code == 200
        csrf = csrf_of(page.text)
        assert 'data-confirm="Pause hello?' in page.text
        r = c.post("/ui/components/hello/pause", data={})
        assert r.status_code == 403
        r = c.post("/ui/components/hello/pause", data={"csrf": csrf[:-2] + "zz"})
        assert r.status_code == 403
        assert "hello" not in locked.status()["paused"]["component"]
        r = c.post("/ui/components/hello/pause", data={"csrf": csrf})
        assert r.status_code == 303
        assert r.headers["location"] == "/ui/components/hello"
        assert "hello" in locked.status()["paused"]["component"]
        page = c.get("/ui/components/hello")
        assert "hello paused" in page.text  # what the action did, shown once
        r = c.post("/ui/components/hello/resume", data={"csrf": csrf_of(page.text)})
        assert r.status_code == 303
        assert "hello" not in locked.status()["paused"]["component"]
        # Logging out needs the CSRF token too; then the cookie is gone.
        assert c.post("/ui/logout", data={}).status_code == 403
        r = c.post("/ui/logout", data={"csrf": csrf})
        assert r.status_code == 303
        assert COOKIE not in c.cookies
    with client(locked) as anonymous:
        r = anonymous.post("/ui/components/hello/pause", data={"csrf": csrf})
        assert r.status_code == 401


def test_the_stream_takes_the_token_and_resumes_from_last_event_id(locked: Daemon) -> None:
    with closing(login(locked)) as c:
        csrf = csrf_of(c.get("/ui/components/hello").text)
        c.post("/ui/components/hello/pause", data={"csrf": csrf})
        c.post("/ui/components/hello/resume", data={"csrf": csrf})
    with client(locked) as c:
        headers = {"Authorization": f"Bearer {token(locked)}", "Last-Event-ID": "1"}
        with c.stream("GET", "/api/v1/events/stream", headers=headers) as r:
            assert r.status_code == 200
            assert r.headers["content-type"].startswith("text/event-stream")
            events = read_events(r, 2)
        assert [e["id"] for e in events] == [2, 3]
        assert all(set(e["data"]) >= {"id", "ts", "kind", "message"} for e in events)
        bad = {"Authorization": "Bearer nope"}
        assert c.get("/api/v1/events/stream", headers=bad).status_code == 401


def test_ui_auth_takes_only_its_two_values(tmp_path: Path) -> None:
    from deployd import config as cfgmod
    from deployd.errors import ConfigError

    path = tmp_path / "config.toml"
    path.write_text('[daemon]\nui_auth = "sometimes"\n')
    with pytest.raises(ConfigError) as info:
        cfgmod.load(path)
    assert any("daemon.ui_auth" in p and "'always'" in p for p in info.value.problems)
    path.write_text('[daemon]\nui_auth = "always"\n')
    assert cfgmod.load(path).daemon.ui_auth == "always"


def test_the_event_log_is_filtered(locked: Daemon) -> None:
    with closing(login(locked)) as c:
        csrf = csrf_of(c.get("/ui/components/hello").text)
        c.post("/ui/components/hello/pause", data={"csrf": csrf})
        c.post("/ui/components/hello/resume", data={"csrf": csrf})
        every = c.get("/ui/events").text
        assert "repo.created" in every
        assert "component hello paused" in every
        only = c.get("/ui/events?kind=component").text
        assert "component hello paused" in only
        assert "component hello resumed" in only
        assert "repo.created" not in only
        exact = c.get("/ui/events?kind=component.resumed&component=hello").text
        assert "component hello resumed" in exact
        assert "component hello paused" not in exact
        none = c.get("/ui/events?flow=nope").text
        assert "no events match" in none
