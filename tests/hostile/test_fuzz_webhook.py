"""Property-based fuzzing of the webhook providers, in-process (thousands of cheap examples).

The endpoint answers any exception a provider strategy did not expect with a vague 400
("malformed github payload"), which would hide a parser slip; here every provider's
`accepts`/`verify`/`parse` must either work or raise `WebhookError` with a 4xx status and a
message saying what is wrong. (The endpoint itself is fuzzed against a real daemon in
tests/sources/test_webhook_fuzz.py.)
"""

from __future__ import annotations

import json
import os
from typing import Any
from urllib.parse import urlencode

from hypothesis import given, settings
from hypothesis import strategies as st

from deployd.errors import WebhookError
from deployd.sources import providers

FUZZ = settings(max_examples=int(os.environ.get("DEPLOYD_FUZZ_EXAMPLES", "300")), deadline=None)

HEADER_NAMES = sorted(
    {h for p in providers.PROVIDERS for h in (*p.event_headers, *p.delivery_headers)}
    | {h for p in providers.PROVIDERS for h in p.signature_headers}
    | {"content-type"}
)
EVENTS = ["push", "ping", "Push Hook", "Tag Push Hook", "System Hook", "repo:push", "x", ""]
header_value = st.one_of(st.sampled_from(EVENTS), st.text(max_size=40))
headers = st.dictionaries(st.sampled_from(HEADER_NAMES), header_value, max_size=6)

json_value = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=10,
)
shaped = st.fixed_dictionaries(
    {},
    optional={
        "ref": json_value | st.sampled_from(["refs/heads/main", "refs/tags/v1"]),
        "after": json_value | st.sampled_from(["0" * 40, "a" * 40]),
        "deleted": json_value,
        "object_kind": st.sampled_from(["push", "tag_push", "note"]) | json_value,
        "push": json_value
        | st.fixed_dictionaries(
            {
                "changes": st.lists(
                    json_value
                    | st.fixed_dictionaries({}, optional={"new": json_value, "old": json_value}),
                    max_size=3,
                )
            }
        ),
    },
)
bodies = st.one_of(
    st.binary(max_size=200),
    shaped.map(lambda d: json.dumps(d).encode()),
    shaped.map(lambda d: urlencode({"payload": json.dumps(d)}).encode()),
)


def check(hdrs: dict[str, str], body: bytes) -> Any:
    provider = providers.detect(hdrs)
    _ok, form = provider.accepts(providers.media_type(hdrs))
    provider.signed(hdrs)
    assert provider.verify(hdrs, body, "secret") in (True, False)
    try:
        return provider.parse(hdrs, body, form)
    except WebhookError as exc:
        assert 400 <= exc.status < 500, exc.status
        assert str(exc) and "\n" not in str(exc), str(exc)
        return None


@FUZZ
@given(hdrs=headers, body=bodies)
def test_providers_raise_only_webhook_errors(hdrs: dict[str, str], body: bytes) -> None:
    hook = check(hdrs, body)
    if hook is not None:
        assert hook.kind in ("push", "ping", "other")
        for update in hook.updates:
            assert isinstance(update.ref, str)
            assert update.after is None or isinstance(update.after, str)


@FUZZ
@given(event=st.sampled_from(["github", "gitea", "gitlab", "bitbucket", "generic"]), body=bodies)
def test_each_provider_with_its_own_push_headers(event: str, body: bytes) -> None:
    hdrs = {
        "github": {"x-github-event": "push"},
        "gitea": {"x-gitea-event": "push"},
        "gitlab": {"x-gitlab-event": "Push Hook"},
        "bitbucket": {"x-event-key": "repo:push"},
        "generic": {},
    }[event]
    check({**hdrs, "content-type": "application/json"}, body)
