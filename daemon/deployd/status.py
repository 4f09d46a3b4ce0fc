"""The status object (`deployd status --json`, `GET /api/v1/status`), built from the state.

It reads only: the config, the state database (read-only) and the daemon's lock file, so it
works the same whether or not the daemon runs.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
from typing import TYPE_CHECKING, Any

from .config import Config, redact_url
from .paths import Paths
from .store import FlowStore, Store
from .store.letters import DeadLetterStore
from .store.outbox import OutboxStore
from .store.quarantine import QuarantineStore
from .store.queues import fold_canary
from .store.runs import RunStore

if TYPE_CHECKING:
    from .flows.deployer import Deployer


def daemon_state(paths: Paths) -> tuple[bool, int | None]:
    """(running, pid): running when some process holds the state dir's lock."""
    try:
        fd = os.open(paths.lockfile, os.O_RDONLY)
    except OSError:
        return False, None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        running = True
    except OSError:
        running = False
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        running = False
    finally:
        os.close(fd)
    return running, paths.read_pid() if running else None


def build_status(
    config: Config,
    store: Store | None,
    paths: Paths | None = None,
    deployer: Deployer | None = None,
) -> dict[str, Any]:
    """The whole status object of the contract (see README: `deployd status --json`)."""
    paths = paths or Paths(config.state_dir)
    running, pid = daemon_state(paths)
    recent = store.recent_all() if store else {}
    commits = store.recent_commits() if store else {}
    last = store.last_builds_all() if store else {}
    polls = store.poll_states() if store else {}
    components = []
    for comp in config.components:
        r = recent.get(comp.name)
        b = last.get(comp.name)
        components.append(
            {
                "name": comp.name,
                "branch": comp.branch,
                "url": redact_url(comp.url)
                if comp.url is not None
                else str(paths.hosted_repo(comp.name)),
                "recent": {
                    "version": r["version"],
                    "sha": r["sha"],
                    "semver": r["semver"],
                    "built_at": r["built_at"],
                    **_commit(commits.get(comp.name)),
                }
                if r
                else None,
                "last_build": {
                    "id": b["id"],
                    "sha": b["sha"],
                    "status": b["status"],
                    "error": b["error"],
                    "started_at": b["started_at"],
                    "finished_at": b["finished_at"],
                    "seconds": _seconds(b["started_at"], b["finished_at"]),
                }
                if b
                else None,
                "poll": poll_status(polls.get(comp.name))
                if comp.mirrored or comp.poll_every(config.daemon.poll_interval) > 0
                else None,
            }
        )
    status: dict[str, Any] = {
        "daemon": {"running": running, "pid": pid, "listen": config.daemon.listen},
        "components": components,
        "runtimes": runtimes(config),
        "broker": broker_status(config, deployer),
        "flows": flows_status(store, deployer, config.runtime.default, config, _api_base(config))
        if store
        else [],
        **status_extras(store),
    }
    return status


def _seconds(start: str | None, end: str | None) -> float | None:
    """Seconds from ISO time `start` to `end` (None when either is missing)."""
    from datetime import datetime

    if not start or not end:
        return None
    try:
        delta = datetime.fromisoformat(end) - datetime.fromisoformat(start)
    except ValueError:
        return None
    return round(delta.total_seconds(), 3)


def _commit(row: dict[str, Any] | None) -> dict[str, Any]:
    """The recent version's `subject`, `author` and `build_seconds` (None when unknown)."""
    row = row or {}
    return {
        "subject": row.get("subject"),
        "author": row.get("author"),
        "build_seconds": _seconds(row.get("started_at"), row.get("finished_at")),
    }


def runtimes(config: Config) -> dict[str, str | None]:
    """The languages step processes run in: their versions (None: node cannot be used)."""
    import platform

    from .toolchains.node import detect

    node = detect(config.daemon.node)
    return {"python": platform.python_version(), "node": node.version if node.ok else None}


def broker_status(config: Config, deployer: Deployer | None) -> dict[str, Any] | None:
    """The RabbitMQ broker as the daemon sees it: `{"state": "connected" | "unreachable" |
    "connecting" | "unknown", "url" (credentials redacted), "error"}`; None when no
    [runtime.rabbitmq] url is configured. "unknown": read without a running daemon."""
    url = config.runtime.rabbitmq.url
    if url is None:
        return None
    describe = getattr(deployer.runtime, "describe", None) if deployer is not None else None
    if describe is not None:
        broker = describe().get("rabbitmq")
        if broker is not None:
            return dict(broker)
    return {"state": "unknown", "url": redact_url(url.get_secret_value()), "error": None}


