"""schemathesis against the daemon's own OpenAPI schema (`/openapi.json`): zero 5xx.

One real daemon for the module; every operation gets a few generated requests, with the
API token (so the handlers behind the token run, not only the 401) and without it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from tests.conftest import HTTP, Daemon, free_port

# A few examples per operation in the suite; DEPLOYD_FUZZ_EXAMPLES=500 for a long hunt.
EXAMPLES = int(os.environ.get("DEPLOYD_FUZZ_EXAMPLES", "6"))


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    root = tmp_path_factory.mktemp("schemathesis")
    (root / "home").mkdir()
    # webhook_wait 1s: a redeploy of a sha that never appears (a case below, and whatever the
    # fuzzer sends) waits that long for it and then builds the head; with the default 60 s
    # the waits were still running at the stop, which held it for its 5 s grace.
    d = Daemon(
        root=root,
        port=free_port(),
        components=[{"name": "hello"}],
        daemon_extra={"webhook_wait": "1s"},
    )
    d.env = {"HOME": str(root / "home")}
    d.start()
    yield d
    code = d.stop()
    assert code == 0, d.log()


@pytest.fixture(scope="module")
def api_schema(live: Daemon) -> Any:
    return schemathesis.openapi.from_url(live.url + "/openapi.json")


def _token(live: Daemon) -> str:
    return (live.state_dir / "api-token").read_text().strip()


# schemathesis' own pytest integration (`from_fixture`) needs pytest < 9; each operation's
# strategy is run through hypothesis directly instead, positive and negative cases alike.
def operations(api_schema: Any) -> list[Any]:
    return [result.ok() for result in api_schema.get_all_operations()]


def fuzz(op: Any, mode: Any, base_url: str, auth: dict[str, str]) -> set[int]:
    """Run `op`'s generated cases with and without the token; the status codes seen."""
    codes: set[int] = set()

    @given(case=op.as_strategy(generation_mode=mode))
    @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
    def check(case: Any) -> None:
        for headers in (auth, {}):
            response = case.call(base_url=base_url, headers=headers)
            assert response.status_code < 500, (
                f"{case.method} {case.formatted_path}: {response.status_code} {response.text[:300]}"
            )
            codes.add(response.status_code)

    check()
    return codes


@pytest.mark.parametrize("mode", list(schemathesis.GenerationMode), ids=lambda m: m.value)
def test_no_operation_answers_5xx(live: Daemon, api_schema: Any, mode: Any) -> None:
    auth = {"Authorization": f"Bearer {_token(live)}"}
    ops = operations(api_schema)
    if mode == schemathesis.GenerationMode.NEGATIVE:
        # Only a body can be made invalid: path names are any string, the rest take nothing.
        ops = [op for op in ops if op.body]
    seen = {op.label: fuzz(op, mode, live.url, auth) for op in ops}
    assert len(seen) >= (10 if mode == schemathesis.GenerationMode.POSITIVE else 4), seen
    assert all(seen.values()), seen


def test_the_schema_is_served_and_the_daemon_survived(live: Daemon, api_schema: Any) -> None:
    paths = set(api_schema.raw_schema["paths"])
    assert {"/healthz", "/api/v1/status", "/api/v1/flows/apply"} <= paths
    assert HTTP.get(live.url + "/healthz", timeout=5).status_code == 200
    assert "Traceback" not in live.log()
    assert Path(live.state_dir / "deployd.db").exists()


# (id, path, JSON body, status, words of the detail)
API_CASES: list[tuple[str, str, Any, int, str]] = [
    (
        "apply-deep-toml",
        "/api/v1/flows/apply",
        {"text": "a = " + "[" * 50_000 + "]" * 50_000},
        400,
        "nested too deeply",
    ),
    ("apply-nul", "/api/v1/flows/apply", {"text": 'name = "x\u0000"'}, 400, "not valid TOML"),
    (
        "apply-not-toml",
        "/api/v1/flows/apply",
        {"text": "[[steps"},
        400,
        "flow file is not valid TOML",
    ),
    ("apply-text-missing", "/api/v1/flows/apply", {"draft": True}, 422, "text"),
    ("apply-text-a-number", "/api/v1/flows/apply", {"text": 5}, 422, "text"),
    (
        "apply-unknown-component",
        "/api/v1/flows/apply",
        {
            "text": 'name = "f"\n[[steps]]\nid = "a"\ncomponent = "zz"\nfunction = "t"\n'
            '[[steps]]\nid = "b"\ncomponent = "zz"\nfunction = "t"\n',
        },
        400,
        "unknown component 'zz'",
    ),
    (
        "apply-config-nested-300",
        "/api/v1/flows/apply",
        {
            "text": 'name = "f"\n[[steps]]\nid = "a"\ncomponent = "hello"\nfunction = "t"\n'
            "config = " + "{a = " * 300 + "1" + "}" * 300 + "\n"
            '[[steps]]\nid = "b"\ncomponent = "hello"\nfunction = "u"\n'
        },
        400,
        "nested",
    ),
    ("publish-unknown", "/api/v1/flows/nope/publish", None, 404, "unknown flow 'nope'"),
    ("publish-force-a-word", "/api/v1/flows/nope/publish", {"force": "yes"}, 422, "force"),
    ("publish-unknown-key", "/api/v1/flows/nope/publish", {"versoin": "a@1"}, 422, "versoin"),
    ("publish-version-huge", "/api/v1/flows/nope/publish", {"version": "a" * 5000}, 422, "version"),
    ("rollback-to-a-word", "/api/v1/flows/nope/rollback", {"to": "one"}, 422, "to"),
    (
        "redeploy-bad-sha",
        "/api/v1/components/hello/redeploy",
        {"sha": "$(reboot)"},
        400,
        "is not a full commit sha",
    ),
    (
        "redeploy-unknown-sha",
        "/api/v1/components/hello/redeploy",
        {"sha": "0" * 39 + "1"},
        200,
        "build_queued",
    ),
    ("redeploy-unknown", "/api/v1/components/nope/redeploy", {}, 404, "unknown component 'nope'"),
    ("pause-huge-name", "/api/v1/pause", {"name": "a" * 100_000}, 400, "is neither a flow nor"),
    (
        "resume-unicode",
        "/api/v1/resume",
        {"name": "h\u00e9llo\u0000"},
        400,
        "is neither a flow nor",
    ),
]


@pytest.mark.parametrize(
    ("path", "body", "status", "words"), [c[1:] for c in API_CASES], ids=[c[0] for c in API_CASES]
)
def test_hostile_api_requests(live: Daemon, path: str, body: Any, status: int, words: str) -> None:
    auth = {"Authorization": f"Bearer {_token(live)}"}
    response = HTTP.post(live.url + path, json=body, headers=auth, timeout=10)
    assert response.status_code == status, response.text[:300]
    assert words in response.text, response.text[:300]


@pytest.mark.parametrize(
    "header",
    ["", "Bearer", "Basic abc", "Bearer wrong", "Bearer {token}x", "{token}"],
)
def test_mutating_routes_refuse_a_bad_token(live: Daemon, header: str) -> None:
    headers = {"Authorization": header.format(token=_token(live))} if header else {}
    response = HTTP.post(live.url + "/api/v1/gc", headers=headers, timeout=10)
    assert response.status_code == 401, response.text
    assert "API token" in response.json()["detail"]


def test_the_bearer_scheme_is_case_insensitive(live: Daemon) -> None:
    headers = {"Authorization": f"bearer {_token(live)}"}
    response = HTTP.post(live.url + "/api/v1/gc", headers=headers, timeout=30)
    assert response.status_code == 200, response.text
