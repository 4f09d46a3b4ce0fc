"""Where pushes come from, per component: hosted repositories, watched local ones, and the
reconciliation of every branch head with what was built (pushes made while deployd was down).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterable

from ..config import ComponentConfig, Config, local_path
from ..errors import DeploydError
from ..paths import Paths
from ..pauses import Pauses
from ..pipeline.queue import Pipeline
from ..sources.watch import Watcher, is_ref_change
from ..store import Store
from ..toolchains import git as gitops
from ..types import PushNotice

log = logging.getLogger("deployd")


class Repos:
    """Sets up each component's repository source and reconciles branch heads."""

    def __init__(
        self,
        config: Config,
        store: Store,
        paths: Paths,
        pipeline: Pipeline,
        pauses: Pauses,
        watcher: Watcher,
        notify: Callable[[PushNotice], bool],
    ) -> None:
        self.config = config
        self.store = store
        self.paths = paths
        self.pipeline = pipeline
        self.pauses = pauses
        self.watcher = watcher
        self.notify = notify

    def setup(self, components: Iterable[ComponentConfig] | None = None) -> None:
        """Hosted repository (and hook) or watch for each component; a broken one is recorded
        and skipped, the others are set up."""
        for comp in self.config.components if components is None else components:
            try:
                self._setup_one(comp)
            except (DeploydError, OSError) as exc:  # one broken component stops no other
                log.error("component %s: its repository cannot be used: %s", comp.name, exc)
                self.store.event(
                    "push.failed",
                    f"{comp.name}: its repository cannot be used: {exc}",
                    component=comp.name,
                )

    def _setup_one(self, comp: ComponentConfig) -> None:
        if comp.hosted:
            created = gitops.ensure_hosted(
                self.paths.hosted_repo(comp.name),
                comp.branch,
                comp.name,
                self.paths.inbox,
                self.config.daemon.push_feedback_wait,
            )
            if created:
                self.store.event(
                    "repo.created",
                    f"hosted repository for {comp.name} created at "
                    f"{self.paths.hosted_repo(comp.name)}",
                    component=comp.name,
                )
        elif comp.local and comp.watch and comp.url is not None:
            repo = local_path(comp.url)
            self.watcher.add(
                f"repo:{comp.name}",
                [(repo / "refs" / "heads", True), (repo, False)],
                functools.partial(self.notify, PushNotice(comp.name, None, None, "watch")),
                accept=is_ref_change,
            )

    def reload(self, new: Config) -> tuple[list[str], list[str], list[str]]:
        """Apply a reloaded config: (added, removed, moved) component names.

        Removed and moved components stop being watched; added and moved ones are set up
        (their versions stay in the state either way).
        """
        before = {c.name: c for c in self.config.components}
        after = {c.name: c for c in new.components}
        removed = [n for n in before if n not in after]
        moved = [n for n in after if n in before and _source_of(after[n]) != _source_of(before[n])]
        added = [n for n in after if n not in before]
        for name in removed + moved:
            self.watcher.remove(f"repo:{name}")
        self.config = new
        self.setup([after[n] for n in added + moved])
        for comp in new.components:  # the others' hooks: a changed daemon.push_feedback_wait
            if comp.hosted and comp.name not in added + moved:
                try:
                    gitops.install_hook(
                        self.paths.hosted_repo(comp.name),
                        comp.name,
                        self.paths.inbox,
                        new.daemon.push_feedback_wait,
                    )
                except (DeploydError, OSError) as exc:
                    log.warning("component %s: hook not updated: %s", comp.name, exc)
        return added, removed, moved

    def reconcile(self) -> int:
        """Queue every component whose branch head has no build yet (pushes while stopped)."""
        queued = 0
        for comp in self.config.components:
            if self.pauses.component(comp.name):
                continue
            if not comp.local:
                continue  # remote components are reconciled by their first poll
            repo = self.pipeline.repo_path(comp)
            try:
                head = gitops.head(repo, comp.branch)
            except Exception as exc:
                log.warning("cannot read %s: %s", repo, exc)
                continue
            if (
                head
                and not self.store.has_final_build(comp.name, head)
                and self.notify(PushNotice(comp.name, None, head, "reconcile"))
            ):
                queued += 1
        return queued


def _source_of(comp: ComponentConfig) -> tuple[str | None, str, bool]:
    """What decides how a component is watched; a change re-creates its watch."""
    return (comp.url, comp.branch, comp.watch)