def poll_status(row: dict[str, Any] | None) -> dict[str, Any] | None:
    """A component's `"poll"` object: last success, last error (if the last poll failed), next."""
    if row is None:
        return None
    error = None
    if row.get("last_error"):
        error = {"at": row.get("last_error_at"), "message": row["last_error"]}
    return {
        "interval": row["interval"],
        "last_ok": row.get("last_ok"),
        "last_error": error,
        "failures": row.get("failures", 0),
        "head": row.get("head"),
        "next_at": row.get("next_at"),
    }


def open_reader(config: Config) -> Store | None:
    return Store.readonly(Paths(config.state_dir).db)


def _mapper(step: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": f"{step['id']}:mapper",
        "kind": "mapper",
        "component": None,
        "function": None,
        "version": None,
        "state": "stopped",
        "pid": None,
        "backpressure": False,
        "dead_letters": 0,
    }


def dead_letter_counts(store: Store) -> dict[tuple[str, str], int]:
    """Dead letters by (flow, step), in one GROUP BY on an index (status has a budget); none
    in a database the daemon has not upgraded yet (before m006)."""
    try:
        return DeadLetterStore(store).counts()
    except sqlite3.OperationalError:
        return {}


def _api_base(config: Config) -> str:
    from .runtime.stepenv import api_uri

    return api_uri(config.daemon.host, config.daemon.port)


def flows_status(
    store: Store,
    deployer: Deployer | None = None,
    default_runtime: str = "embedded",
    config: Config | None = None,
    api_base: str = "http://127.0.0.1:8787",
) -> list[dict[str, Any]]:
    """The `flows` list of the status object; live step states when the daemon asks.
    `runtime`: what the flow's active version runs on (its flow file's or `flow move`'s
    choice, else [runtime] default). `freeze`: the freeze window the flow is in now (by
    `config`), `held`: what waits for its end. HTTP-fed flows (`builtin = "http"`) also have
    `url` (where their requests go, on `api_base`) and `http` (`auth`, `reply`,
    `reply_timeout`)."""
    from .flows.freeze import frozen

    fs = FlowStore(store)
    recent = {name: row["version"] for name, row in store.recent_all().items()}
    last = fs.last_deployments()
    letters = dead_letter_counts(store)
    quarantined = QuarantineStore(store).all()
    runs = RunStore(store)
    last_runs = runs.last_runs()
    next_runs = runs.next_runs()
    totals: dict[str, int] = {}
    for (flow_name, _step), n in letters.items():
        totals[flow_name] = totals.get(flow_name, 0) + n
    out = []
    live_depths = deployer.runtime.queue_depths() if deployer else None
    stored_depths = fold_canary(fs.queue_depths()) if live_depths is None else {}
    for flow in fs.flows():
        name = flow["name"]
        fv = fs.flow_version(name, flow["active_version"]) if flow["active_version"] else None
        runtime = ((fv["spec"] or {}).get("runtime") if fv else None) or default_runtime
        # Queue depths: the runtime's when the daemon asks; read without it, the SQLite
        # queues of the embedded runtime (a broker's are not known then: empty).
        depths = live_depths if live_depths is not None else stored_depths
        queues = {
            step: n
            for (f, step), n in depths.items()
            if f == name and (live_depths is not None or runtime == "embedded")
        }
        steps_db = fv["steps"] if fv else []
        live = deployer.step_status(name) if deployer else None
        if live is not None:
            steps = [s.as_json() for s in live]
        else:
            steps = []
            for s in steps_db:
                if s.get("mapping"):
                    steps.append(_mapper(s))
                steps.append(
                    {
                        "id": s["id"],
                        "kind": s["kind"],
                        "component": s["component"],
                        "function": s["function"],
                        "version": s["version"],
                        "state": "stopped",
                        "pid": None,
                        "backpressure": False,
                        "dead_letters": 0,
                    }
                )
        for step in steps:
            step["dead_letters"] = letters.get((name, step["id"]), 0)
        ordinary = flow["type"] == "ordinary"
        # An ordinary flow is never stale: each run takes the newest valid versions.
        stale = not ordinary and any(
            s["version"] is not None and (recent.get(s["component"]) or 0) > s["version"]
            for s in steps_db
        )
        state = (
            deployer.flow_state(name, bool(flow["enabled"]), flow["type"])
            if deployer
            else "stopped"
        )
        hold = frozen(config, name) if config is not None else None
        waiting = hold is not None and flow["update"] == "auto" and _waiting_draft(fs, name)
        dep = last.get(name)
        extra: dict[str, Any] = {}
        if not ordinary:
            extra["canary"] = _canary(deployer, name, dep)
        if ordinary:
            run = last_runs.get(name)
            extra["next_run_at"] = (
                (deployer.next_run_at(name) if deployer else next_runs.get(name))
                if flow["enabled"]
                else None
            )
            extra["last_run"] = (
                {"id": run["id"], "status": run["status"], "finished_at": run["finished_at"]}
                if run
                else None
            )
        first = steps_db[0] if steps_db else {}
        http: dict[str, Any] = {}
        if first.get("builtin") == "http":
            settings = first.get("http") or {}
            http = {
                "url": f"{api_base}/flows/{name}/in",
                "http": {k: settings.get(k) for k in ("auth", "reply", "reply_timeout")},
            }
        out.append(
            {
                "name": name,
                "type": flow["type"],
                "update": flow["update"],
                "state": state,
                "version": flow["active_version"],
                "stale": stale,
                "needs_attention": flow["needs_attention"],
                "dead_letters": totals.get(name, 0),
                "quarantined": [
                    {k: q[k] for k in ("component", "version", "reason", "created_at")}
                    for q in quarantined.get(name, [])
                ],
                "freeze": hold.as_json() if hold is not None else None,
                "held": hold.text() if hold is not None and waiting else None,
                "runtime": runtime,
                "queues": queues,
                "steps": steps,
                "last_deploy": {
                    "status": dep["status"],
                    "to_version": dep["to_version"],
                    "warmup_ms": dep["warmup_ms"],
                    "gap_ms": dep["gap_ms"],
                    "finished_at": dep["finished_at"],
                }
                if dep
                else None,
                **extra,
                **http,
            }
        )
    return out


