"""The dashboard in a real browser (headless Chromium): every page loads with no console
error (CSP violations included), a push appears on the open overview within a second
without a reload, the flow page shows its mapper steps, hostile text is shown as text, and
a logged-in person's button asks before it acts.

One daemon for the module (the default config: open, read-only on loopback): component
`hello` (the counter of tests/flows) pushed with a hostile commit message, and flow
`counter`: tick → write with a mapping (a mapper step). It also answers the HTTP checks of
loopback access, the event stream and the flow buttons.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.browser import severe
from tests.conftest import Daemon, Work, db_rows, make_component, wait_until
from tests.flows.conftest import counter_files, flow_toml
from tests.ui.sse import read_events

HOSTILE = 'add counter <script>alert("x")</script> & <img src=x onerror=alert(1)>'
TIMEOUT = 20  # a page that does not show what it should within this is broken


class Demo:
    def __init__(self, daemon: Daemon, work: Work, tmp: Path) -> None:
        self.daemon = daemon
        self.work = work
        self.tmp = tmp

    def url(self, path: str) -> str:
        return self.daemon.url + path


@pytest.fixture(scope="module")
def demo(module_daemon: Callable[..., Daemon], tmp_path_factory: pytest.TempPathFactory) -> Demo:
    d = module_daemon()
    tmp = tmp_path_factory.mktemp("work")
    work = make_component(tmp / "hello")
    work.commit(HOSTILE, counter_files())
    sha = work.push(d.hosted("hello"))
    d.wait_recent("hello", sha, timeout=60)
    steps = [
        {"id": "tick", "component": "hello", "function": "ticker", "interval": "1s"},
        {
            "id": "write",
            "component": "hello",
            "function": "write",
            "mapping": '{"text": $uppercase(text), "n": n}',
            "config": {"out": tmp / "out.jsonl"},
        },
    ]
    flow = tmp / "counter.toml"
    flow.write_text(flow_toml("counter", tmp / "out.jsonl", steps=steps))
    d.cli("flow", "apply", str(flow))
    return Demo(d, work, tmp)


def text(browser: Any, css: str) -> str | None:
    """The text of the first element matching `css`, read in one script run (the live page
    replaces its elements whenever something happens: a WebElement can go stale)."""
    return browser.execute_script(
        "var e = document.querySelector(arguments[0]); return e ? e.innerText : null;", css
    )


def click(browser: Any, css: str) -> None:
    """Click the element matching `css`, found again if the page replaced it meanwhile."""
    from selenium.common.exceptions import StaleElementReferenceException

    for _ in range(5):
        try:
            browser.find_element("css selector", css).click()
            return
        except StaleElementReferenceException:
            continue
    raise AssertionError(f"{css} kept going stale")


def open_page(browser: Any, url: str) -> None:
    """Load `url` and wait until its script is connected to the event stream."""
    browser.get(url)
    wait_live(browser)


def wait_live(browser: Any) -> None:
    """Wait until the page's script is connected to the event stream. Read in one script run
    (`text`): right after a form's submit the new page may have no such element yet, or the
    old one may just have gone (a stale element); both are "not yet"."""
    wait_until(lambda: text(browser, "#live-state") == "live", timeout=TIMEOUT)


PAGES = ["/ui", "/ui/components/hello", "/ui/flows/counter", "/ui/events", "/ui/builds/1"]


@pytest.mark.parametrize("path", PAGES)
def test_page_loads_with_no_console_errors(browser: Any, demo: Demo, path: str) -> None:
    severe(browser)  # what earlier tests left
    open_page(browser, demo.url(path))
    assert text(browser, "h1")
    assert severe(browser) == []


def test_login_page_loads_with_no_console_errors(browser: Any, demo: Demo) -> None:
    severe(browser)
    browser.get(demo.url("/ui/login"))
    assert browser.find_element("name", "token")
    assert severe(browser) == []


def test_a_csp_violation_is_a_console_error(browser: Any, demo: Demo) -> None:
    """What the tests above rely on: an inline script is refused and says so, SEVERE."""
    open_page(browser, demo.url("/ui"))
    severe(browser)
    browser.execute_script(
        "var s = document.createElement('script'); s.textContent = 'window.ran = 1';"
        " document.body.appendChild(s);"
    )
    errors = wait_until(lambda: severe(browser), timeout=TIMEOUT)
    assert any("Content Security Policy" in e["message"] for e in errors), errors
    assert browser.execute_script("return window.ran === undefined") is True


def test_hostile_commit_message_is_shown_as_text(browser: Any, demo: Demo) -> None:
    open_page(browser, demo.url("/ui"))
    assert text(browser, 'tr[data-component="hello"] td.subject') == HOSTILE
    assert browser.find_elements("css selector", "main script, main img") == []
    open_page(browser, demo.url("/ui/components/hello"))
    assert HOSTILE in (text(browser, "#versions") or "")
    assert browser.find_elements("css selector", "main script, main img") == []
    assert severe(browser) == []


def test_flow_page_shows_the_mapper_steps(browser: Any, demo: Demo) -> None:
    open_page(browser, demo.url("/ui/flows/counter"))
    steps = browser.execute_script(
        "return Array.from(document.querySelectorAll('#steps tbody tr')).map("
        "  r => [r.dataset.step, r.cells[1].innerText, r.cells[5].innerText.trim()]);"
    )
    assert [s[:2] for s in steps] == [
        ["tick", "trigger"],
        ["write:mapper", "mapper"],
        ["write", "action"],
    ]
    # The real steps run: the page shows them running once the publish is done.
    wait_until(
        lambda: text(browser, '#steps tr[data-step="write"] td:nth-child(6)') == "running",
        timeout=TIMEOUT,
    )
    assert "done" in (text(browser, "#deployments") or "")


def test_a_push_shows_up_on_the_open_overview_within_a_second(browser: Any, demo: Demo) -> None:
    open_page(browser, demo.url("/ui"))
    browser.execute_script("window.notReloaded = true")
    sha = demo.work.commit("second change, pushed while the page is open", counter_files("v2"))
    demo.work.push(demo.daemon.hosted("hello"))

    def registered() -> bool:
        rows = db_rows(
            demo.daemon.state_dir,
            "SELECT 1 FROM versions WHERE component = 'hello' AND sha = ?",
            sha,
        )
        return bool(rows)

    wait_until(registered, timeout=60, interval=0.01)
    seen = time.monotonic()

    def shown() -> bool:
        row = text(browser, 'tr[data-component="hello"]') or ""
        return sha[:12] in row and "second change" in row

    wait_until(shown, timeout=TIMEOUT, interval=0.01)
    elapsed = time.monotonic() - seen
    assert elapsed < 1.0, (
        f"the overview showed the new version {elapsed:.2f} s after it was registered"
    )
    assert browser.execute_script("return window.notReloaded === true") is True
    assert severe(browser) == []


def test_logged_in_buttons_ask_for_confirmation(browser: Any, demo: Demo) -> None:
    open_page(browser, demo.url("/ui/flows/counter"))
    assert browser.find_elements("css selector", "form[data-confirm]") == []  # read-only
    token = (demo.daemon.state_dir / "api-token").read_text().strip()
    browser.get(demo.url("/ui/login?next=/ui/flows/counter"))
    browser.find_element("name", "token").send_keys(token)
    browser.find_element("css selector", "form.login button").click()
    wait_until(lambda: browser.current_url.endswith("/ui/flows/counter"), timeout=TIMEOUT)
    wait_live(browser)
    click(browser, 'form[action="/ui/flows/counter/pause"] button')  # dismissed: nothing
    alert = browser.switch_to.alert
    assert "Pause flow counter" in alert.text
    alert.dismiss()
    assert "counter" not in demo.daemon.status()["paused"]["flow"]
    click(browser, 'form[action="/ui/flows/counter/pause"] button')
    browser.switch_to.alert.accept()
    wait_until(lambda: "counter" in demo.daemon.status()["paused"]["flow"], timeout=TIMEOUT)
    flash = wait_until(lambda: text(browser, ".flash"), timeout=TIMEOUT)
    assert "counter paused" in flash
    assert text(browser, 'form[action="/ui/flows/counter/resume"] button') == "resume"
    assert severe(browser) == []


def test_flow_buttons_call_the_deployer(demo: Demo) -> None:
    """Pause, publish the draft, roll back, retry and discard dead letters, resume — over
    HTTP with a login: the same operations as the API routes, their result or error shown."""
    import httpx

    def version() -> int:
        flow = next(f for f in demo.daemon.status()["flows"] if f["name"] == "counter")
        return int(flow["version"])

    def csrf_of(page: str) -> str:
        marker = 'name="csrf" value="'
        return page[page.index(marker) + len(marker) :].split('"', 1)[0]

    token = (demo.daemon.state_dir / "api-token").read_text().strip()
    with httpx.Client(base_url=demo.daemon.url, timeout=30) as c:
        r = c.post("/ui/login", data={"token": token, "next": "/ui/flows/counter"})
        assert r.status_code == 303
        csrf = csrf_of(c.get("/ui/flows/counter").text)
        c.post("/ui/flows/counter/pause", data={"csrf": csrf})  # (it may be paused already)
        assert "counter" in demo.daemon.status()["paused"]["flow"]
        first = version()
        # Paused, a new component version only gets a draft: the page offers to publish it.
        demo.work.commit("a version for a draft", counter_files("v3"))
        demo.work.push(demo.daemon.hosted("hello"))

        def page_with(action: str) -> str:
            text = c.get("/ui/flows/counter").text
            return text if f'action="/ui/flows/counter/{action}"' in text else ""

        wait_until(lambda: page_with("publish"), timeout=60, interval=0.1)
        r = c.post("/ui/flows/counter/publish", data={"csrf": csrf}, follow_redirects=True)
        assert f"counter v{first + 1}: done" in r.text
        assert version() == first + 1
        wait_until(lambda: page_with("rollback"), timeout=60, interval=0.1)
        r = c.post("/ui/flows/counter/rollback", data={"csrf": csrf}, follow_redirects=True)
        assert f"counter v{first + 2}: done" in r.text
        assert version() == first + 2
        r = c.post("/ui/flows/counter/retry", data={"csrf": csrf}, follow_redirects=True)
        assert "counter: 0 dead letter(s) put back" in r.text
        r = c.post(
            "/ui/flows/counter/discard", data={"csrf": csrf, "step": "nope"}, follow_redirects=True
        )
        assert "failed: " in r.text  # the deployer's own message, shown on the page
        assert c.post("/ui/flows/counter/nope", data={"csrf": csrf}).status_code == 404
        r = c.post("/ui/flows/counter/resume", data={"csrf": csrf}, follow_redirects=True)
        assert "counter resumed" in r.text
        assert "counter" not in demo.daemon.status()["paused"]["flow"]


def test_the_component_page_says_why_a_push_was_ignored(demo: Demo) -> None:
    import httpx

    demo.work.push(demo.daemon.hosted("hello"), "HEAD:refs/heads/feature")

    def ignored() -> str:
        page = httpx.get(demo.url("/ui/components/hello?fragment=1"), timeout=30).text
        table = page[page.index('id="ignored"') :]
        return table if "feature" in table else ""

    table = wait_until(ignored, timeout=60, interval=0.1)
    assert (
        "push to &#39;refs/heads/feature&#39; ignored: hello deploys branch &#39;main&#39;" in table
    )


# -- on loopback: open, read-only ----------------------------------------------------------


def test_loopback_reads_without_login_but_changes_nothing(demo: Demo) -> None:
    with httpx.Client(base_url=demo.daemon.url, timeout=10) as c:
        r = c.get("/")
        assert r.status_code == 307
        assert r.headers["location"] == "/ui"
        for path in ("/ui", "/ui/components/hello", "/ui/events", "/ui/events?kind=config"):
            r = c.get(path)
            assert r.status_code == 200, path
            assert "read-only (loopback)" in r.text
            assert 'name="csrf"' not in r.text  # no buttons
            csp = r.headers["content-security-policy"]
            assert "script-src 'self'" in csp
            assert "unsafe-inline" not in csp
            assert r.headers["x-frame-options"] == "DENY"
        assert c.get("/ui/flows/nope").status_code == 404
        assert c.get("/ui/components/nope").status_code == 404
        assert c.get("/ui/builds/999").status_code == 404
        assert (
            c.get("/ui/static/dashboard.js").headers["content-type"].startswith("text/javascript")
        )
        assert c.get("/ui/static/../app.py").status_code == 404
        assert c.post("/ui/components/hello/pause", data={}).status_code == 401
        # Behind a proxy on this machine every client would look local: not trusted.
        r = c.get("/ui", headers={"X-Forwarded-For": "192.0.2.7"})
        assert r.status_code == 303
        with c.stream("GET", "/api/v1/events/stream?after=0") as r:
            assert r.status_code == 200
            first = read_events(r, 1)
        assert first[0]["id"] == 1


def test_the_stream_wakes_on_a_new_event(demo: Demo) -> None:
    token = (demo.daemon.state_dir / "api-token").read_text().strip()
    auth = {"Authorization": f"Bearer {token}"}
    with httpx.Client(base_url=demo.daemon.url, timeout=10) as c:
        with c.stream("GET", "/api/v1/events/stream") as r:
            assert r.status_code == 200
            assert c.post("/api/v1/pause", json={"name": "hello"}, headers=auth).status_code == 200
            events = read_events(r, 1)
        assert c.post("/api/v1/resume", json={"name": "hello"}, headers=auth).status_code == 200
    assert events[0]["data"]["kind"] == "component.paused"
    assert events[0]["data"]["message"] == "component hello paused"
