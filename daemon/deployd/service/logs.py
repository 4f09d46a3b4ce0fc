"""Logging for `serve`: one line per record (key=value or JSON), secrets masked as ``***``."""

from __future__ import annotations

import contextlib
import json
import logging
import sys
from collections.abc import Iterable
from typing import Any

from ..config import Config
from ..paths import Paths

# Secret values (webhook secrets, the API token, secret_key, credential values) that must never
# reach a log line.
_redactions: list[str] = []


def set_redactions(values: Iterable[str | None]) -> None:
    """Replace the set of strings masked as ``***`` in every log line (longest first)."""
    found: set[str] = set()
    for value in values:
        if value and len(value) >= 4:
            found.add(value)
            found.add(json.dumps(value)[1:-1])  # as it appears inside a JSON-quoted msg
    _redactions[:] = sorted(found, key=len, reverse=True)


def config_secrets(config: Config) -> list[str]:
    """Every secret value `config` holds or points at (files read now; unreadable skipped)."""
    out: list[str | None] = []
    if config.daemon.api_token is not None:
        out.append(config.daemon.api_token.get_secret_value())
    with contextlib.suppress(OSError):
        out.append(Paths(config.state_dir).token_file.read_text().strip())
    for comp in config.components:
        with contextlib.suppress(OSError):
            out.append(comp.secret())
        if comp.report_token is not None:
            out.append(comp.report_token.get_secret_value())
    for target in config.notify:  # a webhook url is a secret: whoever has it can post
        out.append(target.url.get_secret_value())
        if target.secret is not None:
            out.append(target.secret.get_secret_value())
    if config.daemon.secret_key is not None:
        out.append(config.daemon.secret_key.get_secret_value())
    for cred in config.credentials:  # their longer strings: keys, tokens, passwords
        out.extend(s for s in _strings(cred.fields) if len(s) >= MIN_REDACTED)
    return [s for s in out if s]


MIN_REDACTED = 8  # shorter credential values ("eu", a port) would blank out ordinary words


def _strings(value: Any) -> list[str]:
    """The strings of a JSON-like value, at any depth."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return []


def _redact(line: str) -> str:
    for secret in _redactions:
        if secret in line:
            line = line.replace(secret, "***")
    return line


class _KeyValueFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        line = f"level={record.levelname.lower()} logger={record.name} msg={json.dumps(msg)}"
        if record.exc_info:
            line += " exc=" + json.dumps(self.formatException(record.exc_info))
        return _redact(line)


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {"level": record.levelname.lower(), "logger": record.name, "msg": record.getMessage()}
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return _redact(json.dumps(out))


def setup_logging(fmt: str, debug: bool = False) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JsonFormatter() if fmt == "json" else _KeyValueFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    for noisy in ("uvicorn.access", "apscheduler", "watchdog", "git"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
