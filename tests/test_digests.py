"""The one place credentials are compared: hashed first, constant-time, failing closed."""

from __future__ import annotations

import hmac
from typing import Any

import pytest

from deployd import auth, digests
from deployd.flows.intake import FlowIntake as Intake


@pytest.fixture
def compares(monkeypatch: pytest.MonkeyPatch) -> list[tuple[bytes, bytes]]:
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: Any, b: Any) -> bool:
        calls.append((a, b))
        return bool(real(a, b))

    monkeypatch.setattr(digests.hmac, "compare_digest", spy)
    return calls


def test_same_secret_compares_digests_of_equal_length(compares: list[Any]) -> None:
    assert digests.same_secret("s3cret", "s3cret")
    assert digests.same_secret(b"s3cret", "s3cret")
    for given in ("s3c", "s3cret-and-more", "S3CRET"):
        assert not digests.same_secret(given, "s3cret")
    assert all(len(a) == len(b) == 32 for a, b in compares)


@pytest.mark.parametrize(("given", "secret"), [("", "x"), (None, "x"), ("x", ""), ("", "")])
def test_an_unset_secret_or_nothing_given_never_matches(given: str | None, secret: str) -> None:
    assert not digests.same_secret(given, secret)


@pytest.mark.parametrize(
    ("header", "token"),
    [
        ("Bearer abc", "abc"),
        ("bearer  abc ", "abc"),
        ("Basic abc", None),
        ("Bearer", None),
        ("Bearer   ", None),
        (None, None),
    ],
)
def test_bearer(header: str | None, token: str | None) -> None:
    assert digests.bearer(header) == token


def test_signature_is_case_insensitive_hex_and_fails_closed() -> None:
    expected = "sha256=" + digests.hmac_sha256_hex("k", b"body")
    assert digests.same_signature(" " + expected.upper() + " ", expected)
    assert not digests.same_signature(expected[:-1], expected)
    assert not digests.same_signature(None, expected)
    assert not digests.same_signature("", "")


def test_the_api_token_and_an_http_flows_token_leak_no_length(compares: list[Any]) -> None:
    assert auth.check("t0ken", "Bearer t0ken")
    assert not auth.check("t0ken", "Bearer t0")
    assert not auth.check("t0ken", "Basic t0ken")
    assert not auth.check("", "Bearer ")
    verify = Intake._verify
    assert verify(b"t0ken", "token", {"authorization": "Bearer t0ken"}, b"")
    assert not verify(b"t0ken", "token", {"authorization": "Bearer t0ken-longer"}, b"")
    assert not verify(b"", "token", {"authorization": "Bearer "}, b"")
    assert compares and all(len(a) == len(b) == 32 for a, b in compares)


def test_an_http_flows_signature_needs_a_secret() -> None:
    body = b'{"a": 1}'
    good = {"x-deployd-signature": "sha256=" + digests.hmac_sha256_hex(b"k", body)}
    assert Intake._verify(b"k", "hmac", good, body)
    empty = {"x-deployd-signature": "sha256=" + digests.hmac_sha256_hex(b"", body)}
    assert not Intake._verify(b"", "hmac", empty, body)
