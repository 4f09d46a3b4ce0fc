"""Git operations of the pipeline (blocking: call them from a worker thread).

GitPython runs git with an argument list, never through a shell, so a ref, name or path
given here can never be interpreted as shell syntax. Shas are validated before use.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import re
import shutil
import stat
import subprocess
import sys
import tarfile
from importlib import resources
from pathlib import Path

import git
from git.exc import GitCommandError, InvalidGitRepositoryError, NoSuchPathError

from ..config import redact_url as redact
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


def install_hook(repo_path: Path, component: str, inbox: Path, feedback_wait: float = 0.0) -> None:
    """Install deployd's post-receive hook into a bare repository, for `component`.

    With `feedback_wait` > 0 the hook then follows the push for up to that many seconds
    (`deployd hook feedback`, run by this very interpreter on this very package, whatever
    the pusher's environment is: both are written into the repository's config)."""
    repo = _repo(repo_path)
    if not repo.bare:
        raise GitError(f"{repo_path} is not a bare repository (hooks go into the server side)")
    package_root = Path(__file__).resolve().parents[2]  # the folder holding `deployd/`
    with repo.config_writer() as cw:
        cw.set_value("deployd", "component", component)
        cw.set_value("deployd", "inbox", str(inbox))
        cw.set_value("deployd", "feedbackwait", f"{feedback_wait:g}")
        cw.set_value("deployd", "python", sys.executable)
        cw.set_value("deployd", "pythonpath", str(package_root))
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


def ensure_hosted(
    repo_path: Path, branch: str, component: str, inbox: Path, feedback_wait: float = 0.0
) -> bool:
    """Create the hosted bare repository if missing and (re)install its hook. True if created."""
    created = False
    if not (repo_path / "HEAD").exists():
        repo_path.parent.mkdir(parents=True, exist_ok=True)
        try:
            git.Repo.init(repo_path, bare=True, initial_branch=branch)
        except GitCommandError as exc:
            raise GitError(f"cannot create {repo_path}: {exc.stderr.strip()}") from exc
        created = True
    install_hook(repo_path, component, inbox, feedback_wait)
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


def commit_info(repo_path: Path, sha: str) -> dict[str, str] | None:
    """The subject, author and author date (ISO 8601) of commit `sha` in `repo_path` (for the
    dashboard and `status`); None when it cannot be read there (not a sha, no such commit or
    repository)."""
    if not is_sha(sha):
        return None
    try:
        out = _repo(repo_path).git.show("-s", "--format=%s%x00%an%x00%aI", sha, "--")
    except (GitError, GitCommandError, ValueError):
        return None
    subject, _, rest = out.partition("\0")
    author, _, at = rest.partition("\0")
    return {"subject": subject[:300], "author": author[:200], "at": at.strip()}


ABBREV_RE = re.compile(r"^[0-9a-f]{7,64}$")


def resolve_commit(repo_path: Path, value: str) -> str | None:
    """The full sha of the commit that `value` (a full or abbreviated sha, hex only: never a
    ref or an option) names in `repo_path`; None when it names none, or more than one."""
    value = value.strip().lower()
    if not ABBREV_RE.match(value):
        return None
    try:
        out = _repo(repo_path).git.rev_parse("--verify", "--quiet", f"{value}^{{commit}}")
    except GitCommandError:
        return None
    sha = out.strip()
    return sha if is_sha(sha) else None


def copy_worktree(src: Path, dest: Path) -> int:
    """Copy a working tree into the empty folder `dest`: in a git work tree the files git
    would commit (tracked, and untracked ones not ignored: uncommitted changes included,
    `node_modules` or `.venv` left out when ignored), elsewhere every file but `.git`.
    Symbolic links are copied as links. Returns the number of files copied."""
    if not src.is_dir():
        raise GitError(f"{src} is not a directory")
    try:
        listed = git.cmd.Git(str(src)).ls_files("-z", "--cached", "--others", "--exclude-standard")
        names = [n for n in listed.split("\0") if n]
    except GitCommandError:
        names = [
            str(p.relative_to(src))
            for p in sorted(src.rglob("*"))
            if ".git" not in p.relative_to(src).parts and (p.is_file() or p.is_symlink())
        ]
    dest.mkdir(parents=True, exist_ok=True)
    root = dest.resolve()
    copied = 0
    for name in names:
        source = src / name
        target = (dest / name).resolve() if not (dest / name).is_symlink() else dest / name
        if not target.is_relative_to(root):
            continue
        if not (source.is_file() or source.is_symlink()):
            continue  # listed by git but deleted in the work tree
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            shutil.copy2(source, target, follow_symlinks=False)
        except OSError as exc:
            raise GitError(f"cannot copy {source}: {exc.strerror}") from exc
        copied += 1
    return copied


# -- remote repositories: ls-remote and mirror fetches (async) -----------------------------
#
# The url always comes from the config, never from a webhook payload. git runs as an
# asyncio subprocess with an argument list (no shell), so it is killed on timeout or when
# the daemon stops; without a terminal prompt (a missing credential fails at once instead of
# hanging); and every message that may contain the url is redacted.

LS_REMOTE_TIMEOUT = 30.0
FETCH_TIMEOUT = 300.0


def _remote_env() -> dict[str, str]:
    env = dict(os.environ)
    env["GIT_TERMINAL_PROMPT"] = "0"
    # ssh: fail instead of asking (host key, passphrase) on a daemon without a terminal.
    env.setdefault("GIT_SSH_COMMAND", "ssh -o BatchMode=yes")
    env["LC_ALL"] = "C"
    return env


async def _run_git(args: list[str], url: str, timeout: float, cwd: Path | None = None) -> str:
    """Run git; raise GitError with a redacted, one-line reason on failure or timeout."""
    if url.startswith("-"):
        raise GitError(f"refusing url {redact(url)!r}: it starts with '-'")
    try:
        proc = await asyncio.create_subprocess_exec(
            "git",
            *args,
            cwd=cwd,
            env=_remote_env(),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
    except OSError as exc:
        raise GitError(f"cannot run git: {exc.strerror}") from exc
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except (TimeoutError, asyncio.CancelledError) as exc:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        if isinstance(exc, asyncio.CancelledError):
            raise
        raise GitError(f"git {args[0]} of {redact(url)} timed out after {timeout:g}s") from exc
    if proc.returncode != 0:
        text = err.decode("utf-8", "replace")
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        reason = "; ".join(lines[-3:]) or f"exit code {proc.returncode}"
        raise GitError(f"git {args[0]} of {redact(url)} failed: {redact(reason)}"[:500])
    return out.decode("utf-8", "replace")


async def ls_remote(url: str, branch: str, timeout: float = LS_REMOTE_TIMEOUT) -> str | None:
    """The sha of `refs/heads/<branch>` at `url` (None when the branch does not exist)."""
    ref = f"refs/heads/{branch}"
    out = await _run_git(["ls-remote", "--quiet", url, ref], url, timeout)
    for line in out.splitlines():
        sha, _, name = line.partition("\t")
        if name.strip() == ref and is_sha(sha.strip()):
            return sha.strip()
    return None


async def fetch_mirror(url: str, mirror: Path, branch: str, timeout: float = FETCH_TIMEOUT) -> None:
    """Fetch `branch` of `url` into the bare repository `mirror` (created when missing).

    The explicit refspec updates only that branch (forced, so a force-push is followed). No
    remote is configured and no FETCH_HEAD is written, so the url is stored nowhere.
    """
    if not (mirror / "HEAD").exists():
        mirror.parent.mkdir(parents=True, exist_ok=True)
        tmp = mirror.with_name(mirror.name + ".init")
        shutil.rmtree(tmp, ignore_errors=True)
        await _run_git(["init", "--quiet", "--bare", str(tmp)], url, 30)
        os.replace(tmp, mirror)
    refspec = f"+refs/heads/{branch}:refs/heads/{branch}"
    await _run_git(
        ["fetch", "--quiet", "--no-tags", "--no-write-fetch-head", "--", url, refspec],
        url,
        timeout,
        cwd=mirror,
    )


async def fetch_commit(url: str, mirror: Path, sha: str, timeout: float = FETCH_TIMEOUT) -> None:
    """Fetch the one commit `sha` (a full sha: a pull request's head on another branch) of
    `url` into `mirror`, without a ref (`deployd plan`; hosting services serve reachable
    commits by sha). GitError when the service does not."""
    if not is_sha(sha):
        raise GitError(f"{sha!r} is not a full commit sha")
    await _run_git(
        ["fetch", "--quiet", "--no-tags", "--no-write-fetch-head", "--", url, sha],
        url,
        timeout,
        cwd=mirror,
    )


def on_branch(repo_path: Path, branch: str, sha: str) -> bool:
    """True when commit `sha` is in `repo_path` and reachable from `refs/heads/<branch>`."""
    if not is_sha(sha) or not (repo_path / "HEAD").exists():
        return False
    try:
        proc = subprocess.run(
            ["git", "merge-base", "--is-ancestor", sha, f"refs/heads/{branch}"],
            cwd=repo_path,
            capture_output=True,
            timeout=30,
            check=False,
        )
    except (subprocess.TimeoutExpired, OSError):
        return False
    return proc.returncode == 0


def changes_under(repo_path: Path, base: str, sha: str, globs: tuple[str, ...]) -> bool | None:
    """Whether the tree of `sha` differs from that of `base` in any file matching one of
    `globs` (git glob pathspecs: `*` within a part, `**` across parts, `[...]`); None when it
    cannot be told (`base` missing, say), which the caller takes as "changed".

    The globs are checked by `config.repo_relative` and reach git as arguments with the
    `:(glob)` magic — never through a shell."""
    if not is_sha(base) or not is_sha(sha):
        return None
    pathspecs = [f":(glob){g}" for g in globs]
    try:
        proc = subprocess.run(
            [
                "git",
                "diff",
                "--quiet",
                "--no-ext-diff",
                "--no-textconv",
                base,
                sha,
                "--",
                *pathspecs,
            ],
            cwd=repo_path,
            capture_output=True,
            timeout=60,
            check=False,
            env={**os.environ, "GIT_LITERAL_PATHSPECS": "0", "LC_ALL": "C"},
        )
    except (subprocess.TimeoutExpired, OSError):
        return None
    if proc.returncode == 0:
        return False
    if proc.returncode == 1:
        return True
    return None
