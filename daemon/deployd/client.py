"""The CLI's client for the running daemon's HTTP API (commands that change running things)."""

from __future__ import annotations

from typing import Any

import httpx

from .auth import read_token
from .config import Config
from .errors import DaemonError


def call(config: Config, method: str, path: str, json: Any = None, timeout: float = 120.0) -> Any:
    """Call the daemon; raise DaemonError with its message on failure, or if it is down."""
    host, port = config.daemon.host, config.daemon.port
    base = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
    if host in ("0.0.0.0", "::"):
        base = f"http://127.0.0.1:{port}"
    headers = {"Authorization": f"Bearer {read_token(config)}"}
    try:
        resp = httpx.request(method, base + path, json=json, headers=headers, timeout=timeout)
    except httpx.ConnectError as exc:
        raise DaemonError(
            f"the daemon is not running (nothing listens on {config.daemon.listen}); "
            "start it with `deployd serve` or `systemctl start deployd`"
        ) from exc
    except httpx.HTTPError as exc:
        raise DaemonError(f"the daemon on {config.daemon.listen} did not answer: {exc}") from exc
    try:
        body = resp.json()
    except ValueError:
        body = {"detail": resp.text}
    if resp.status_code >= 400:
        detail = body.get("detail") if isinstance(body, dict) else body
        raise DaemonError(f"{detail}" if detail else f"daemon answered {resp.status_code}")
    return body
