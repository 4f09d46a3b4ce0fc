"""The pipeline's resolver: make the pushed commit readable before a build starts.

Remote components are fetched (from their configured `url`, never from a payload) into a
bare mirror under state_dir. A webhook may arrive before the hosting service shows the
pushed commit on the branch, so when the notice names a sha the resolver fetches again with
backoff until that sha is reachable from the configured branch, for at most
`daemon.webhook_wait`; then the pipeline builds the branch head instead. Local repositories
are waited for the same way, without fetching.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Protocol

from ..config import ComponentConfig, Config, local_path
from ..errors import GitError
from ..paths import Paths
from ..store import Store
from ..toolchains import git as gitops
from ..types import PushNotice

log = logging.getLogger("deployd.mirror")

Sleep = Callable[[float], Awaitable[None]]
FIRST_DELAY = 0.25
MAX_DELAY = 8.0


def component_repo(config: Config, paths: Paths, comp: ComponentConfig) -> Path:
    """The git repository a component's commits are read from: its hosted repository, its
    mirror, or the local repository its `url` names."""
    if comp.url is None:
        return paths.hosted_repo(comp.name)
    if comp.mirrored:
        # One mirror per repository: components sharing a url (a monorepo) share the one
        # named after the first of them in the config.
        owner = next((c for c in config.components if c.url == comp.url), comp)
        return paths.mirror(owner.name)
    return local_path(comp.url)


class _Pipeline(Protocol):
    """What the resolver reads of the pipeline that owns it."""

    config: Config

    def pending(self, component: str) -> PushNotice | None: ...


class MirrorResolver:
    """`Pipeline.resolver`: (component, notice) → the repository path to build from."""

    def __init__(
        self,
        pipeline: _Pipeline,
        store: Store,
        paths: Paths,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        self.pipeline = pipeline  # its config (reloads replace it) and pending slots
        self.store = store
        self.paths = paths
        self.clock = clock
        self.sleep = sleep
        self._locks: dict[Path, asyncio.Lock] = {}

    def repo_path(self, comp: ComponentConfig) -> Path:
        return component_repo(self.pipeline.config, self.paths, comp)

    async def __call__(self, comp: ComponentConfig, notice: PushNotice) -> Path:
        repo = self.repo_path(comp)
        sha = notice.sha
        wait = self.pipeline.config.daemon.webhook_wait
        deadline = self.clock() + wait
        delay = FIRST_DELAY
        waited = False
        while True:
            error: GitError | None = None
            if comp.mirrored and comp.url is not None:
                try:
                    # Components sharing a mirror fetch into it one at a time.
                    async with self._locks.setdefault(repo, asyncio.Lock()):
                        await gitops.fetch_mirror(comp.url, repo, comp.branch)
                except GitError as exc:
                    error = exc
            if error is None and (
                sha is None or await asyncio.to_thread(gitops.on_branch, repo, comp.branch, sha)
            ):
                if waited:
                    log.info("%s: commit %s appeared on %s", comp.name, sha, comp.branch)
                return repo
            if (
                sha is None
                or self.clock() >= deadline
                or self.pipeline.pending(comp.name) is not None
            ):
                break
            if not waited:
                waited = True
                self.store.event(
                    "push.waiting",
                    f"{comp.name}: commit {sha[:12]} is not on branch {comp.branch!r} yet; "
                    f"retrying for up to {wait:g}s" + (f" ({error})" if error else ""),
                    component=comp.name,
                    sha=sha,
                )
            await self.sleep(min(delay, max(0.0, deadline - self.clock())))
            delay = min(delay * 2, MAX_DELAY)
        if error is not None:
            raise error
        # The pipeline notices that `sha` is missing and builds the branch head instead.
        return repo
