"""POST /hooks/{component} against a real daemon, with file:// repositories as the hosting service.

Components here have `watch = false` and `poll_interval = "0"`: only the webhook can tell the
daemon about a push, so every build seen is caused (or not) by the request under test.
"""

from __future__ import annotations

import json
import select
import socket
from collections.abc import Callable
from typing import Any

from tests.conftest import HTTP, Daemon, Work, wait_until
from tests.sources import hooks
from tests.sources.conftest import builds_of, events
from tests.sources.hooks import ZERO

SECRET = "whsec-7f3a9c"
PROVIDERS = ["github", "gitea", "forgejo", "gitlab", "bitbucket", "generic"]


def webhook_component(work: Work, name: str, **extra: Any) -> dict[str, Any]:
    comp = {
        "name": name,
        "url": f"file://{work.remote}",
        "watch": False,
        "poll_interval": "0",
        "webhook_secret": SECRET,
    }
    comp.update(extra)
    return comp


def push_request(provider: str, sha: str, ref: str = "refs/heads/main", **kw: Any) -> hooks.Request:
    """A valid, signed push of `sha` to `ref` shaped like `provider`'s real requests."""
    branch = ref.rsplit("/", 1)[-1]
    if provider == "github":
        return hooks.github(SECRET, hooks.payload("github_push", REF=ref, AFTER=sha), **kw)
    if provider in ("gitea", "forgejo"):
        body = hooks.payload("gitea_push", REF=ref, AFTER=sha)
        return hooks.gitea(SECRET, body, forgejo=provider == "forgejo", **kw)
    if provider == "gitlab":
        kind = "tag_push" if ref.startswith("refs/tags/") else "push"
        body = hooks.payload("gitlab_push", KIND=kind, REF=ref, AFTER=sha, CHECKOUT=sha)
        return hooks.gitlab(SECRET, body, **kw)
    if provider == "bitbucket":
        kind = "tag" if ref.startswith("refs/tags/") else "branch"
        body = hooks.payload("bitbucket_push", BRANCH=branch, TYPE=kind, AFTER=sha)
        return hooks.bitbucket(SECRET, body, **kw)
    return hooks.generic(SECRET, ref, sha, **kw)


def start(
    daemon_factory: Callable[..., Daemon], remote: Callable[..., Work], names: list[str], **kw: Any
) -> tuple[Daemon, dict[str, Work]]:
    works = {n: remote(n) for n in names}
    comps = [webhook_component(works[n], n) for n in names]
    d = daemon_factory(components=comps, **kw).start()
    for n, w in works.items():  # the initial commit is built by the start-up reconcile
        d.wait_build(n, w.push())
    return d, works


def test_each_providers_push_is_built(
    daemon_factory: Callable[..., Daemon], remote: Callable[..., Work]
) -> None:
    d, works = start(daemon_factory, remote, PROVIDERS)
    shas = {}
    for provider, work in works.items():
        shas[provider] = work.commit_push(f"change for {provider}")
        resp = hooks.post(d.url, provider, push_request(provider, shas[provider]))
        assert resp.status_code == 202, resp.text
        body = resp.json()
        assert (body["status"], body["component"], body["sha"]) == (
            "queued",
            provider,
            shas[provider],
        )
        assert ("delivery" in body) == (provider != "generic")
    for provider, sha in shas.items():
        build = d.wait_build(provider, sha)
        assert build["status"] == "succeeded"
        kind = "gitea" if provider == "forgejo" else provider
        assert build["source"] == f"webhook:{kind}"


def test_bad_signatures_are_401_and_build_nothing(
    daemon_factory: Callable[..., Daemon], remote: Callable[..., Work]
) -> None:
    d, works = start(daemon_factory, remote, ["gh", "gl", "barrier"])
    sha = works["gh"].commit_push("unannounced")
    gl_sha = works["gl"].commit_push("unannounced")
    good_headers, body = push_request("github", sha)
    wrong = dict(good_headers, **{"X-Hub-Signature-256": "sha256=" + "0" * 64})
    missing = {k: v for k, v in good_headers.items() if not k.startswith("X-Hub-Signature")}
    other_secret = hooks.github(
        "not-the-secret", hooks.payload("github_push", REF="refs/heads/main", AFTER=sha)
    )
    for request in ((wrong, body), (missing, body), other_secret, (good_headers, body + b" ")):
        resp = hooks.post(d.url, "gh", request)
        assert resp.status_code == 401, resp.text
        assert "signature" in resp.json()["detail"]
    gl_body = hooks.payload(
        "gitlab_push", KIND="push", REF="refs/heads/main", AFTER=gl_sha, CHECKOUT=gl_sha
    )
    for token in ("whsec-7f3a9", SECRET + "x", "", None):
        resp = hooks.post(d.url, "gl", hooks.gitlab(token, gl_body))
        assert resp.status_code == 401, resp.text
    # A later, valid webhook to another component is handled: the refused ones left nothing.
    barrier = works["barrier"].commit_push("barrier")
    assert hooks.post(d.url, "barrier", push_request("github", barrier)).status_code == 202
    d.wait_build("barrier", barrier)
    assert builds_of(d, "gh", sha) == [] and builds_of(d, "gl", gl_sha) == []
    assert events(d, "push.received", sha) == [] and events(d, "push.received", gl_sha) == []
    assert SECRET not in d.log()


