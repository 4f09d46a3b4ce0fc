"""The API bearer token: from `daemon.api_token`, else generated once into state_dir (0600).

Mutating API calls require it; the CLI reads the same file (or config) to call the daemon.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from .config import Config
from .digests import bearer, same_secret
from .errors import DaemonError
from .paths import Paths


def ensure_token(config: Config) -> str:
    """The token to accept; generates `<state_dir>/api-token` at first start if none is set."""
    if config.daemon.api_token is not None:
        return config.daemon.api_token.get_secret_value()
    path = Paths(config.state_dir).token_file
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        pass
    token = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(token + "\n")
    return token


def read_token(config: Config) -> str:
    """The token the CLI sends (config first, then the generated file)."""
    if config.daemon.api_token is not None:
        return config.daemon.api_token.get_secret_value()
    path: Path = Paths(config.state_dir).token_file
    try:
        return path.read_text().strip()
    except FileNotFoundError as exc:
        raise DaemonError(
            f"no API token: {path} does not exist (start the daemon once, or set daemon.api_token)"
        ) from exc
    except PermissionError as exc:
        raise DaemonError(
            f"cannot read the API token {path}: permission denied (run as the deployd user)"
        ) from exc


def check(expected: str, header: str | None) -> bool:
    """Constant-time check of an `Authorization: Bearer <token>` header."""
    return same_secret(bearer(header), expected)
