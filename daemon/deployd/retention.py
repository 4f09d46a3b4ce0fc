"""Retention: delete what is no longer needed, keep what any flow may still run.

Kept: the artifact folders of the newest `keep_versions` versions of each component, plus
every version used by any flow version that is active, drafted, or was active in the flow's
last two deployments (so a rollback always finds its code). Build logs older than `keep_logs`
are deleted. Step logs are capped (the newest half is kept). The version *rows* stay: history
is never rewritten; a pruned version simply cannot be run again.

Dead letters are kept `keep_dead_letters` ("0": no age limit) and at most `max_dead_letters`
per step (the oldest go first); `expire_dead_letters` removes the rest and says, per step, how
many went and why, so the caller can count and record every removal.

Objects of the object store (attachments, `objects.py`) are kept while a queued message or a
dead letter references them by url; an object messages referenced goes `keep_attachments`
after the last such message was emitted (a message waiting on a broker is not in the state
database: that time is what keeps its object), an object no message ever referenced
`keep_objects` after it was written, and one whose own `x-eio-ttl` passed at once.
`object_refs` reads the references (on the loop), `expire_objects` removes (in a thread).

`plan` only reads; `apply_plan` touches the disk (run it in a worker thread).
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from .config import format_duration
from .objects import ObjectInfo, ObjectStore, referenced
from .paths import Paths
from .store import FlowStore, Store
from .store.letters import DeadLetterStore

MAX_STEP_LOG = 20 * 1024 * 1024


@dataclass
class Plan:
    versions: list[tuple[str, int, str]] = field(default_factory=list)  # component, version, dir
    build_logs: list[tuple[int, str]] = field(default_factory=list)  # build id, path
    step_logs: list[Path] = field(default_factory=list)


def plan(store: Store, paths: Paths, keep_versions: int, keep_logs: float) -> Plan:
    """What retention would delete now."""
    fs = FlowStore(store)
    needed: set[tuple[str, int]] = set()
    for flow in fs.flows():
        rows = []
        if flow["active_version"]:
            rows.append(fs.flow_version(flow["name"], flow["active_version"]))
        draft = fs.draft(flow["name"])
        if draft:
            rows.append(draft)
        for dep in fs.deployments(flow["name"], limit=2):
            for v in (dep["from_version"], dep["to_version"]):
                if v:
                    rows.append(fs.flow_version(flow["name"], v))
        for row in rows:
            for step in (row or {}).get("steps", []):
                if step.get("version"):
                    needed.add((step["component"], int(step["version"])))
    out = Plan()
    for row in store.prunable_versions(keep_versions):
        if (row["component"], row["version"]) not in needed:
            out.versions.append((row["component"], row["version"], row["artifact_dir"]))
    cutoff = time.time() - keep_logs
    for row in store.finished_build_logs():
        try:
            if os.stat(row["log_path"]).st_mtime < cutoff:
                out.build_logs.append((row["id"], row["log_path"]))
        except OSError:
            out.build_logs.append((row["id"], row["log_path"]))
    if paths.step_logs.is_dir():
        for step_log in paths.step_logs.glob("*/*.log"):
            try:
                if step_log.stat().st_size > MAX_STEP_LOG:
                    out.step_logs.append(step_log)
            except OSError:
                pass
    return out


def apply_plan(p: Plan) -> int:
    """Delete what the plan names; returns bytes freed. Blocking: run in a thread."""
    freed = 0
    for _c, _v, folder in p.versions:
        freed += disk_usage(Path(folder))
        shutil.rmtree(folder, ignore_errors=True)
    for _id, build_log in p.build_logs:
        try:
            freed += os.stat(build_log).st_size
            os.unlink(build_log)
        except OSError:
            pass
    for step_log in p.step_logs:
        # In place, not by renaming a new file over it: running steps keep the log open
        # (O_APPEND) and must go on writing to the file `deployd logs` reads.
        try:
            with step_log.open("r+b") as fh:
                size = fh.seek(0, os.SEEK_END)
                fh.seek(size - MAX_STEP_LOG // 2)
                keep = b"--- deployd: older lines removed by retention ---\n" + fh.read()
                fh.seek(0)
                fh.write(keep)
                fh.truncate()
            freed += size - len(keep)
        except OSError:
            pass
    return freed


@dataclass(frozen=True)
class Expired:
    """Dead letters of one step removed by retention: older than keep_dead_letters, and
    beyond max_dead_letters."""

    flow: str
    step: str
    too_old: int = 0
    too_many: int = 0

    @property
    def count(self) -> int:
        return self.too_old + self.too_many

    def why(self, keep: float, limit: int) -> str:
        parts = []
        if self.too_old:
            parts.append(
                f"{self.too_old} older than {format_duration(keep)} (daemon.keep_dead_letters)"
            )
        if self.too_many:
            parts.append(f"{self.too_many} beyond {limit} per step (daemon.max_dead_letters)")
        return ", ".join(parts)


def expire_dead_letters(store: Store, keep: float, limit: int) -> list[Expired]:
    """Remove dead letters older than `keep` seconds (0: no age limit), then all but the
    newest `limit` of each step. Call inside a transaction."""
    letters = DeadLetterStore(store)
    old: dict[tuple[str, str], int] = {}
    if keep > 0:
        cutoff = (datetime.now(UTC) - timedelta(seconds=keep)).isoformat(timespec="milliseconds")
        old = letters.prune(cutoff, sys.maxsize)
    many = letters.prune("", limit)  # no letter is older than "": by count only
    return [
        Expired(flow, step, old.get((flow, step), 0), many.get((flow, step), 0))
        for flow, step in sorted(set(old) | set(many))
    ]


@dataclass(frozen=True)
class ObjectRefs:
    """What references objects: queued messages and dead letters (their ids), and when a
    message referencing each object was last emitted."""

    queued: set[str]
    last_seen: dict[str, float]


def object_refs(store: Store) -> ObjectRefs:
    fs = FlowStore(store)
    return ObjectRefs(referenced(fs.attachment_texts()), fs.object_refs())


def expire_objects(
    objects: ObjectStore,
    refs: ObjectRefs,
    keep_attachments: float,
    keep_objects: float,
    now: float | None = None,
) -> tuple[list[ObjectInfo], set[str]]:
    """Remove the objects nothing keeps any more (see the module docstring); returns them and
    the ids of every object that was there. Blocking: run in a thread."""
    now = time.time() if now is None else now
    removed: list[ObjectInfo] = []
    present: set[str] = set()
    for info in list(objects.list()):
        present.add(info.id)
        if info.id in refs.queued:
            continue
        seen = refs.last_seen.get(info.id)
        if info.expired(now):
            pass
        elif seen is not None:
            if now - max(seen, info.updated_at) < keep_attachments:
                continue
        elif now - info.updated_at < keep_objects:
            continue
        if objects.delete(info.id):
            removed.append(info)
    objects.sweep(now - max(3600.0, min(keep_attachments, keep_objects)))
    return removed, present


def forget_refs(store: Store, ids: list[str]) -> None:
    """Objects that are gone need no record of their references (call inside a transaction)."""
    FlowStore(store).forget_object_refs(ids)


def record(store: Store, p: Plan) -> None:
    """Mark what was deleted, in one transaction (on the loop: the store's single writer)."""
    store.mark_pruned([(c, v) for c, v, _dir in p.versions], [b for b, _log in p.build_logs])


def disk_usage(root: Path) -> int:
    """Bytes used by the files under `root` (what `du` would count, roughly)."""
    total = 0
    stack = [str(root)]
    while stack:
        folder = stack.pop()
        try:
            with os.scandir(folder) as entries:
                for entry in entries:
                    try:
                        if entry.is_dir(follow_symlinks=False):
                            stack.append(entry.path)
                        elif entry.is_file(follow_symlinks=False):
                            total += entry.stat(follow_symlinks=False).st_blocks * 512
                    except OSError:
                        continue
        except OSError:
            continue
    return total


def summary(
    p: Plan,
    freed: int,
    disk: int,
    expired: list[Expired] | None = None,
    objects: list[ObjectInfo] | None = None,
) -> dict[str, Any]:
    return {
        "versions_pruned": [f"{c} v{v}" for c, v, _ in p.versions],
        "build_logs_deleted": len(p.build_logs),
        "step_logs_trimmed": len(p.step_logs),
        "dead_letters_expired": sum(e.count for e in expired or ()),
        "objects_removed": len(objects or ()),
        "freed_bytes": freed,
        "state_dir_bytes": disk,
    }
