"""Building one exported tree: `component.json`, then its build and test commands (or the
default Node build), then Python byte-compilation — what a push's build does between the
export and the registration. The pipeline's builds and `deployd plan`'s trial builds both
run this, so a plan builds exactly the way a push would (clean environment, process-group
timeout, capped log)."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from ..config import ComponentConfig, Config
from ..errors import BuildError, ComponentError
from ..store import Store
from ..toolchains import git as gitops
from ..toolchains import npm
from ..toolchains.env import clean_env
from ..toolchains.node import SHIM_DIR as NODE_SHIM_DIR
from ..toolchains.node import detect as node_detect
from . import build as builder
from . import descriptor
from .node_build import NodeBuild, note

Check = Callable[[descriptor.Descriptor], None]


async def build_tree(
    config: Config,
    comp: ComponentConfig,
    src: Path,
    logf: BinaryIO,
    sha: str,
    *,
    deadline: float,
    check: Check | None = None,
) -> tuple[descriptor.Descriptor, list[str]]:
    """Build the tree `src` of `comp` in place, within `deadline` (monotonic); its
    descriptor and the build's warnings. `check` sees the descriptor before anything runs.
    Raises ComponentError (bad component.json) or BuildError (a command failed)."""
    desc = await asyncio.to_thread(descriptor.load, src)
    if check is not None:
        check(desc)
    env = clean_env(src, {"DEPLOYD_COMPONENT": comp.name, "DEPLOYD_COMMIT": sha})
    commands = [("build", desc.build), ("test", desc.test)]
    warnings: list[str] = []
    if desc.runtime == "node":
        node = node_detect(config.daemon.node)
        if node.error is not None or node.path is None or node.version is None:
            raise BuildError(str(node.error))
        env["PATH"] = os.path.dirname(node.path) + os.pathsep + env["PATH"]
        env["NODE_PATH"] = str(NODE_SHIM_DIR)  # `npm test` can require the helper
        engines = npm.engines_warning(npm.package_json(src), node.version)
        if engines:
            note(logf, f"warning: {engines}")
            warnings.append(engines)
        if desc.build is None and npm.has_package_json(src):
            await NodeBuild(
                src,
                log=logf,
                env=env,
                deadline=deadline,
                budget=comp.build_timeout,
                node_test=config.daemon.node_test,
                test_command=desc.test,
            ).run()
            commands = []  # install, test, prune: done
    for what, command in commands:
        if command:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BuildError(f"build ran past build_timeout ({comp.build_timeout:g}s)")
            await builder.run_command(
                what,
                command,
                cwd=src,
                log=logf,
                timeout=remaining,
                env=env,
                budget=comp.build_timeout,
            )
    if desc.runtime == "python":
        mains = [f.main for f in (*desc.triggers.values(), *desc.actions.values())]
        await asyncio.to_thread(builder.compile_python, src, mains, logf)
    return desc, warnings


def semver_check(store: Store, component: str) -> Check:
    """A lower semver than the last registered one is refused; the same one is not (real
    components keep their `version` across many commits: a new sequence number)."""

    def check(desc: descriptor.Descriptor) -> None:
        if desc.version is None:
            return
        row = store.last_semver(component)
        if row and descriptor.semver_key(desc.version) < descriptor.semver_key(row["semver"]):
            raise ComponentError(
                f"component.json version: {desc.version} is lower than {row['semver']} "
                f"of {component} v{row['version']}; keep {row['semver']} or raise it"
            )

    return check


def component_root(tree: Path, comp: ComponentConfig, sha: str, dest: Path) -> None:
    """Move the component's folder of the exported `tree` (its `path`, or all of it) to
    `dest`: what the build sees and what becomes the version. Blocking."""
    root = tree
    if comp.path is not None:
        root = tree / comp.path
        inside = root.resolve().is_relative_to(tree.resolve())
        if not inside or root.is_symlink() or not root.is_dir():
            raise ComponentError(
                f"path {comp.path!r} of component {comp.name} is not a folder in commit"
                f" {sha[:12]} (check `path` in the config, or the commit)"
            )
    os.replace(root, dest)


def unchanged_paths(store: Store, comp: ComponentConfig, repo: Path, sha: str) -> str | None:
    """Why commit `sha` builds nothing for `comp` — it changes none of `comp.paths` since the
    recent version's commit — or None when it is to be built (no `paths`, no version yet, or
    the difference cannot be told). Blocking (git): pushes and `plan` both ask it."""
    if not comp.paths:
        return None
    recent = store.recent(comp.name)
    if recent is None or recent["sha"] == sha:
        return None
    if gitops.changes_under(repo, recent["sha"], sha, comp.paths) is not False:
        return None
    return (
        f"commit {sha[:12]} changes nothing under paths {', '.join(comp.paths)} since"
        f" v{recent['version']} ({recent['sha'][:12]}): nothing built"
    )
