"""The pipeline: one pending slot per component (latest wins) → export → build → register.

Sources call `Pipeline.notify(PushNotice)` on the event loop. Each component has at most one
pending notice and one running build; a burst of pushes builds the newest commit once the
running build ends. Different components build concurrently, bounded by
`daemon.max_parallel_builds`. A commit that already has a version (or a final failure) is
never built again.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import shutil
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from ..config import ComponentConfig, Config
from ..errors import BuildError, ComponentError, GitError
from ..metrics import Metrics
from ..paths import Paths
from ..pauses import Pauses
from ..store import Store
from ..store.pushes import PushStore
from ..toolchains import git as gitops
from ..toolchains.env import log_tail
from ..types import BuildState, PushNotice, VersionRegistered
from . import build as builder
from .mirror import MirrorResolver
from .tree import build_tree, component_root, semver_check, unchanged_paths

log = logging.getLogger("deployd.pipeline")


Listener = Callable[[VersionRegistered], Awaitable[None]]
FEEDBACK_LOG_LINES = 10  # lines of a failed build's log the pushing `git push` shows


class Pipeline:
    """Turns push notices into registered component versions."""

    def __init__(
        self,
        config: Config,
        store: Store,
        paths: Paths,
        pauses: Pauses,
        metrics: Metrics,
        listeners: list[Listener] | None = None,
    ) -> None:
        self.config = config
        self.store = store
        self.paths = paths
        self.pauses = pauses
        self.metrics = metrics
        self.listeners: list[Listener] = list(listeners or [])
        # Before each build: make `sha` (or the branch head) readable and say where. Remote
        # urls fetch their mirror, waiting for a pushed commit to show up; also `repo_path`.
        self.resolver = MirrorResolver(self, store, paths)
        self._pending: dict[str, PushNotice] = {}
        self._workers: dict[str, asyncio.Task[None]] = {}
        self.slots = asyncio.Semaphore(config.daemon.max_parallel_builds)
        self.pushes = PushStore(store)

    # -- intake ----------------------------------------------------------------------------

    def repo_path(self, comp: ComponentConfig) -> Path:
        """The repository a component's builds read (hosted, local, or its mirror)."""
        return self.resolver.repo_path(comp)

    def notify(self, notice: PushNotice) -> bool:
        """Queue `notice` in its component's slot (replacing an older one). True if queued.

        A push announced by the repository (a webhook, the post-receive hook) is offered to
        every other component with the same url too (a monorepo): one hook for the
        repository is enough, and each component's branch and `paths` decide for itself."""
        queued = self._notify_one(notice)
        comp = self.config.component(notice.component)
        if comp is not None and comp.url is not None and _from_repository(notice):
            for other in self.config.components:
                same_branch = notice.ref is None or notice.ref == f"refs/heads/{other.branch}"
                if other.url == comp.url and other.name != comp.name and same_branch:
                    self._notify_one(dataclasses.replace(notice, component=other.name))
        return queued

    def _say(
        self, notice: PushNotice, text: str | None, level: str = "info", done: bool = True
    ) -> None:
        """Tell the hook's follower of `notice`'s push (if any) `text`; `done`: this notice's
        part of the push is over (see `store/pushes.py`)."""
        self.pushes.note(notice.push_id, text, level=level, closed=1 if done else 0)

    def _notify_one(self, notice: PushNotice) -> bool:
        self.pushes.note(notice.push_id, opened=1)
        queued = self._intake(notice)
        if not queued:
            self._say(notice, None)
        return queued

    def _intake(self, notice: PushNotice) -> bool:
        comp = self.config.component(notice.component)
        if comp is None:
            log.warning("push notice for unknown component %r ignored", notice.component)
            self._say(
                notice,
                f"deployd has no component {notice.component!r} (its [[components]] entry was"
                " removed?); this push is not deployed",
                "error",
                done=False,
            )
            return False
        if self.pauses.component(comp.name) and not notice.force:  # `deployd redeploy` still builds
            self.store.event(
                "push.paused",
                f"{comp.name} is paused: {notice.source} push of "
                f"{(notice.sha or 'the branch head')[:12]} not built "
                f"(`deployd resume {comp.name}` builds the branch head)",
                component=comp.name,
                sha=notice.sha,
            )
            self._say(
                notice,
                f"{comp.name} is paused: this push is not built"
                f" (`deployd resume {comp.name}` builds the branch head)",
                done=False,
            )
            return False
        if notice.ref is not None and notice.ref != f"refs/heads/{comp.branch}":
            self.store.event(
                "push.ignored",
                f"push to {notice.ref!r} ignored: {comp.name} deploys branch {comp.branch!r}",
                component=comp.name,
                sha=notice.sha,
            )
            self._say(
                notice,
                f"{notice.ref} is not deployed: {comp.name} deploys branch {comp.branch!r}",
                done=False,
            )
            return False
        if notice.sha is not None and gitops.ZERO_SHA_RE.match(notice.sha):
            self.store.event(
                "push.ignored",
                f"branch {comp.branch!r} of {comp.name} was deleted; the recent version stays",
                component=comp.name,
            )
            self._say(
                notice,
                f"branch {comp.branch!r} deleted; {comp.name}'s recent version stays",
                done=False,
            )
            return False
        if notice.sha is not None and not gitops.is_sha(notice.sha):
            self.store.event(
                "push.ignored",
                f"push notice with malformed sha {notice.sha[:80]!r} ignored",
                component=comp.name,
            )
            return False
        if (
            notice.sha is not None
            and not notice.force
            and self.store.has_final_build(comp.name, notice.sha)
        ):
            self._say(
                notice,
                f"{comp.name}: commit {notice.sha[:12]} was handled before (built, failed or"
                f" ignored): nothing new to deploy (`deployd builds {comp.name}`; `deployd"
                f" redeploy {comp.name} --sha SHA` builds it again)",
                done=False,
            )
            return False
        self.store.event(
            "push.received",
            f"{comp.name}: {notice.source} reported {(notice.sha or 'branch head')[:12]}",
            component=comp.name,
            sha=notice.sha,
            detail={"source": notice.source, "delivery": notice.delivery_id},
        )
        older = self._pending.get(comp.name)
        if older is not None and older.push_id is not None:
            self._say(
                older,
                None
                if older.push_id == notice.push_id
                else f"{comp.name}: a newer push ({(notice.sha or 'the branch head')[:12]}) came"
                " in before this one was built; that one is built instead",
            )
        self._pending[comp.name] = notice
        if comp.name not in self._workers:
            self._workers[comp.name] = asyncio.get_running_loop().create_task(
                self._worker(comp.name), name=f"pipeline:{comp.name}"
            )
        return True

    def pending(self, component: str) -> PushNotice | None:
        return self._pending.get(component)

    @property
    def queue_depth(self) -> int:
        return len(self._pending) + len(self._workers)

    async def stop(self, grace: float) -> None:
        """Let running builds finish for up to `grace` seconds, then cancel them."""
        self._pending.clear()
        workers = list(self._workers.values())
        if not workers:
            return
        _done, still = await asyncio.wait(workers, timeout=grace)
        for task in still:
            task.cancel()
        for task in still:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    # -- work ------------------------------------------------------------------------------

    async def _worker(self, name: str) -> None:
        try:
            while name in self._pending:
                notice = self._pending.pop(name)
                comp = self.config.component(name)
                if comp is None:
                    continue
                async with self.slots:
                    try:
                        await self._process(comp, notice)
                    except asyncio.CancelledError:
                        raise
                    except Exception as exc:
                        log.exception("pipeline error for %s", name)
                        self._say(notice, f"{name}: internal error: {exc}", "error")
        finally:
            self._workers.pop(name, None)

    async def _process(self, comp: ComponentConfig, notice: PushNotice) -> None:
        try:
            repo = await self.resolver(comp, notice)
        except GitError as exc:
            self.store.event(
                "push.failed", f"{comp.name}: {exc}", component=comp.name, sha=notice.sha
            )
            self._say(notice, f"{comp.name}: {exc}", "error")
            return
        sha = notice.sha
        if sha is not None and not await asyncio.to_thread(gitops.has_commit, repo, sha):
            head = await asyncio.to_thread(gitops.head, repo, comp.branch)
            self.store.event(
                "push.failed",
                f"{comp.name}: commit {sha[:12]} is not in the repository; "
                + ("building the branch head instead" if head else "nothing to build"),
                component=comp.name,
                sha=sha,
            )
            sha = head
        elif sha is None:
            sha = await asyncio.to_thread(gitops.head, repo, comp.branch)
        if sha is None:
            self.store.event(
                "push.ignored",
                f"{comp.name}: branch {comp.branch!r} does not exist; nothing to build",
                component=comp.name,
            )
            self._say(notice, f"{comp.name}: branch {comp.branch!r} does not exist")
            return
        if self.store.has_final_build(comp.name, sha) and not (
            notice.force and not self.store.has_version(comp.name, sha)
        ):
            self._say(notice, f"{comp.name}: commit {sha[:12]} was handled before")
            return
        if not notice.force:
            unchanged = await asyncio.to_thread(self.unchanged_paths, comp, repo, sha)
            if unchanged is not None:
                self.store.ignore_commit(comp.name, sha, unchanged)
                self._say(notice, f"{comp.name}: not built: {unchanged}")
                return
        await self.build(comp, repo, sha, notice)

    def unchanged_paths(self, comp: ComponentConfig, repo: Path, sha: str) -> str | None:
        """`tree.unchanged_paths` on this pipeline's store. Blocking (git)."""
        return unchanged_paths(self.store, comp, repo, sha)

    async def build(self, comp: ComponentConfig, repo: Path, sha: str, notice: PushNotice) -> None:
        """Build commit `sha` of `comp` and register it, or record exactly why not."""
        build_id = self.store.start_build(comp.name, sha, notice.ref, notice.source)
        workdir = self.paths.builds / str(build_id)
        src = workdir / "src"
        log_path = self.paths.build_logs / f"{build_id}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self.store.set_build_log(build_id, log_path)
        started = time.monotonic()
        self._say(notice, f"{comp.name}: build {build_id} started ({sha[:12]})", done=False)
        try:
            shutil.rmtree(workdir, ignore_errors=True)
            with log_path.open("wb") as logf:
                logf.write(f"[deployd: build {build_id} of {comp.name} at {sha}]\n".encode())
                info = await asyncio.to_thread(gitops.commit_info, repo, sha)
                if info is not None:
                    self.store.set_build_commit(build_id, info["subject"], info["author"])
                await asyncio.to_thread(gitops.export, repo, sha, workdir / "tree")
                await asyncio.to_thread(component_root, workdir / "tree", comp, sha, src)
                desc, warnings = await build_tree(
                    self.config,
                    comp,
                    src,
                    logf,
                    sha,
                    deadline=started + comp.build_timeout,
                    check=semver_check(self.store, comp.name),
                )
            version = self.store.next_version_number(comp.name)
            final = self.paths.versions / comp.name / str(version)
            final.parent.mkdir(parents=True, exist_ok=True)
            if final.exists():  # left by a daemon killed between rename and commit
                shutil.rmtree(final)
            os.replace(src, final)
            try:
                self.store.register_version(
                    build_id,
                    semver=desc.version,
                    runtime=desc.runtime or "python",
                    descriptor=desc.model_dump(mode="json", exclude_none=True),
                    artifact_dir=final,
                    version=version,
                    warnings=warnings,
                )
            except Exception:
                shutil.rmtree(final, ignore_errors=True)
                raise
        except (ComponentError, GitError) as exc:
            self.store.fail_build(build_id, str(exc))
            self._build_failed(notice, comp.name, build_id, str(exc), log_path)
            return
        except BuildError as exc:
            if isinstance(exc, builder.CommandFailed) and exc.explained:
                self.store.fail_build(build_id, str(exc))
                self._build_failed(notice, comp.name, build_id, str(exc), log_path)
                return
            tail = log_tail(log_path, 600).strip().splitlines()[-6:]
            detail = " | ".join(
                line for line in tail if line.strip() and not line.startswith("[deployd:")
            )
            self.store.fail_build(
                build_id, f"{exc}" + (f"; last output: {detail}" if detail else "")
            )
            self._build_failed(notice, comp.name, build_id, str(exc), log_path)
            return
        except asyncio.CancelledError:
            self.store.fail_build(
                build_id, "interrupted: the daemon stopped during this build", retryable=True
            )
            self._say(
                notice,
                f"{comp.name}: build {build_id} interrupted: deployd stopped; it builds the"
                " branch head again when it starts",
                "error",
            )
            raise
        except Exception as exc:
            log.exception("build %s crashed", build_id)
            self.store.fail_build(build_id, f"internal error: {type(exc).__name__}: {exc}")
            self._build_failed(
                notice, comp.name, build_id, f"internal error: {type(exc).__name__}: {exc}", None
            )
            return
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
            self._observe_build(comp.name, build_id, time.monotonic() - started)
        self.metrics.version_registered(comp.name)
        took = time.monotonic() - started
        log.info("registered %s v%s (%s) in %.0f ms", comp.name, version, sha[:12], took * 1000)
        self._say(
            notice,
            f"{comp.name}: build {build_id} succeeded: v{version}"
            + (f" ({desc.version})" if desc.version else "")
            + f" in {took:.1f} s",
            done=False,
        )
        event = VersionRegistered(comp.name, version, sha, desc.version, notice.push_id)
        try:
            for listener in list(self.listeners):
                try:
                    await listener(event)
                except Exception:
                    log.exception("version listener failed for %s v%s", comp.name, version)
        finally:
            # The listeners (the deployer) opened what they started for the push by now.
            self._say(notice, None)

    def _build_failed(
        self, notice: PushNotice, name: str, build_id: int, error: str, log_path: Path | None
    ) -> None:
        """Tell the hook's follower why the build failed, with the last lines of its log."""
        if notice.push_id is None:
            return
        self._say(notice, f"{name}: build {build_id} failed: {error}", "error", done=False)
        tail = (
            log_tail(log_path, 4000).rstrip().splitlines()[-FEEDBACK_LOG_LINES:] if log_path else []
        )
        tail = [line for line in tail if not line.startswith("[deployd:")]
        if tail:
            self._say(
                notice,
                f"last lines of the build log (`deployd build-log {build_id}` has it all):\n"
                + "\n".join(f"  | {line}" for line in tail),
                "error",
                done=False,
            )
        self._say(notice, None)

    def _observe_build(self, component: str, build_id: int, seconds: float) -> None:
        row = self.store.build(build_id)
        status = row["status"] if row else BuildState.FAILED
        if status == BuildState.FAILED and row and row.get("retryable"):
            status = "interrupted"
        self.metrics.build_finished(component, status, seconds)


def _from_repository(notice: PushNotice) -> bool:
    """A notice the repository itself sent (webhook, post-receive hook), not one a component's
    own watch or poll made (each component sharing the url has its own)."""
    return notice.source == "hook" or notice.source.startswith("webhook")
