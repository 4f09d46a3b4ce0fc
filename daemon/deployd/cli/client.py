"""The CLI's one client for the running daemon's HTTP API, on the standard library.

Every command that talks to the daemon goes through `_send`: the mutating ones (`call`, with
the bearer token) and `status` (`live_status`, without one). It is built on `http.client`
rather than httpx because `deployd status` asks the running daemon on every call and must
stay under 300 ms: importing httpx alone cost it ~100 ms (docs/benchmarks.md, issue 10).
"""

from __future__ import annotations

import http.client
import json as jsonlib
from dataclasses import dataclass
from typing import Any

from ..auth import read_token
from ..config import Config
from ..errors import DaemonError


@dataclass(frozen=True)
class Response:
    status_code: int
    text: str

    def json(self) -> Any:
        """The body as JSON; ValueError when it is not."""
        return jsonlib.loads(self.text)


def address(config: Config) -> tuple[str, int]:
    """The daemon's own address; a wildcard listen address is reached on loopback."""
    host, port = config.daemon.host, config.daemon.port
    return ("127.0.0.1" if host in ("0.0.0.0", "::") else host), port


def _send(
    config: Config,
    method: str,
    path: str,
    *,
    json: Any = None,
    headers: dict[str, str] | None = None,
    timeout: float,
) -> Response:
    """One request to the daemon; DaemonError if it is down or does not answer."""
    host, port = address(config)
    body = None if json is None else jsonlib.dumps(json).encode()
    head = {"Accept": "application/json", **(headers or {})}
    if body is not None:
        head["Content-Type"] = "application/json"
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        try:
            conn.connect()
        except TimeoutError as exc:
            raise DaemonError(
                f"the daemon on {config.daemon.listen} did not answer: {exc or 'timed out'}"
            ) from exc
        except OSError as exc:  # refused, unreachable: nothing listens there
            raise DaemonError(
                f"the daemon is not running (nothing listens on {config.daemon.listen}); "
                "start it with `deployd serve` or `systemctl start deployd`"
            ) from exc
        try:
            conn.request(method, path, body=body, headers=head)
            resp = conn.getresponse()
            text = resp.read().decode("utf-8", "replace")
        except (OSError, http.client.HTTPException) as exc:
            raise DaemonError(
                f"the daemon on {config.daemon.listen} did not answer: {exc or type(exc).__name__}"
            ) from exc
        return Response(resp.status, text)
    finally:
        conn.close()


def call(config: Config, method: str, path: str, json: Any = None, timeout: float = 120.0) -> Any:
    """Call the daemon; raise DaemonError with its message on failure, or if it is down."""
    headers = {"Authorization": f"Bearer {read_token(config)}"}
    resp = _send(config, method, path, json=json, headers=headers, timeout=timeout)
    try:
        body = resp.json()
    except ValueError:
        body = {"detail": resp.text}
    if resp.status_code >= 400:
        detail = body.get("detail") if isinstance(body, dict) else body
        raise DaemonError(f"{detail}" if detail else f"daemon answered {resp.status_code}")
    return body


def live_status(config: Config) -> dict[str, Any] | None:
    """The running daemon's own status (live step states and pids), or None if it is down.

    None too when it does not answer within 3 s or answers something that is not a status:
    the caller then builds the status from the state database, as with the daemon stopped.
    """
    from ..paths import Paths
    from ..status import daemon_state

    if not daemon_state(Paths(config.state_dir))[0]:
        return None
    try:
        # No token: the status endpoint is public, and an unreadable token file must not
        # hide the live status.
        resp = _send(config, "GET", "/api/v1/status", timeout=3)
    except DaemonError:
        return None
    if resp.status_code >= 400:
        return None
    try:
        data = resp.json()
    except ValueError:
        return None
    return data if isinstance(data, dict) else None
