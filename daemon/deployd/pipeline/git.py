"""Git operations of the pipeline (blocking: call them from a worker thread).

GitPython runs git with an argument list, never through a shell, so a ref, name or path
given here can never be interpreted as shell syntax. Shas are validated before use.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import stat
import tarfile
from importlib import resources
from pathlib import Path

import git
from git.exc import GitCommandError, InvalidGitRepositoryError, NoSuchPathError

from ..errors import GitError

SHA_RE = re.compile(r"^(?:[0-9a-f]{40}|[0-9a-f]{64})$")
ZERO_SHA_RE = re.compile(r"^0+$")


def is_sha(value: str) -> bool:
    return bool(SHA_RE.match(value))


def hook_source() -> bytes:
    """The project's post-receive hook (shipped inside the package)."""
    return resources.files("deployd").joinpath("hooks/post-receive").read_bytes()


def _repo(path: Path) -> git.Repo:
    try:
        return git.Repo(path)
    except (InvalidGitRepositoryError, NoSuchPathError) as exc:
        raise GitError(f"{path} is not a git repository") from exc


def install_hook(repo_path: Path, component: str, inbox: Path) -> None:
    """Install deployd's post-receive hook into a bare repository, for `component`."""
    repo = _repo(repo_path)
    if not repo.bare:
        raise GitError(f"{repo_path} is not a bare repository (hooks go into the server side)")
    with repo.config_writer() as cw:
        cw.set_value("deployd", "component", component)
        cw.set_value("deployd", "inbox", str(inbox))
    hooks = repo_path / "hooks"
    hooks.mkdir(exist_ok=True)
    target = hooks / "post-receive"
    if target.exists() and b"deployd post-receive hook" not in target.read_bytes():
        backup = hooks / "post-receive.before-deployd"
        if not backup.exists():
            target.rename(backup)
    tmp = hooks / ".post-receive.deployd-tmp"
    tmp.write_bytes(hook_source())
    tmp.chmod(tmp.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    os.replace(tmp, target)


def ensure_hosted(repo_path: Path, branch: str, component: str, inbox: Path) -> bool:
    """Create the hosted bare repository if missing and (re)install its hook. True if created."""
    created = False
    if not (repo_path / "HEAD").exists():
        repo_path.parent.mkdir(parents=True, exist_ok=True)
        try:
            git.Repo.init(repo_path, bare=True, initial_branch=branch)
        except GitCommandError as exc:
            raise GitError(f"cannot create {repo_path}: {exc.stderr.strip()}") from exc
        created = True
    install_hook(repo_path, component, inbox)
    return created


def head(repo_path: Path, branch: str) -> str | None:
    """The sha of `refs/heads/<branch>`, or None when the branch does not exist."""
    repo = _repo(repo_path)
    try:
        out = repo.git.rev_parse("--verify", "--quiet", f"refs/heads/{branch}^{{commit}}")
    except GitCommandError:
        return None
    sha = out.strip()
    return sha if is_sha(sha) else None


def has_commit(repo_path: Path, sha: str) -> bool:
    if not is_sha(sha):
        return False
    try:
        _repo(repo_path).git.cat_file("-e", f"{sha}^{{commit}}")
    except GitCommandError:
        return False
    return True


def export(repo_path: Path, sha: str, dest: Path) -> None:
    """Write the tree of commit `sha` (exactly that commit) into the empty folder `dest`."""
    if not is_sha(sha):
        raise GitError(f"{sha!r} is not a commit sha")
    repo = _repo(repo_path)
    buf = io.BytesIO()
    try:
        repo.archive(buf, sha, format="tar")
    except GitCommandError as exc:
        raise GitError(f"cannot export {sha[:12]}: {exc.stderr.strip()}") from exc
    buf.seek(0)
    dest.mkdir(parents=True, exist_ok=True)
    try:
        with tarfile.open(fileobj=buf, mode="r:") as tar:
            # The "data" filter refuses absolute paths, '..' and links leaving the tree.
            tar.extractall(dest, filter="data")
    except (tarfile.TarError, OSError) as exc:
        shutil.rmtree(dest, ignore_errors=True)
        raise GitError(f"cannot unpack commit {sha[:12]}: {exc}") from exc
