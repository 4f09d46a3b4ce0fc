"""What an event row means to the outside: its public name, and the commit status it sets.

The public names (``[[notify]] events``, the json format's ``event``) and the internal event
kinds they come from:

==========================  ========================================================
public name                 deployd event (``deployd history``)
==========================  ========================================================
``build.started``           ``build.started``
``build.succeeded``         ``version.registered`` (the build registered a version)
``build.failed``            ``build.failed``
``push.ignored``            ``push.ignored``
``deploy.started``          ``deploy.started``
``deploy.done``             ``deploy.done`` (published; detail has the gap)
``deploy.failed``           ``deploy.failed`` (warm-up failed; the old version runs on)
``deploy.rolled_back``      ``deploy.rolled_back``
``flow.needs_attention``    ``draft.created`` with problems, ``deploy.rollback_failed``
``dead_letters.added``      ``dead_letters.added`` (one per step and group commit)
==========================  ========================================================
"""

from __future__ import annotations

import json
from typing import Any

from ..config import NOTIFY_EVENTS, Config
from ..store import Row

_DIRECT = {
    "build.started": "build.started",
    "version.registered": "build.succeeded",
    "build.failed": "build.failed",
    "push.ignored": "push.ignored",
    "deploy.started": "deploy.started",
    "deploy.done": "deploy.done",
    "deploy.failed": "deploy.failed",
    "deploy.rolled_back": "deploy.rolled_back",
    "deploy.rollback_failed": "flow.needs_attention",
    "dead_letters.added": "dead_letters.added",
}
assert set(_DIRECT.values()) <= set(NOTIFY_EVENTS)


def detail_of(row: Row) -> dict[str, Any]:
    """The row's detail, decoded ({} when it has none)."""
    raw = row.get("detail")
    if isinstance(raw, dict):
        return raw
    if not raw:
        return {}
    try:
        value = json.loads(raw)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def public_name(row: Row) -> str | None:
    """The public name of an event row, or None when it is not one that is told."""
    kind = row["kind"]
    if kind == "draft.created":
        return "flow.needs_attention" if detail_of(row).get("problems") else None
    return _DIRECT.get(kind)


def page_url(config: Config, row: Row) -> str | None:
    """The dashboard page of what `row` is about, when `daemon.public_url` is set."""
    base = config.daemon.public_url.rstrip("/")
    if not base:
        return None
    if row.get("flow"):
        return f"{base}/ui/flows/{row['flow']}"
    if row.get("component"):
        return f"{base}/ui/components/{row['component']}"
    return f"{base}/ui"


def commit_status(config: Config, row: Row) -> dict[str, Any] | None:
    """The commit status `row` sets (sha, context, state, description, target_url), or None:
    only for events that name a commit of a component whose `report` is set."""
    comp = config.component(row["component"]) if row.get("component") else None
    sha = row.get("sha")
    if comp is None or comp.report == "none" or not sha:
        return None
    kind, detail, flow = row["kind"], detail_of(row), row.get("flow")
    state: str | None = None
    context = "deployd/build"
    description = row["message"]
    if kind == "build.started":
        state, description = "pending", f"building {comp.name} {sha[:12]}"
    elif kind == "version.registered":
        version = detail.get("version")
        state, description = "success", f"built: {comp.name} v{version}"
    elif kind == "build.failed":
        state = "failure"
        description = f"build failed: {detail.get('error') or row['message']}"
    elif flow and kind in ("deploy.started", "deploy.done", "deploy.failed"):
        context = f"deployd/flow/{flow}"
        version = detail.get("version")
        if kind == "deploy.started":
            state, description = "pending", f"publishing {flow}"
        elif kind == "deploy.done":
            gap = detail.get("gap_ms")
            state = "success"
            description = f"{flow} v{version} published" + (
                f", gap {gap:.1f} ms" if isinstance(gap, int | float) else ""
            )
        else:
            state = "failure"
            description = f"{flow} v{version} failed: {detail.get('reason') or row['message']}"
    elif flow and kind in ("deploy.rolled_back", "deploy.rollback_failed"):
        context, state = f"deployd/flow/{flow}", "failure"
        description = f"{flow} rolled back: {detail.get('reason') or row['message']}"
        if kind == "deploy.rollback_failed":
            description = f"{flow} needs attention: {detail.get('reason') or row['message']}"
    elif flow and kind == "draft.created" and detail.get("problems"):
        context, state = f"deployd/flow/{flow}", "failure"
        description = f"{flow} needs attention: " + "; ".join(detail["problems"])
    if state is None:
        return None
    return {
        "sha": sha,
        "context": context,
        "state": state,
        "description": description,
        "target_url": page_url(config, row),
    }
