"""Provider strategies: detection from headers, verification, and parsing of real payload shapes."""

from __future__ import annotations

import hmac
import json
from typing import Any

import pytest

from deployd import digests
from deployd.errors import WebhookError
from deployd.sources import providers
from deployd.sources.providers import RefUpdate
from tests.sources import hooks
from tests.sources.hooks import ZERO

SECRET = "It's a Secret to Everybody"
SHA = "a2f4c1b7e9d3a2f4c1b7e9d3a2f4c1b7e9d3a2f4"


def lower(headers: dict[str, str]) -> dict[str, str]:
    return {k.lower(): v for k, v in headers.items()}


def parse(request: hooks.Request) -> tuple[str, Any]:
    headers, body = request
    h = lower(headers)
    provider = providers.detect(h)
    ok, form = provider.accepts(providers.media_type(h))
    assert ok
    assert provider.verify(h, body, SECRET)
    return provider.name, provider.parse(h, body, form)


def test_github_signature_matches_the_documented_example() -> None:
    # GitHub's documentation: secret "It's a Secret to Everybody", body "Hello, World!".
    body = b"Hello, World!"
    expected = "757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17"
    headers = {"x-github-event": "push", "x-hub-signature-256": f"sha256={expected}"}
    assert providers.detect(headers).verify(headers, body, SECRET)


@pytest.mark.parametrize(
    ("build", "name"),
    [
        (lambda b: hooks.github(SECRET, hooks.payload("github_push", **b)), "github"),
        (lambda b: hooks.github(SECRET, hooks.payload("github_push", **b), form=True), "github"),
        (lambda b: hooks.gitea(SECRET, hooks.payload("gitea_push", **b)), "gitea"),
        (lambda b: hooks.gitea(SECRET, hooks.payload("gitea_push", **b), forgejo=True), "gitea"),
        (
            lambda b: hooks.gitlab(
                SECRET, hooks.payload("gitlab_push", KIND="push", CHECKOUT=b["AFTER"], **b)
            ),
            "gitlab",
        ),
        (lambda b: hooks.generic(SECRET, b["REF"], b["AFTER"]), "generic"),
    ],
    ids=["github", "github-form", "gitea", "forgejo", "gitlab", "generic"],
)
def test_push_is_detected_verified_and_parsed(build: Any, name: str) -> None:
    provider, hook = parse(build({"REF": "refs/heads/main", "AFTER": SHA}))
    assert provider == name
    assert hook.kind == "push"
    assert hook.updates == (RefUpdate("refs/heads/main", SHA),)


def test_bitbucket_push_reads_push_changes_new_target_hash() -> None:
    body = hooks.payload("bitbucket_push", BRANCH="main", TYPE="branch", AFTER=SHA)
    provider, hook = parse(hooks.bitbucket(SECRET, body, delivery_id="req-1"))
    assert provider == "bitbucket"
    assert hook.delivery_id == "req-1"
    assert hook.updates == (RefUpdate("refs/heads/main", SHA),)


def test_bitbucket_deletion_and_tag_and_several_changes() -> None:
    body = hooks.payload("bitbucket_push", BRANCH="main", TYPE="branch", AFTER=SHA)
    change = body["push"]["changes"][0]
    tag = json.loads(json.dumps(change))
    tag["new"]["type"] = "tag"
    tag["new"]["name"] = "v1.2.0"
    deleted = json.loads(json.dumps(change))
    deleted["new"] = None
    deleted["closed"] = True
    deleted["old"]["name"] = "feature"
    body["push"]["changes"] = [tag, deleted, change]
    _, hook = parse(hooks.bitbucket(SECRET, body))
    assert hook.updates == (
        RefUpdate("refs/tags/v1.2.0", SHA),
        RefUpdate("refs/heads/feature", None, deleted=True),
        RefUpdate("refs/heads/main", SHA),
    )


def test_gitea_is_not_mistaken_for_github() -> None:
    # Gitea also sends X-GitHub-Event; its own headers win, and its bare-hex signature counts.
    headers, body = hooks.gitea(
        SECRET, hooks.payload("gitea_push", REF="refs/heads/main", AFTER=SHA)
    )
    h = lower(headers)
    del h["x-hub-signature-256"]
    provider = providers.detect(h)
    assert provider.name == "gitea"
    assert provider.verify(h, body, SECRET)


