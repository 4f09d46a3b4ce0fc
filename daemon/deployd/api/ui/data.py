"""What each dashboard page shows, from the functions `deployd status`, `flow show`,
`versions`, `builds`, `flow history`, `flow runs` and `history` use (no queries of its own).

The builders run on the daemon's event loop (the store's connection lives there); reading
commit subjects from git and build logs from disk runs in a worker thread (`enrich_*`).
"""

from __future__ import annotations

import functools
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ...flows.runs import run_json
from ...pipeline.mirror import component_repo
from ...status import build_status
from ...store import FlowStore
from ...store.runs import RunStore
from ...toolchains.git import commit_info

if TYPE_CHECKING:
    from ...config import Config
    from ...flows.deployer import Deployer
    from ...paths import Paths
    from ...store import Store

LOG_INLINE_BYTES = 64 * 1024  # a build log shown inline is cut to its last 64 KiB
EVENT_KINDS = (
    "push",
    "build",
    "version",
    "deploy",
    "flow",
    "errors",
    "config",
)
IGNORED_KINDS = ("push.ignored", "push.paused")


class NotFound(LookupError):
    """No such component, flow or build: the page answers 404 with this message."""


@functools.lru_cache(maxsize=4096)
def _commit(repo: str, sha: str) -> dict[str, str] | None:
    """A commit's subject and author (commits never change: cached by repository and sha)."""
    return commit_info(Path(repo), sha)


def commit_of(config: Config, paths: Paths, component: str, sha: str | None) -> dict[str, str]:
    """Subject, author and date of `sha` of `component` (empty when git cannot tell)."""
    comp = config.component(component)
    if comp is None or not sha:
        return {}
    return _commit(str(component_repo(config, paths, comp)), sha) or {}


def overview(config: Config, store: Store, paths: Paths, deployer: Deployer) -> dict[str, Any]:
    """The status object (`GET /api/v1/status`)."""
    return build_status(config, store, paths, deployer)


def enrich_overview(config: Config, paths: Paths, data: dict[str, Any]) -> dict[str, Any]:
    """(In a thread.) Each component's recent version with its commit subject and author."""
    for comp in data["components"]:
        recent = comp.get("recent")
        comp["commit"] = commit_of(config, paths, comp["name"], recent["sha"] if recent else None)
    return data


def component(
    config: Config, store: Store, paths: Paths, deployer: Deployer, name: str
) -> dict[str, Any]:
    """A component's status, versions, builds and the pushes it ignored (and why)."""
    if config.component(name) is None:
        raise NotFound(f"unknown component {name!r}")
    status = build_status(config, store, paths, deployer)
    summary = next(c for c in status["components"] if c["name"] == name)
    flows = [
        f["name"] for f in status["flows"] if any(s.get("component") == name for s in f["steps"])
    ]
    return {
        "component": summary,
        "paused": name in status["paused"]["component"],
        "flows": flows,
        "versions": store.versions(name, limit=50),
        "builds": store.builds(name, limit=20),
        "ignored": [
            e for e in store.events(component=name, limit=500) if e["kind"] in IGNORED_KINDS
        ],
    }


def enrich_component(config: Config, paths: Paths, data: dict[str, Any]) -> dict[str, Any]:
    """(In a thread.) Commit subjects of the versions; each build's log (its last 64 KiB)."""
    name = data["component"]["name"]
    for v in data["versions"]:
        v["commit"] = commit_of(config, paths, name, v["sha"])
    for b in data["builds"]:
        b["commit"] = commit_of(config, paths, name, b["sha"])
        b["log"], b["log_cut"] = read_log(b.get("log_path"), LOG_INLINE_BYTES)
    return data


def read_log(path: str | None, limit: int | None) -> tuple[str | None, bool]:
    """A build log's text (its last `limit` bytes; None: all), and whether it was cut."""
    if not path:
        return None, False
    try:
        with open(path, "rb") as fh:
            if limit is not None:
                size = fh.seek(0, 2)
                fh.seek(max(0, size - limit))
                data = fh.read()
                return data.decode("utf-8", "replace"), size > limit
            return fh.read().decode("utf-8", "replace"), False
    except OSError:
        return None, False


def build(store: Store, build_id: int) -> dict[str, Any]:
    """One build (`deployd build-log`)."""
    row = store.build(build_id)
    if row is None:
        raise NotFound(f"no build {build_id}")
    return dict(row)


def flow(
    config: Config, store: Store, paths: Paths, deployer: Deployer, name: str
) -> dict[str, Any]:
    """`flow show` (every real step, mapper steps included), the deployment timeline
    (`flow history`), and the runs of an ordinary flow (`flow runs`)."""
    fs = FlowStore(store)
    if fs.flow(name) is None:
        raise NotFound(f"unknown flow {name!r}")
    status = build_status(config, store, paths, deployer)
    summary = next(f for f in status["flows"] if f["name"] == name)
    draft = fs.draft(name)
    versions = fs.flow_versions(name)
    return {
        "flow": summary,
        "paused": name in status["paused"]["flow"],
        "draft": draft,
        "stats": fs.stats(name),
        "versions": versions,
        "can_roll_back": fs.rollback_source(name, summary["version"]) is not None
        if summary["version"]
        else False,
        "deployments": fs.deployments(name, limit=50),
        "runs": [run_json(r) for r in RunStore(store).runs(name, 20)]
        if summary["type"] == "ordinary"
        else [],
        "events": store.events(flow=name, limit=20),
    }


def events(
    config: Config,
    store: Store,
    component: str | None,
    flow_name: str | None,
    kind: str | None,
    limit: int,
) -> dict[str, Any]:
    """The event log (`deployd history`), newest first, by component, flow and kind (a kind
    such as `build.failed`, or its first part: `build`)."""
    rows = store.events(component or None, flow_name or None, limit=limit if not kind else 5000)
    if kind:
        rows = [r for r in rows if r["kind"] == kind or r["kind"].startswith(kind + ".")][:limit]
    return {
        "events": rows,
        "components": [c.name for c in config.components],
        "flows": [f["name"] for f in FlowStore(store).flows()],
        "kinds": EVENT_KINDS,
        "filter": {"component": component or "", "flow": flow_name or "", "kind": kind or ""},
    }


def age(ts: str | None, now: datetime | None = None) -> str:
    """'12 s ago', '5 min ago', '3 h ago', '2 d ago' for an ISO 8601 timestamp."""
    if not ts:
        return ""
    try:
        then = datetime.fromisoformat(ts)
    except ValueError:
        return ts
    if then.tzinfo is None:
        then = then.replace(tzinfo=UTC)
    secs = int(((now or datetime.now(UTC)) - then).total_seconds())
    if secs < 0:
        return "just now"
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if secs >= size:
            return f"{secs // size} {unit} ago"
    return f"{secs} s ago"
