"""Fixtures for webhook and polling tests: bare "hosting service" repositories, git daemon."""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Daemon, Work, free_port, git, make_component, wait_until


@pytest.fixture
def remote(tmp_path: Path) -> Callable[..., Work]:
    """remote(name) → a working clone whose initial commit is pushed to a new bare repository
    (work.remote), standing in for the repository on a hosting service."""

    def make(name: str = "hello", base: Path | None = None) -> Work:
        bare = (base or tmp_path / "remotes") / f"{name}.git"
        bare.parent.mkdir(parents=True, exist_ok=True)
        git("init", "-q", "--bare", "-b", "main", str(bare))
        work = make_component(tmp_path / "work" / name)
        work.remote = bare
        work.push()
        return work

    return make


def events(d: Daemon, kind: str | None = None, sha: str | None = None) -> list[dict[str, Any]]:
    """Rows of the daemon's event log (read-only, like the CLI)."""
    db = d.state_dir / "deployd.db"
    if not db.exists():
        return []
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    conn.row_factory = sqlite3.Row
    try:
        sql, params = "SELECT * FROM events WHERE 1=1", []
        if kind:
            sql += " AND kind = ?"
            params.append(kind)
        if sha:
            sql += " AND sha = ?"
            params.append(sha)
        return [dict(r) for r in conn.execute(sql + " ORDER BY id", params)]
    finally:
        conn.close()


def builds_of(d: Daemon, name: str, sha: str) -> list[dict[str, Any]]:
    return [b for b in d.builds(name) if b["sha"] == sha]


class GitDaemon:
    """`git daemon` serving `base` on a loopback port: a real remote git:// transport."""

    def __init__(self, base: Path, port: int) -> None:
        self.base = base
        self.port = port
        self.proc: subprocess.Popen[bytes] | None = None

    def url(self, name: str) -> str:
        return f"git://127.0.0.1:{self.port}/{name}.git"

    def start(self) -> GitDaemon:
        self.proc = subprocess.Popen(
            [
                "git",
                "daemon",
                "--reuseaddr",
                "--listen=127.0.0.1",
                f"--port={self.port}",
                f"--base-path={self.base}",
                "--export-all",
                str(self.base),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

        def up() -> bool:
            probe = subprocess.run(
                ["git", "ls-remote", f"git://127.0.0.1:{self.port}/none.git"],
                capture_output=True,
                text=True,
                check=False,
            )
            return "Connection refused" not in probe.stderr

        wait_until(up, timeout=30)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None


def _has_git_daemon() -> bool:
    try:
        out = subprocess.run(["git", "--exec-path"], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return False
    return (Path(out.stdout.strip()) / "git-daemon").exists() and shutil.which("git") is not None


@pytest.fixture
def git_daemon(tmp_path: Path) -> Iterator[Callable[..., GitDaemon]]:
    """git_daemon(start=True) → a GitDaemon serving tmp_path/remotes (skips without git-daemon)."""
    if not _has_git_daemon():
        pytest.skip("git-daemon is not installed (Debian: git-daemon-run or git-core)")
    made: list[GitDaemon] = []

    def make(start: bool = True) -> GitDaemon:
        base = tmp_path / "remotes"
        base.mkdir(parents=True, exist_ok=True)
        gd = GitDaemon(base, free_port())
        made.append(gd)
        return gd.start() if start else gd

    yield make
    for gd in made:
        gd.stop()
