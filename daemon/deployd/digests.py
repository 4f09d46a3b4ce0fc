"""Constant-time checks of what callers present: a signature, a bearer token, a shared secret.

Every credential deployd accepts is checked here, in one way:
- `same_secret(given, secret)` hashes both sides first (SHA-256) and compares the digests, so
  neither the secret's content nor its *length* shows in the time a wrong guess takes;
- `same_signature(given, expected)` compares a presented signature header (case-insensitive
  hex, surrounding blanks ignored) with the one computed over the raw body;
- `bearer(header)` splits `Authorization: Bearer <token>` (the scheme is case-insensitive,
  RFC 7235) without judging it.
An empty expected secret never matches anything: a credential that is not set fails closed.
"""

from __future__ import annotations

import hashlib
import hmac

Secret = str | bytes


def _bytes(value: Secret) -> bytes:
    return value.encode() if isinstance(value, str) else value


def hmac_sha256_hex(key: Secret, body: bytes) -> str:
    """The hex HMAC-SHA256 of `body` under `key`."""
    return hmac.new(_bytes(key), body, hashlib.sha256).hexdigest()


def same_secret(given: Secret | None, secret: Secret) -> bool:
    """Whether `given` is `secret`, in time independent of both (their lengths too)."""
    if not given or not secret:
        return False
    a = hashlib.sha256(_bytes(given)).digest()
    b = hashlib.sha256(_bytes(secret)).digest()
    return hmac.compare_digest(a, b)


def same_signature(given: str | None, expected: str) -> bool:
    """Whether a presented signature header matches the computed one (constant-time)."""
    if not given or not expected:
        return False
    return hmac.compare_digest(given.strip().lower().encode(), expected.lower().encode())


def bearer(header: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header, else None."""
    scheme, _, token = (header or "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()
