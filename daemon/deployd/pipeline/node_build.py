"""The default build of a Node component that sets no `build`: like the platform's buildpack.

Install with dev dependencies (`npm ci`; when the npm in use refuses the lock file,
`npm install`, said in the build log), then the component's `test` command if it has one, else
`npm test` when package.json has a test script and `daemon.node_test` is on, then
`npm prune --omit=dev`: the artifact holds no dev dependencies. A failed npm command's error
names npm's reason (its `npm error` lines), not its usage text.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import BinaryIO

from ..config import format_duration
from ..errors import BuildError
from ..toolchains import npm
from . import build as builder


def note(log: BinaryIO, text: str) -> None:
    """A line of deployd's own in the build log."""
    log.write(f"[deployd: {text}]\n".encode())
    log.flush()


class NodeBuild:
    """One default build of the tree `src`; `run()` raises BuildError with the reason."""

    def __init__(
        self,
        src: Path,
        *,
        log: BinaryIO,
        env: dict[str, str],
        deadline: float,
        budget: float,
        node_test: bool,
        test_command: str | None,
    ) -> None:
        self.src = src
        self.log = log
        self.env = env
        self.deadline = deadline
        self.budget = budget
        self.node_test = node_test
        self.test_command = test_command

    async def _run(self, what: str, command: str | list[str]) -> builder.CommandResult:
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise BuildError(
                f"build ran past build_timeout ({format_duration(self.budget)}, for build and "
                "test together); raise build_timeout or make it faster"
            )
        return await builder.run_command(
            what,
            command,
            cwd=self.src,
            log=self.log,
            timeout=remaining,
            env=self.env,
            budget=self.budget,
        )

    async def _npm(self, what: str, argv: list[str]) -> None:
        """Run an npm command; its failure says npm's reason."""
        try:
            await self._run(what, argv)
        except builder.CommandFailed as exc:
            raise self._explained(exc, f"`npm {argv[1]}`") from None

    async def run(self) -> None:
        pkg = npm.package_json(self.src)
        if npm.has_lock_file(self.src):
            try:
                await self._run("install", npm.install_ci())
            except builder.CommandFailed as exc:
                if not npm.lock_refused(exc.output):
                    raise self._explained(exc, "`npm ci`") from None
                note(
                    self.log,
                    f"npm ci refused the lock file ({self._reason(exc)}); "
                    "installing with `npm install` instead",
                )
                await self._npm("install", npm.install())
        else:
            note(self.log, "no package-lock.json: installing with `npm install`")
            await self._npm("install", npm.install())
        if self.test_command:  # component.json `test` replaces npm test
            await self._run("test", self.test_command)
        elif npm.has_test_script(pkg):
            if self.node_test:
                await self._run("test", npm.test())
            else:
                note(self.log, "daemon.node_test is false: `npm test` not run")
        await self._npm("prune", npm.prune())

    def _reason(self, exc: builder.CommandFailed) -> str:
        """npm's reason, with paths inside the build's tree relative to it."""
        return npm.reason(exc.output).replace(str(self.src) + os.sep, "")

    def _explained(self, exc: builder.CommandFailed, what: str) -> builder.CommandFailed:
        why = self._reason(exc)
        if not why:
            return exc
        failed = builder.CommandFailed(
            f"{what} failed (exit code {exc.returncode}): {why}", exc.returncode, exc.output
        )
        failed.explained = True
        return failed
