"""Operator actions: retention (`gc`), pause/resume, redeploy on demand.

`Operator` is a daemon service: at start it loads what is paused and schedules retention
with APScheduler; its methods are what the `/api/v1/gc|pause|resume|redeploy` routes
(`deployd.api.ops`) call.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from apscheduler.schedulers.asyncio import AsyncIOScheduler

from . import retention
from .errors import DeploydError
from .pipeline import git as gitops
from .store import utcnow
from .types import PushNotice, VersionRegistered

if TYPE_CHECKING:
    from .service import Daemon

log = logging.getLogger("deployd.ops")


class Operator:
    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.scheduler: AsyncIOScheduler | None = None
        self._gc_lock = asyncio.Lock()
        self._disk_task: asyncio.Task[int] | None = None

    async def start(self) -> None:
        paused = self.daemon.store.paused()
        self.daemon.pipeline.paused.update(paused["component"])
        self.daemon.deployer.paused.update(paused["flow"])
        every = self.daemon.config.daemon.gc_interval
        if every > 0:
            self.scheduler = AsyncIOScheduler()
            self.scheduler.add_job(self.gc, "interval", seconds=every, id="gc", jitter=every / 10)
            self.scheduler.start()
        if self.daemon.store.meta("disk_bytes") is None:
            self._disk_task = asyncio.get_running_loop().create_task(self.measure_disk())

    async def stop(self) -> None:
        if self._disk_task is not None and not self._disk_task.done():
            self._disk_task.cancel()
        if self.scheduler is not None:
            self.scheduler.shutdown(wait=False)
            self.scheduler = None

    async def measure_disk(self) -> int:
        disk = await asyncio.to_thread(retention.disk_usage, self.daemon.paths.root)
        self.daemon.store.set_meta("disk_bytes", str(disk))
        self.daemon.store.set_meta("disk_measured_at", utcnow())
        return disk

    async def gc(self) -> dict[str, Any]:
        """Run retention now; returns what was removed and the state dir's size."""
        d = self.daemon.config.daemon
        async with self._gc_lock:
            plan = retention.plan(
                self.daemon.store, self.daemon.paths, d.keep_versions, d.keep_logs
            )
            retention.record(
                self.daemon.store, plan
            )  # rows first: never point at a half-deleted dir
            freed = await asyncio.to_thread(retention.apply_plan, plan)
            disk = await self.measure_disk()
            result = retention.summary(plan, freed, disk)
            with self.daemon.store.tx():
                self.daemon.store.event(
                    "gc",
                    f"retention: {len(plan.versions)} version folder(s), "
                    f"{len(plan.build_logs)} build log(s) removed, {freed} bytes freed",
                    detail=result,
                )
        return result

    def _kinds(self, name: str) -> list[str]:
        kinds = []
        if self.daemon.deployer.fs.flow(name) is not None:
            kinds.append("flow")
        if self.daemon.config.component(name) is not None:
            kinds.append("component")
        if not kinds:
            raise DeploydError(f"{name!r} is neither a flow nor a configured component")
        return kinds

    async def pause(self, name: str) -> dict[str, Any]:
        kinds = self._kinds(name)
        for kind in kinds:
            self.daemon.store.set_paused(kind, name, True)
            if kind == "component":
                self.daemon.pipeline.paused.add(name)
            else:
                self.daemon.deployer.paused.add(name)
        return {"name": name, "paused": kinds}

    async def resume(self, name: str) -> dict[str, Any]:
        kinds = self._kinds(name)
        for kind in kinds:
            self.daemon.store.set_paused(kind, name, False)
            if kind == "component":
                self.daemon.pipeline.paused.discard(name)
            else:
                self.daemon.deployer.paused.discard(name)
        queued = self.daemon.reconcile() if "component" in kinds else 0
        published = await self.daemon.deployer.resume(name) if "flow" in kinds else None
        return {"name": name, "resumed": kinds, "builds_queued": queued, "publish": published}

    async def redeploy(self, component: str, sha: str | None) -> dict[str, Any]:
        """Rebuild `sha` (default: the branch head), or redeploy its version if it has one."""
        comp = self.daemon.config.component(component)
        if comp is None:
            raise DeploydError(f"unknown component {component!r}")
        if sha is not None and not gitops.is_sha(sha):
            raise DeploydError(f"{sha!r} is not a full commit sha (40 hex digits)")
        if sha is None:
            repo = self.daemon.pipeline.repo_path(comp)
            sha = await asyncio.to_thread(gitops.head, repo, comp.branch)
            if sha is None:
                raise DeploydError(f"branch {comp.branch!r} of {component} has no commit yet")
        version = self.daemon.store.version_for_sha(component, sha)
        if version is not None:
            event = VersionRegistered(component, version["version"], sha, version["semver"])
            await self.daemon.deployer.on_version_registered(event)
            return {"component": component, "sha": sha, "version": version["version"]}
        queued = self.daemon.pipeline.notify(
            PushNotice(component, f"refs/heads/{comp.branch}", sha, "redeploy", force=True)
        )
        return {"component": component, "sha": sha, "build_queued": queued}