def _canary(deployer: Deployer | None, name: str, dep: dict[str, Any] | None) -> Any:
    """A flow's canary in progress (issue 16): the daemon's, live (share, steps, messages and
    error rates of both versions, time left); read without the daemon, what its deployment
    row says (`running`: false — a stopped daemon's canary is rolled back at its next
    start). None: no canary in progress."""
    if deployer is not None:
        return deployer.canary_status(name)
    if dep is None or dep["status"] != "canary":
        return None
    return {
        "deployment": dep["id"],
        "version": dep["to_version"],
        "from_version": dep["from_version"],
        **(dep.get("canary") or {}),
        "running": False,
    }


def _waiting_draft(fs: FlowStore, name: str) -> bool:
    """Whether `name` has a draft an automatic publish left waiting (none before m005)."""
    try:
        return fs.waiting_draft(name) is not None
    except sqlite3.OperationalError:
        return False


ERROR_KINDS = {
    "builds": "build.failed",
    "pushes": "push.failed",
    "deploys": "deploy.failed",
    "rollbacks": "deploy.rolled_back",
    "flows": "flow.failed",
    "config": "config.rejected",
}
# What shows that the part has worked since its last error (for the same component or flow).
CLEARED_BY = {
    "builds": ("version.registered",),
    "pushes": ("version.registered",),
    "deploys": ("deploy.done",),
    "rollbacks": ("deploy.done",),
    "flows": ("flow.started", "deploy.done"),
    "config": ("config.reloaded",),
}


def status_extras(store: Any) -> dict[str, Any]:
    """Paused items, disk use and the last error of each part, for the status object."""
    disk = store.meta("disk_bytes") if store else None
    errors: dict[str, Any] = {}
    for part, kind in ERROR_KINDS.items():
        row = store.last_error(kind, CLEARED_BY[part]) if store else None
        errors[part] = (
            {"at": row["ts"], "message": row["message"], "cleared_at": row["cleared_at"]}
            if row
            else None
        )
    return {
        "last_errors": errors,
        "outbox": outbox_status(store),
        "paused": store.paused() if store else {"flow": [], "component": []},
        "disk": {
            "state_dir_bytes": int(disk) if disk else None,
            "measured_at": store.meta("disk_measured_at") if store else None,
        },
    }


def outbox_status(store: Any) -> dict[str, Any]:
    """Commit statuses and notifications: how many wait to be sent, how many were given up,
    and the newest given up (its target and why; never a url or a token)."""
    out: dict[str, Any] = {"pending": 0, "failed": 0, "last_failure": None}
    if store is None:
        return out
    outbox = OutboxStore(store)
    try:
        counts = outbox.counts()
        last = outbox.last_failure()
    except sqlite3.OperationalError:  # a database the daemon has not migrated yet
        return out
    out["pending"], out["failed"] = counts["pending"], counts["failed"]
    if last:
        out["last_failure"] = {
            "at": last["finished_at"],
            "target": last["target"],
            "kind": last["kind"],
            "message": last["last_error"],
        }
    return out
