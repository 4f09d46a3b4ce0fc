"""`deployd plan`: what a push of a commit (or of a working tree) would do, before it is made.

The commit is exported (or the tree copied) into a scratch folder and built exactly as a
push's build is (`pipeline/tree.py`: clean environment, build_timeout, the default Node
build), then every flow a new version would redeploy is drafted in memory against the built
`component.json` — validated, schema-checked (`schema.py`) and given the action the deployer
would take (`deployer.decide`). Nothing is registered: no build row, no version, no draft,
no event; the scratch folder is removed afterwards (a daemon killed meanwhile empties
`state_dir/builds` at its next start).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import shutil
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from ..config import ComponentConfig, Config
from ..errors import BuildError, ComponentError, DeploydError, GitError
from ..pipeline import build as builder
from ..pipeline.tree import build_tree, component_root, semver_check, unchanged_paths
from ..store import FlowStore, Row, Store
from ..toolchains import git as gitops
from ..toolchains.env import log_tail
from . import canary
from .deployer import NEEDS_ATTENTION, PUBLISH, affected, decide
from .drafts import Drafts
from .metadata import Metadata
from .model import Step

EXIT_OK, EXIT_BUILD_FAILED, EXIT_NEEDS_ATTENTION = 0, 1, 3
NEW = "(new)"

# (component, sha or None) -> (the repository to export from, the commit's full sha)
Resolve = Callable[[ComponentConfig, str | None], Awaitable[tuple[Path, str]]]


class PlanError(DeploydError):
    """A plan cannot be made (unknown component, no such commit): nothing was built."""

    exit_code = 2


class Planner:
    """Trial builds and in-memory drafts for `deployd plan` (daemon or CLI)."""

    def __init__(
        self,
        config: Config,
        store: Store,
        scratch: Path | None,
        *,
        paused: Callable[[str], bool],
        metadata: Metadata | None = None,
        resolve: Resolve | None = None,
        slots: asyncio.Semaphore | None = None,
    ) -> None:
        self.config = config
        self.store = store
        self.scratch = scratch  # None: a private temporary folder
        self.paused = paused
        self.metadata = metadata  # None: dynamic metadata is not asked (no runtime)
        self.resolve = resolve  # None: only working trees (`--dir`)
        self.slots = slots  # the pipeline's build slots: a plan builds like a push
        self.drafts = Drafts(config, store)

    def component(self, name: str) -> ComponentConfig:
        comp = self.config.component(name)
        if comp is None:
            known = ", ".join(c.name for c in self.config.components) or "none"
            raise PlanError(f"unknown component {name!r} (known: {known})")
        return comp

    async def plan(
        self, component: str, sha: str | None = None, tree: Path | None = None
    ) -> dict[str, Any]:
        """The plan object (`deployd plan --json`, `POST /api/v1/plan/{component}`)."""
        comp = self.component(component)
        if sha is not None and tree is not None:
            raise PlanError("give a commit (--sha) or a working tree (--dir), not both")
        repo: Path | None = None
        if tree is None:
            if self.resolve is None:
                raise PlanError("this planner builds working trees only (--dir)")
            repo, sha = await self.resolve(comp, sha)
        base = self.scratch
        if base is not None:
            base.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix="plan-", dir=base))
        try:
            return await self._plan(comp, repo, sha, tree, work)
        finally:
            await asyncio.to_thread(shutil.rmtree, work, True)

    async def _plan(
        self,
        comp: ComponentConfig,
        repo: Path | None,
        sha: str | None,
        tree: Path | None,
        work: Path,
    ) -> dict[str, Any]:
        out: dict[str, Any] = {
            "component": comp.name,
            "sha": sha,
            "dir": str(tree) if tree is not None else None,
            "semver": None,
            "build": {"ok": False, "seconds": None, "error": None, "warnings": []},
            "flows": [],
            "notes": [],
        }
        if tree is None:
            assert repo is not None and sha is not None
            ignored = await asyncio.to_thread(unchanged_paths, self.store, comp, repo, sha)
            if ignored is not None:  # as a push of it would be: nothing built, nothing changes
                out["notes"].append(ignored)
                out["build"].update(ok=True, seconds=0.0)
                return _finish(out, EXIT_OK, "nothing built")
        src = work / "src"
        log_path = work / "build.log"
        started = time.monotonic()
        try:
            with log_path.open("wb") as logf:
                what = sha or f"the working tree {tree}"
                logf.write(f"[deployd: plan build of {comp.name} at {what}]\n".encode())
                if tree is not None:
                    await asyncio.to_thread(gitops.copy_worktree, tree, src)
                else:
                    assert repo is not None and sha is not None
                    await asyncio.to_thread(gitops.export, repo, sha, work / "tree")
                    await asyncio.to_thread(component_root, work / "tree", comp, sha, src)
                async with self.slots if self.slots is not None else contextlib.nullcontext():
                    desc, warnings = await build_tree(
                        self.config,
                        comp,
                        src,
                        logf,
                        sha or "0" * 40,
                        deadline=time.monotonic() + comp.build_timeout,
                        check=semver_check(self.store, comp.name),
                    )
        except (ComponentError, GitError, BuildError) as exc:
            out["build"].update(
                seconds=round(time.monotonic() - started, 3), error=_why(exc, log_path)
            )
            out["log_tail"] = log_tail(log_path, 4000)
            return _finish(out, EXIT_BUILD_FAILED, "build failed")
        out["build"].update(
            ok=True, seconds=round(time.monotonic() - started, 3), warnings=warnings
        )
        out["semver"] = desc.version
        version = self.store.next_version_number(comp.name)
        dumped = desc.model_dump(mode="json", exclude_none=True)
        extra = {(comp.name, version): dumped}
        row: Row = {
            "component": comp.name,
            "version": version,
            "sha": sha,
            "runtime": desc.runtime or "python",
            "descriptor": dumped,
            "artifact_dir": str(src),
        }
        label = _Label(comp.name, version)
        fs = FlowStore(self.store)
        dynamic_skipped = False
        for flow, fv in affected(fs, comp.name, version):
            before = [Step.model_validate(s) for s in fv["steps"]]
            after = self.drafts.with_version(fv["steps"], comp.name, version)
            problems = self.drafts.validate(after, extra, before)
            refused = {s.id for s in after if any(p.startswith(f"step {s.id}: ") for p in problems)}
            if self.metadata is not None:
                problems += await self.metadata.problems(
                    after, skip=refused, rows={(comp.name, version): row}
                )
            elif any(_dynamic(extra, s) for s in after):
                dynamic_skipped = True
            edges = self.drafts.schema_edges(before, after, extra, label=label)
            problems += [p for e in edges for p in e.problems]
            problems = [label.sub(p) for p in problems]
            action = decide(self.config, flow, problems, self.paused(flow["name"]))
            # A publish of a flow with [canary]: tried on a share of the messages first, or
            # switched at once (and why) — as `Publisher.publish` would do it.
            trial, at_once = canary.plan(
                fv["spec"], fv["spec"], fv["steps"], [s.model_dump() for s in after]
            )
            why = action.why
            if action.kind == PUBLISH and trial is not None:
                why = trial.text()
            elif action.kind == PUBLISH and at_once:
                why = f"at once, no canary: {at_once}"
            out["flows"].append(
                {
                    "flow": flow["name"],
                    "update": flow["update"],
                    "version": flow["active_version"],
                    "changes": [
                        {
                            "step": b.id,
                            "component": b.component,
                            "function": b.function,
                            "from": b.version,
                            "to": None,
                        }
                        for b, a in zip(before, after, strict=True)
                        if b.version != a.version
                    ],
                    "valid": not problems,
                    "problems": problems,
                    "schema": [e.as_json() for e in edges],
                    "action": action.kind,
                    "why": "" if action.kind == NEEDS_ATTENTION else why,
                    "canary": trial.as_json()
                    if trial is not None and action.kind == PUBLISH
                    else None,
                }
            )
        if dynamic_skipped:
            out["notes"].append(
                "dynamic metadata (getMetaModel) was not checked: a local plan of a working "
                "tree runs no step process; plan a pushed commit through the daemon for it"
            )
        if any(f["action"] == NEEDS_ATTENTION for f in out["flows"]):
            return _finish(out, EXIT_NEEDS_ATTENTION, NEEDS_ATTENTION)
        if not out["flows"]:
            return _finish(out, EXIT_OK, "no flow affected")
        if all(f["action"] == PUBLISH for f in out["flows"]):
            return _finish(out, EXIT_OK, PUBLISH)
        return _finish(out, EXIT_OK, "no flow needs attention")


class _Label:
    """Names the trial build `hello (new)` where messages would say `hello v5`."""

    def __init__(self, component: str, version: int) -> None:
        self.component, self.version = component, version
        self._re = re.compile(rf"\b{re.escape(component)} v{version}\b")

    def __call__(self, component: str, version: int | None) -> str:
        if (component, version) == (self.component, self.version):
            return f"{component} {NEW}"
        return f"{component} v{version}"

    def sub(self, text: str) -> str:
        return self._re.sub(f"{self.component} {NEW}", text)


def _dynamic(extra: dict[tuple[str, int], dict[str, Any]], step: Step) -> bool:
    desc = extra.get((step.component, step.version or 0))
    if desc is None:
        return False
    for group in ("triggers", "actions"):
        func = (desc.get(group) or {}).get(step.function)
        if isinstance(func, dict) and func.get("dynamicMetadata") is True:
            return True
    return False


def _why(exc: Exception, log_path: Path) -> str:
    if isinstance(exc, builder.CommandFailed) and exc.explained:
        return str(exc)
    if isinstance(exc, BuildError):
        tail = log_tail(log_path, 600).strip().splitlines()[-6:]
        detail = " | ".join(x for x in tail if x.strip() and not x.startswith("[deployd:"))
        return f"{exc}" + (f"; last output: {detail}" if detail else "")
    return str(exc)


def _finish(out: dict[str, Any], code: int, result: str) -> dict[str, Any]:
    out["result"] = result
    out["exit_code"] = code
    return out