def test_gitlab_deletion_and_tag_push() -> None:
    body = hooks.payload(
        "gitlab_push", KIND="push", REF="refs/heads/main", AFTER=ZERO, CHECKOUT=ZERO
    )
    body["checkout_sha"] = None
    _, hook = parse(hooks.gitlab(SECRET, body))
    assert hook.updates == (RefUpdate("refs/heads/main", ZERO, deleted=True),)
    tag = hooks.payload("gitlab_push", KIND="tag_push", REF="refs/tags/v1", AFTER=SHA, CHECKOUT=SHA)
    _, hook = parse(hooks.gitlab(SECRET, tag, event="Tag Push Hook"))
    assert hook.updates[0].ref == "refs/tags/v1"


def test_github_ping_and_other_events() -> None:
    _, hook = parse(hooks.github(SECRET, hooks.payload("github_ping"), event="ping"))
    assert hook.kind == "ping"
    _, hook = parse(hooks.github(SECRET, {"action": "opened"}, event="issues"))
    assert (hook.kind, hook.event) == ("other", "issues")


def test_github_deleted_flag() -> None:
    body = hooks.payload("github_push", REF="refs/heads/main", AFTER=ZERO)
    body["deleted"] = True
    _, hook = parse(hooks.github(SECRET, body))
    assert hook.updates[0].deleted


@pytest.mark.parametrize(
    "request_",
    [
        hooks.github(SECRET, {"ref": "refs/heads/main", "after": SHA}),
        hooks.gitea(SECRET, {"ref": "refs/heads/main", "after": SHA}),
        hooks.bitbucket(SECRET, {"push": {"changes": []}}),
        hooks.generic(SECRET, "refs/heads/main", SHA),
    ],
    ids=["github", "gitea", "bitbucket", "generic"],
)
def test_wrong_or_missing_signature_fails(request_: hooks.Request) -> None:
    headers, body = request_
    h = lower(headers)
    provider = providers.detect(h)
    assert provider.signed(h)
    assert provider.verify(h, body, SECRET)
    assert not provider.verify(h, body + b" ", SECRET)
    assert not provider.verify(h, body, SECRET + "x")
    for name in provider.signature_headers:
        h.pop(name, None)
    assert not provider.signed(h)
    assert not provider.verify(h, body, SECRET)


def test_gitlab_token_is_compared_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: Any, b: Any) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(digests.hmac, "compare_digest", spy)
    headers, body = hooks.gitlab("tok3n", {"object_kind": "push"})
    h = lower(headers)
    gl = providers.detect(h)
    assert gl.verify(h, body, "tok3n")
    # A prefix, a longer value and a different value are all refused, each through one
    # compare_digest of equal-length digests (so neither content nor length leaks).
    for given in ("tok", "tok3n-and-more", "TOK3N"):
        h["x-gitlab-token"] = given
        assert not gl.verify(h, body, "tok3n")
    assert len(calls) == 4
    assert all(len(a) == len(b) == 32 for a, b in calls)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "JSON object"),
        (b"\xff\xfe", "not valid JSON"),
        (b"[" * 100_000 + b"]" * 100_000, "not valid JSON"),
        (json.dumps({"ref": "refs/heads/main"}).encode(), "'after'"),
        (json.dumps({"ref": 7, "after": SHA}).encode(), "'ref'"),
    ],
    ids=["syntax", "array", "bytes", "deep", "no-after", "ref-type"],
)
def test_malformed_bodies_are_400(body: bytes, message: str) -> None:
    h = lower(hooks.github(SECRET, body)[0])
    with pytest.raises(WebhookError) as err:
        providers.detect(h).parse(h, body, False)
    assert err.value.status == 400
    assert message in str(err.value)


def test_content_types() -> None:
    gh = providers.detect({"x-github-event": "push"})
    gl = providers.detect({"x-gitlab-event": "Push Hook"})
    assert gh.accepts("application/json") == (True, False)
    assert gh.accepts("application/x-www-form-urlencoded") == (True, True)
    assert gl.accepts("application/x-www-form-urlencoded") == (False, False)
    assert gh.accepts("text/plain") == (False, False)


def test_malformed_delivery_id_is_400() -> None:
    h = {"x-github-event": "push", "x-github-delivery": "a b\nc"}
    with pytest.raises(WebhookError) as err:
        providers.detect(h).delivery(h)
    assert err.value.status == 400