def test_valid_but_not_deployable_requests_answer_200_with_a_reason(
    daemon_factory: Callable[..., Daemon], remote: Callable[..., Work]
) -> None:
    d, works = start(daemon_factory, remote, ["hello"])
    work = works["hello"]
    head = work.push()

    def reason(request: hooks.Request) -> str:
        resp = hooks.post(d.url, "hello", request)
        assert resp.status_code == 200, resp.text
        assert resp.json()["component"] == "hello"
        return str(resp.json()["reason"])

    assert reason(hooks.github(SECRET, hooks.payload("github_ping"), event="ping")) == "ping"
    assert reason(hooks.bitbucket(SECRET, {}, event="diagnostics:ping")) == "ping"
    assert "'issues' ignored" in reason(hooks.github(SECRET, {"action": "opened"}, event="issues"))
    other = work.commit("on a feature branch")
    work.push(None, "HEAD:refs/heads/feature")
    for provider in PROVIDERS:
        assert "tag push" in reason(push_request(provider, other, "refs/tags/v1.0.0"))
        assert "refs/heads/feature ignored" in reason(
            push_request(provider, other, "refs/heads/feature")
        )
    deletion = hooks.payload("github_push", REF="refs/heads/main", AFTER=ZERO)
    deletion["deleted"] = True
    assert "deleted" in reason(hooks.github(SECRET, deletion))
    gl_del = hooks.payload(
        "gitlab_push", KIND="push", REF="refs/heads/main", AFTER=ZERO, CHECKOUT=ZERO
    )
    assert "deleted" in reason(hooks.gitlab(SECRET, gl_del))
    bb_del = hooks.payload("bitbucket_push", BRANCH="main", TYPE="branch", AFTER=head)
    bb_del["push"]["changes"][0]["new"] = None
    assert "deleted" in reason(hooks.bitbucket(SECRET, bb_del))
    assert "already built" in reason(push_request("github", head))
    # Duplicate delivery: the same delivery id twice is queued once.
    sha = work.commit_push("redelivered")
    first = hooks.post(d.url, "hello", push_request("github", sha, delivery_id="dup-1"))
    assert first.status_code == 202
    assert "duplicate delivery dup-1" in reason(push_request("github", sha, delivery_id="dup-1"))
    d.wait_build("hello", sha)
    assert len(builds_of(d, "hello", sha)) == 1
    assert builds_of(d, "hello", other) == []


def test_malformed_oversize_and_wrong_content_type(
    daemon_factory: Callable[..., Daemon], remote: Callable[..., Work]
) -> None:
    d, works = start(daemon_factory, remote, ["hello"], max_webhook_bytes=16384)

    def status(request: hooks.Request) -> tuple[int, str]:
        resp = hooks.post(d.url, "hello", request)
        return resp.status_code, resp.text

    assert status(hooks.github(SECRET, b"{nope"))[0] == 400
    assert status(hooks.github(SECRET, {"ref": "refs/heads/main"}))[0] == 400
    assert status(hooks.github(SECRET, {"ref": "refs/heads/main", "after": "HEAD~1"}))[0] == 400
    assert status(hooks.bitbucket(SECRET, {"push": {"changes": [{"new": {"name": 1}}]}}))[0] == 400
    big = hooks.payload("github_push", REF="refs/heads/main", AFTER="a" * 40)
    big["commits"] = big["commits"] * 40  # real pushes of many commits are large
    code, text = status(hooks.github(SECRET, big))
    assert code == 413 and "max_webhook_bytes" in text
    # No Content-Length (chunked upload): the bound holds while reading, too.
    headers, body = hooks.github(SECRET, big)
    resp = HTTP.post(f"{d.url}/hooks/hello", headers=headers, content=iter([body]), timeout=10)
    assert resp.status_code == 413
    headers, body = hooks.github(SECRET, {"ref": "refs/heads/main", "after": "a" * 40})
    code, text = status((dict(headers, **{"Content-Type": "text/plain"}), body))
    assert code == 415 and "application/json" in text
    headers, body = hooks.gitlab(SECRET, {})
    code, _ = status((dict(headers, **{"Content-Type": "application/x-www-form-urlencoded"}), body))
    assert code == 415
    # GitHub's form-encoded variant is a real push.
    sha = works["hello"].commit_push("sent as a form")
    resp = hooks.post(d.url, "hello", push_request("github", sha, form=True))
    assert resp.status_code == 202, resp.text
    d.wait_build("hello", sha)


