"""Who may see the dashboard, and the login session that lets a person change things.

- `reads_without_login`: on loopback (the client on 127.0.0.1/::1, the daemon listening on
  loopback, no proxy header, `daemon.ui_auth = "loopback"`) the pages are open, read-only.
  Everyone else logs in with the API token first.
- `Sessions`: the login sets a cookie holding a signed session value (expiry and a random
  nonce, an HMAC-SHA256 under a key derived from the API token), never the token itself.
  Changing the token ends every session. Each form that changes something carries a CSRF
  token derived from the session's nonce. Every comparison is constant-time.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from ...digests import same_secret

COOKIE = "deployd_session"
SESSION_TTL = 12 * 3600  # seconds a login lasts
# A reverse proxy on this machine connects from loopback on behalf of anyone: a request that
# carries one of these headers is not taken for a local one.
PROXY_HEADERS = ("forwarded", "x-forwarded-for", "x-real-ip", "x-forwarded-host")


def is_loopback(host: str | None) -> bool:
    """Whether `host` (a client address) is a loopback address (IPv4-mapped ones included)."""
    if not host:
        return False
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    return bool(ip.is_loopback or (mapped is not None and mapped.is_loopback))


def reads_without_login(
    client_host: str | None,
    listen_is_loopback: bool,
    ui_auth: str,
    headers: Mapping[str, str],
) -> bool:
    """Whether a request may read the dashboard without logging in (see the module doc)."""
    if ui_auth != "loopback" or not listen_is_loopback:
        return False
    if any(h in headers for h in PROXY_HEADERS):
        return False
    return is_loopback(client_host)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


@dataclass(frozen=True)
class Session:
    """A valid login: its nonce (what the CSRF token derives from) and its expiry."""

    nonce: str
    expires: int


class Sessions:
    """Issue and check login cookies and CSRF tokens; keyed by the (current) API token."""

    def __init__(
        self,
        token: Callable[[], str],
        ttl: int = SESSION_TTL,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.token = token
        self.ttl = ttl
        self.clock = clock

    def _key(self) -> bytes:
        return hmac.new(self.token().encode(), b"deployd-ui-session-v1", hashlib.sha256).digest()

    def _sign(self, text: str) -> str:
        return _b64(hmac.new(self._key(), text.encode(), hashlib.sha256).digest())

    def check_token(self, given: str) -> bool:
        """Whether `given` is the API token (constant-time)."""
        return same_secret(given.strip(), self.token())

    def issue(self) -> str:
        """A new session cookie value: `v1.<expires>.<nonce>.<signature>`."""
        body = f"v1.{int(self.clock()) + self.ttl}.{secrets.token_urlsafe(18)}"
        return f"{body}.{self._sign(body)}"

    def verify(self, value: str | None) -> Session | None:
        """The session a cookie value stands for, or None (absent, forged, expired)."""
        if not value or len(value) > 200:
            return None
        body, _, sig = value.rpartition(".")
        parts = body.split(".")
        if len(parts) != 3 or parts[0] != "v1" or not parts[1].isdigit():
            return None
        if not hmac.compare_digest(sig.encode(), self._sign(body).encode()):
            return None
        expires = int(parts[1])
        if expires <= self.clock():
            return None
        return Session(nonce=parts[2], expires=expires)

    def csrf(self, session: Session) -> str:
        """The CSRF token of the forms shown to `session`."""
        return self._sign(f"csrf.{session.nonce}")

    def check_csrf(self, session: Session | None, given: str | None) -> bool:
        """Whether `given` is `session`'s CSRF token (constant-time)."""
        if session is None or not given:
            return False
        return hmac.compare_digest(given.encode(), self.csrf(session).encode())
