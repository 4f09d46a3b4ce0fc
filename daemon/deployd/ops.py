"""Operator actions: retention (`gc`: version folders, logs, dead letters), pause/resume,
redeploy on demand.

`Operator` is a daemon service: at start it schedules retention with APScheduler; its
methods are what the `/api/v1/gc|pause|resume|redeploy` routes (`deployd.api.ops`) call.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from apscheduler.schedulers.asyncio import AsyncIOScheduler

from . import retention
from .config import ComponentConfig, Config
from .errors import DeploydError, GitError, UnknownComponent
from .flows.deployer import Deployer
from .flows.plan import PlanError, Planner
from .metrics import Metrics
from .objects import ObjectInfo, ObjectStore
from .paths import Paths
from .pauses import Kind, Pauses
from .pipeline.queue import Pipeline
from .store import Store, utcnow
from .toolchains import git as gitops
from .types import PushNotice, VersionRegistered

log = logging.getLogger("deployd.ops")


class Operator:
    """Retention, pause/resume and redeploy: what an operator asks of the running daemon."""

    def __init__(
        self,
        config: Config,
        store: Store,
        paths: Paths,
        pauses: Pauses,
        deployer: Deployer,
        pipeline: Pipeline,
        reconcile: Callable[[], int],
        metrics: Metrics,
        objects: ObjectStore | None = None,
    ) -> None:
        self.config = config
        self.metrics = metrics
        self.store = store
        self.paths = paths
        self.pauses = pauses
        self.deployer = deployer
        self.pipeline = pipeline
        self.reconcile = reconcile  # queue builds of branch heads that have none
        self.objects = objects  # the object store (attachments), None: not served
        self.scheduler: AsyncIOScheduler | None = None
        self._gc_lock = asyncio.Lock()
        self._disk_task: asyncio.Task[int] | None = None

    async def start(self) -> None:
        every = self.config.daemon.gc_interval
        if every > 0:
            self.scheduler = AsyncIOScheduler()
            self.scheduler.add_job(self.gc, "interval", seconds=every, id="gc", jitter=every / 10)
            self.scheduler.start()
        if self.store.meta("disk_bytes") is None:
            self._disk_task = asyncio.get_running_loop().create_task(self.measure_disk())

    async def reload(self, config: Config) -> None:
        """Retention settings apply from the next run (the gc interval needs a restart)."""
        self.config = config

    async def stop(self) -> None:
        if self._disk_task is not None and not self._disk_task.done():
            self._disk_task.cancel()
        if self.scheduler is not None:
            self.scheduler.shutdown(wait=False)
            self.scheduler = None

    async def measure_disk(self) -> int:
        disk = await asyncio.to_thread(retention.disk_usage, self.paths.root)
        self.store.set_meta("disk_bytes", str(disk))
        self.store.set_meta("disk_measured_at", utcnow())
        return disk

    async def gc(self) -> dict[str, Any]:
        """Run retention now; returns what was removed and the state dir's size."""
        d = self.config.daemon
        async with self._gc_lock:
            expired = self.expire_dead_letters()
            plan = retention.plan(self.store, self.paths, d.keep_versions, d.keep_logs)
            retention.record(self.store, plan)  # rows first: never point at a half-deleted dir
            freed = await asyncio.to_thread(retention.apply_plan, plan)
            removed = await self.expire_objects()
            freed += sum(info.size for info in removed)
            disk = await self.measure_disk()
            result = retention.summary(plan, freed, disk, expired, removed)
            with self.store.tx():
                self.store.event(
                    "gc",
                    f"retention: {len(plan.versions)} version folder(s), "
                    f"{len(plan.build_logs)} build log(s), "
                    f"{result['dead_letters_expired']} dead letter(s), "
                    f"{len(removed)} object(s) removed, "
                    f"{freed} bytes freed",
                    detail=result,
                )
        return result

    async def expire_objects(self) -> list[ObjectInfo]:
        """Objects of the object store nothing references any more go (see retention.py)."""
        if self.objects is None:
            return []
        d = self.config.daemon
        refs = retention.object_refs(self.store)
        removed, present = await asyncio.to_thread(
            retention.expire_objects, self.objects, refs, d.keep_attachments, d.keep_objects
        )
        gone = [i for i in refs.last_seen if i not in present] + [i.id for i in removed]
        if gone:
            with self.store.tx():
                retention.forget_refs(self.store, gone)
        for info in removed:
            log.info(
                "object %s of flow %s (%d bytes) removed by retention",
                info.id,
                info.flow,
                info.size,
            )
        return removed

    def expire_dead_letters(self) -> list[retention.Expired]:
        """Dead letters past keep_dead_letters or max_dead_letters go, each step's removal
        recorded as an event and counted (deployd_dead_letters_expired_total): never silent."""
        d = self.config.daemon
        with self.store.tx():
            expired = retention.expire_dead_letters(
                self.store, d.keep_dead_letters, d.max_dead_letters
            )
            for e in expired:
                why = e.why(d.keep_dead_letters, d.max_dead_letters)
                self.store.event(
                    "dead_letters.expired",
                    f"flow {e.flow} step {e.step}: {e.count} dead letter(s) removed by "
                    f"retention: {why}",
                    flow=e.flow,
                    detail={
                        "step": e.step,
                        "removed": e.count,
                        "older_than_keep_dead_letters": e.too_old,
                        "beyond_max_dead_letters": e.too_many,
                    },
                )
        for e in expired:
            self.metrics.dead_letters_expired(e.flow, e.step, e.count)
            log.info("flow %s step %s: %d dead letter(s) expired", e.flow, e.step, e.count)
        return expired

    def _kinds(self, name: str) -> list[Kind]:
        kinds: list[Kind] = []
        if self.deployer.fs.flow(name) is not None:
            kinds.append("flow")
        if self.config.component(name) is not None:
            kinds.append("component")
        if not kinds:
            raise DeploydError(f"{name!r} is neither a flow nor a configured component")
        return kinds

    async def pause(self, name: str) -> dict[str, Any]:
        kinds = self._kinds(name)
        for kind in kinds:
            self.pauses.pause(kind, name)
        return {"name": name, "paused": kinds}

    async def resume(self, name: str) -> dict[str, Any]:
        kinds = self._kinds(name)
        for kind in kinds:
            self.pauses.resume(kind, name)
        queued = self.reconcile() if "component" in kinds else 0
        published = await self.deployer.resume(name) if "flow" in kinds else None
        return {"name": name, "resumed": kinds, "builds_queued": queued, "publish": published}

    async def plan(self, component: str, sha: str | None) -> dict[str, Any]:
        """`deployd plan`: build `sha` (default: the branch head) in a scratch folder, taking
        a build slot as a push's build does, and say what a push of it would do to every
        flow; registers nothing (see flows/plan.py)."""

        async def resolve(comp: ComponentConfig, want: str | None) -> tuple[Path, str]:
            notice = PushNotice(comp.name, f"refs/heads/{comp.branch}", None, "plan")
            try:
                repo = await self.pipeline.resolver(comp, notice)  # a mirror is fetched
            except GitError as exc:
                raise PlanError(f"{comp.name}: {exc}") from exc
            if want is None:
                head = await asyncio.to_thread(gitops.head, repo, comp.branch)
                if head is None:
                    raise PlanError(
                        f"branch {comp.branch!r} of {comp.name} has no commit yet; push one "
                        "or plan a working tree with --dir"
                    )
                return repo, head
            full = await asyncio.to_thread(gitops.resolve_commit, repo, want)
            if full is None and comp.mirrored and comp.url is not None and gitops.is_sha(want):
                # Not on the mirrored branch (a pull request's head): ask for it by sha.
                with contextlib.suppress(GitError):
                    await gitops.fetch_commit(comp.url, repo, want)
                full = await asyncio.to_thread(gitops.resolve_commit, repo, want)
            if full is None:
                raise PlanError(
                    f"{want[:80]!r} names no commit of {comp.name}'s repository (give a commit "
                    "sha, full or abbreviated, that was pushed to it)"
                )
            return repo, full

        planner = Planner(
            self.config,
            self.store,
            self.paths.builds,
            paused=self.pauses.flow,
            metadata=self.deployer.metadata,
            resolve=resolve,
            slots=self.pipeline.slots,
        )
        return await planner.plan(component, sha)

    async def redeploy(self, component: str, sha: str | None) -> dict[str, Any]:
        """Rebuild `sha` (default: the branch head), or redeploy its version if it has one."""
        comp = self.config.component(component)
        if comp is None:
            raise UnknownComponent(f"unknown component {component!r}")
        if sha is not None and not gitops.is_sha(sha):
            raise DeploydError(f"{sha!r} is not a full commit sha (40 hex digits)")
        if sha is None:
            repo = self.pipeline.repo_path(comp)
            sha = await asyncio.to_thread(gitops.head, repo, comp.branch)
            if sha is None:
                raise DeploydError(f"branch {comp.branch!r} of {component} has no commit yet")
        version = self.store.version_for_sha(component, sha)
        if version is not None:
            event = VersionRegistered(component, version["version"], sha, version["semver"])
            await self.deployer.on_version_registered(event)
            return {"component": component, "sha": sha, "version": version["version"]}
        queued = self.pipeline.notify(
            PushNotice(component, f"refs/heads/{comp.branch}", sha, "redeploy", force=True)
        )
        return {"component": component, "sha": sha, "build_queued": queued}
