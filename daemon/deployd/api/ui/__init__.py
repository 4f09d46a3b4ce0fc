"""The live web dashboard: `GET /ui` (overview, component, flow, build log and event pages)
and the event stream `GET /api/v1/events/stream` its pages update from.

Server-rendered (Jinja2, autoescaped) with one small static script, every file served from
this package, under a strict Content-Security-Policy. Who may see what is `access.py`'s;
the buttons that change things call the same daemon operations as the API routes
(`api/flows.py`, `api/ops.py`), through the same `answer`.
"""

from __future__ import annotations

from .routes import UiParts, router
from .stream import EventHub

__all__ = ["EventHub", "UiParts", "router"]
