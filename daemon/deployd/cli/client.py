"""The CLI's one client for the running daemon's HTTP API.

httpx is imported on the first request, not with this module: `deployd status` with the
daemon stopped never makes one, and must start fast.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

from ..auth import read_token
from ..config import Config
from ..errors import DaemonError

if TYPE_CHECKING:
    import httpx


def _httpx() -> Any:
    """httpx without its own command-line tool.

    `import httpx` also imports `httpx._main` (its CLI), which pulls in click, pygments and
    rich's console: ~130 ms of `deployd status` on an idle machine, more than the rest of
    httpx. httpx treats that module as optional (it catches the ImportError), and a None in
    sys.modules is Python's documented way to make an import fail.
    """
    if "httpx" not in sys.modules:
        sys.modules.setdefault("httpx._main", None)  # type: ignore[arg-type]
    import httpx

    return httpx


def base_url(config: Config) -> str:
    """The daemon's own address; a wildcard listen address is reached on loopback."""
    host, port = config.daemon.host, config.daemon.port
    if host in ("0.0.0.0", "::"):
        return f"http://127.0.0.1:{port}"
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _send(
    config: Config,
    method: str,
    path: str,
    *,
    json: Any = None,
    headers: dict[str, str] | None = None,
    timeout: float,
) -> httpx.Response:
    """One request to the daemon; DaemonError if it is down or does not answer."""
    httpx = _httpx()

    try:
        return httpx.request(
            method, base_url(config) + path, json=json, headers=headers, timeout=timeout
        )
    except httpx.ConnectError as exc:
        raise DaemonError(
            f"the daemon is not running (nothing listens on {config.daemon.listen}); "
            "start it with `deployd serve` or `systemctl start deployd`"
        ) from exc
    except httpx.HTTPError as exc:
        raise DaemonError(f"the daemon on {config.daemon.listen} did not answer: {exc}") from exc


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