def test_unknown_component_is_answered_like_a_protected_one(
    daemon_factory: Callable[..., Daemon], remote: Callable[..., Work]
) -> None:
    d, works = start(daemon_factory, remote, ["billing"])
    sha = works["billing"].push()
    unsigned = (
        {"Content-Type": "application/json"},
        json.dumps({"ref": "refs/heads/main", "after": sha}).encode(),
    )
    answers = [hooks.post(d.url, name, unsigned) for name in ("billing", "no-such-thing")]
    assert {a.status_code for a in answers} == {404}
    assert answers[0].content == answers[1].content
    assert answers[0].headers["content-type"] == answers[1].headers["content-type"]
    wrong = hooks.github("guess", hooks.payload("github_push", REF="refs/heads/main", AFTER=sha))
    answers = [hooks.post(d.url, name, wrong) for name in ("billing", "no-such-thing")]
    assert {a.status_code for a in answers} == {401}
    assert answers[0].content == answers[1].content


def test_commit_not_yet_visible_is_built_once_pushed(
    daemon_factory: Callable[..., Daemon], remote: Callable[..., Work]
) -> None:
    d, works = start(daemon_factory, remote, ["hello"], webhook_wait="30s")
    work = works["hello"]
    sha = work.commit("pushed after its webhook")
    resp = hooks.post(d.url, "hello", push_request("gitea", sha))
    assert resp.status_code == 202
    wait_until(lambda: events(d, "push.waiting", sha), timeout=30)
    assert builds_of(d, "hello", sha) == []
    work.push()
    build = d.wait_build("hello", sha)
    assert build["status"] == "succeeded"


class Listener:
    """A loopback TCP port that records whether anything ever connected to it."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.sock.setblocking(False)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/acme/billing.git"

    def connected(self) -> bool:
        ready, _, _ = select.select([self.sock], [], [], 0)
        return bool(ready)

    def close(self) -> None:
        self.sock.close()


def test_a_url_in_the_payload_is_never_fetched(
    daemon_factory: Callable[..., Daemon], remote: Callable[..., Work], tmp_path: Any
) -> None:
    d, works = start(daemon_factory, remote, ["hello"], webhook_wait="1s")
    head = works["hello"].push()
    # The pushed sha exists only in another repository, which the payload points at.
    evil = remote("evil", base=tmp_path / "elsewhere")
    evil_sha = evil.commit_push("not ours")
    listener = Listener()
    try:
        for provider, clone_url in (("github", listener.url), ("gitlab", f"file://{evil.remote}")):
            body = (
                hooks.payload(
                    "github_push", REF="refs/heads/main", AFTER=evil_sha, CLONE_URL=clone_url
                )
                if provider == "github"
                else hooks.payload(
                    "gitlab_push",
                    KIND="push",
                    REF="refs/heads/main",
                    AFTER=evil_sha,
                    CHECKOUT=evil_sha,
                    CLONE_URL=clone_url,
                )
            )
            request = (
                hooks.github(SECRET, body) if provider == "github" else hooks.gitlab(SECRET, body)
            )
            assert hooks.post(d.url, "hello", request).status_code in (200, 202)
        # After webhook_wait the daemon gives up on the sha and builds the branch head.
        wait_until(lambda: events(d, "push.failed", evil_sha), timeout=30)
        assert not listener.connected()
    finally:
        listener.close()
    assert builds_of(d, "hello", evil_sha) == []
    assert d.recent_sha("hello") == head


def test_webhook_poll_and_local_notice_of_one_commit_build_once(
    daemon_factory: Callable[..., Daemon], remote: Callable[..., Work]
) -> None:
    work = remote("hello")
    comp = webhook_component(work, "hello", watch=True, poll_interval="1s")
    d = daemon_factory(components=[comp]).start()
    d.wait_build("hello", work.push())
    sha = work.commit_push("told three ways")  # the watcher sees the push ...
    assert hooks.post(d.url, "hello", push_request("bitbucket", sha)).status_code in (200, 202)
    d.cli("poll", "hello")  # ... and a poll, and a webhook
    d.wait_build("hello", sha)

    def polled_after_build() -> bool:
        poll = d.component_status("hello")["poll"]
        return bool(
            poll
            and poll["head"] == sha
            and poll["last_ok"] > d.build_rows("hello")[0]["finished_at"]
        )

    wait_until(polled_after_build, timeout=30)
    assert (
        hooks.post(d.url, "hello", push_request("github", sha))
        .json()["reason"]
        .endswith("already built")
    )
    assert len(builds_of(d, "hello", sha)) == 1


def test_webhook_answers_are_counted_in_metrics(daemon: Daemon) -> None:

    HTTP.post(
        daemon.url + "/hooks/nope",
        content=b"{}",
        headers={"Content-Type": "application/json"},
        timeout=10,
    )
    HTTP.post(
        daemon.url + "/hooks/hello",
        content=b"{}",
        headers={"X-GitHub-Event": "ping", "Content-Type": "application/json"},
        timeout=10,
    )
    text = HTTP.get(daemon.url + "/metrics", timeout=10).text
    assert 'deployd_webhook_requests_total{provider="generic",status="404"} 1.0' in text, [
        line for line in text.splitlines() if "webhook" in line
    ]
    assert 'deployd_webhook_requests_total{provider="github",status="200"} 1.0' in text
