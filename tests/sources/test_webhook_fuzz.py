"""Fuzzing POST /hooks/{component} of a running daemon: never a 5xx, never a build.

Requests mix random bytes with near-valid ones: each provider's real headers and payload
shape naming a real, unbuilt commit on the deployed branch, signed with a wrong secret or
not at all. A signature bypass would therefore show up as a build.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import httpx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import Daemon, Work
from tests.sources import hooks
from tests.sources.conftest import builds_of, events

SECRET = "fuzz-secret-0a9b8c"
ALLOWED = {200, 202, 400, 401, 404, 413, 415}
HEADER_NAMES = [
    "X-GitHub-Event",
    "X-GitHub-Delivery",
    "X-Hub-Signature-256",
    "X-Hub-Signature",
    "X-Gitea-Event",
    "X-Gitea-Signature",
    "X-Forgejo-Event",
    "X-Forgejo-Signature",
    "X-Gitlab-Event",
    "X-Gitlab-Token",
    "X-Gitlab-Event-UUID",
    "Idempotency-Key",
    "X-Event-Key",
    "X-Request-UUID",
    "X-Deployd-Signature",
    "X-Deployd-Event",
    "Content-Type",
]
# Header values must be visible ASCII for the HTTP client; anything else is the body's job.
header_value = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=80)


def near_valid(sha: str) -> st.SearchStrategy[hooks.Request]:
    """Real provider requests for `sha` on main, signed with a wrong secret or unsigned."""
    ref = "refs/heads/main"
    secret = st.sampled_from([None, "", "wrong", SECRET[:-1], SECRET.upper()])
    return st.one_of(
        st.builds(
            lambda s, form: hooks.github(
                s, hooks.payload("github_push", REF=ref, AFTER=sha), form=form
            ),
            secret,
            st.booleans(),
        ),
        st.builds(
            lambda s, f: hooks.gitea(s, hooks.payload("gitea_push", REF=ref, AFTER=sha), forgejo=f),
            secret,
            st.booleans(),
        ),
        st.builds(
            lambda s: hooks.gitlab(
                s, hooks.payload("gitlab_push", KIND="push", REF=ref, AFTER=sha, CHECKOUT=sha)
            ),
            secret,
        ),
        st.builds(
            lambda s: hooks.bitbucket(
                s, hooks.payload("bitbucket_push", BRANCH="main", TYPE="branch", AFTER=sha)
            ),
            secret,
        ),
        st.builds(lambda s: hooks.generic(s, ref, sha), secret),
    )


def mutated(sha: str) -> st.SearchStrategy[hooks.Request]:
    """Near-valid requests with extra random headers or a random body swapped in."""
    bodies = st.one_of(
        st.binary(max_size=2048),
        st.just(json.dumps({"ref": "refs/heads/main", "after": sha}).encode()),
        st.recursive(
            st.none() | st.booleans() | st.integers() | st.text(max_size=20),
            lambda inner: (
                st.lists(inner, max_size=4)
                | st.dictionaries(st.text(max_size=10), inner, max_size=4)
            ),
            max_leaves=20,
        ).map(lambda v: json.dumps(v).encode()),
    )

    def mutate(req: hooks.Request, extra: dict[str, str], body: bytes | None) -> hooks.Request:
        headers, raw = req
        return {**headers, **extra}, raw if body is None else body

    return st.builds(
        mutate,
        near_valid(sha),
        st.dictionaries(st.sampled_from(HEADER_NAMES), header_value, max_size=4),
        st.none() | bodies,
    )


def test_fuzzed_requests_never_5xx_and_never_build(
    daemon_factory: Callable[..., Daemon], remote: Callable[..., Work]
) -> None:
    work = remote("hello")
    comp = {
        "name": "hello",
        "url": f"file://{work.remote}",
        "watch": False,
        "poll_interval": "0",
        "webhook_secret": SECRET,
    }
    d = daemon_factory(components=[comp], max_webhook_bytes=8192).start()
    d.wait_build("hello", work.push())
    sha = work.commit_push("must only ever be built by a correctly signed webhook")
    seen: dict[int, int] = {}

    with httpx.Client(base_url=d.url, timeout=10) as client:

        @settings(
            max_examples=150,
            deadline=None,
            database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        )
        @given(
            name=st.sampled_from(["hello", "nope", "h%20llo", "HELLO", "hello.git"]),
            request=st.one_of(near_valid(sha), mutated(sha)),
        )
        def check(name: str, request: hooks.Request) -> None:
            headers, body = request
            resp = client.post(f"/hooks/{name}", headers=headers, content=body)
            seen[resp.status_code] = seen.get(resp.status_code, 0) + 1
            assert resp.status_code in ALLOWED, (resp.status_code, resp.text)

        check()

    assert 202 not in seen, seen
    assert seen.get(401) and seen.get(404), seen
    assert builds_of(d, "hello", sha) == []
    assert events(d, "push.received", sha) == []
    # The daemon is still fine: a correctly signed push is built.
    resp = hooks.post(
        d.url,
        "hello",
        hooks.github(SECRET, hooks.payload("github_push", REF="refs/heads/main", AFTER=sha)),
    )
    assert resp.status_code == 202
    d.wait_build("hello", sha)
