"""The Jinja2 environment of the dashboard: templates from this package, autoescape on for
every template (a name or commit message holding `<script>` is shown as text)."""

from __future__ import annotations

import functools
from typing import Any

from jinja2 import Environment, PackageLoader, StrictUndefined

from .data import age


def _ms(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f} ms"


def _when(ts: str | None) -> str:
    """An ISO timestamp as `2026-12-02 03:04:05 UTC`."""
    if not ts:
        return "-"
    text = ts[:19].replace("T", " ")
    return text + (" UTC" if ts.endswith(("+00:00", "Z")) else "")


def _short(sha: str | None) -> str:
    return (sha or "")[:12]


@functools.lru_cache(maxsize=1)
def environment() -> Environment:
    env = Environment(
        loader=PackageLoader("deployd.api.ui", "templates"),
        autoescape=True,  # every template, whatever its name
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(age=age, ms=_ms, when=_when, short=_short)
    return env


def render(template: str, context: dict[str, Any], fragment: bool = False) -> str:
    """A whole page (`base.html` around `template`), or only `template` (a fragment)."""
    env = environment()
    if fragment:
        return env.get_template(template).render(context)
    return env.get_template("base.html").render({**context, "content": template})
