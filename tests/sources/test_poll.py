"""Polling: remote repositories (git daemon on loopback) mirrored and checked every interval."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import pytest

from deployd.errors import GitError
from deployd.sources.poll import next_delay
from deployd.toolchains import git as gitops
from tests.conftest import HTTP, Daemon, Work, free_port, git, wait_until
from tests.sources.conftest import GitDaemon, builds_of


def test_next_delay_jitters_by_ten_percent_and_backs_off_up_to_ten_times() -> None:
    assert next_delay(60, 0, lambda a, b: a) == pytest.approx(54)
    assert next_delay(60, 0, lambda a, b: b) == pytest.approx(66)
    assert [next_delay(60, n, lambda a, b: 1.0) for n in range(6)] == [60, 120, 240, 480, 600, 600]


def test_remote_url_is_polled_mirrored_and_a_push_found_within_one_interval(
    daemon_factory: Callable[..., Daemon],
    remote: Callable[..., Work],
    git_daemon: Callable[..., GitDaemon],
) -> None:
    work = remote("hello")
    gd = git_daemon()
    d = daemon_factory(
        components=[{"name": "hello", "url": gd.url("hello"), "poll_interval": "1s"}]
    ).start()
    d.wait_recent("hello", work.push())  # the first poll, at start, reconciles
    sha = work.commit_push("found by polling")
    d.wait_recent("hello", sha)
    # Found by a poll, and polls come one interval (+10 % jitter) apart: the daemon's own
    # schedule, not the wall-clock time to the build, which a loaded machine stretches.
    assert [b["source"] for b in builds_of(d, "hello", sha)] == ["poll"]
    poll = d.component_status("hello")["poll"]
    gap = datetime.fromisoformat(poll["next_at"]) - datetime.fromisoformat(poll["last_ok"])
    # 1 s ± 10 %, give or take the millisecond stamps and the poll's own bookkeeping
    assert 0.85 <= gap.total_seconds() <= 1.1 + 0.5
    mirror = d.state_dir / "mirrors" / "hello.git"
    assert git("rev-parse", "refs/heads/main", cwd=mirror) == sha
    # The url is configured nowhere in the mirror (nothing to leak, nothing to redirect).
    assert gd.url("hello") not in (mirror / "config").read_text()
    assert not (mirror / "FETCH_HEAD").exists()
    poll = d.component_status("hello")["poll"]
    assert poll["interval"] == 1.0 and poll["last_error"] is None
    assert poll["head"] == sha and poll["next_at"] > poll["last_ok"]
    assert d.component_status("hello")["url"] == gd.url("hello")


def test_poll_failures_back_off_show_in_status_and_recover(
    daemon_factory: Callable[..., Daemon],
    remote: Callable[..., Work],
    git_daemon: Callable[..., GitDaemon],
) -> None:
    work = remote("hello")
    gd = git_daemon(start=False)  # the hosting service is down
    d = daemon_factory(
        components=[{"name": "hello", "url": gd.url("hello"), "poll_interval": "500ms"}]
    ).start()

    def failing(times: int) -> dict[str, object] | None:
        poll = d.component_status("hello")["poll"]
        return poll if poll and poll["failures"] >= times else None

    poll = wait_until(lambda: failing(2), timeout=30)
    assert "git ls-remote" in poll["last_error"]["message"]
    assert poll["last_ok"] is None
    # After n failures the next poll waits 2^n intervals (±10 %), at most 10.
    gap = datetime.fromisoformat(poll["next_at"]) - datetime.fromisoformat(poll["last_error"]["at"])
    expected = 0.5 * min(2 ** poll["failures"], 10)
    assert 0.85 * expected <= gap.total_seconds() <= 1.15 * expected
    gd.start()  # the service is back: the next poll recovers by itself
    d.wait_recent("hello", work.push())
    poll = d.component_status("hello")["poll"]
    assert poll["failures"] == 0 and poll["last_error"] is None and poll["last_ok"]


def test_deployd_poll_checks_now(
    daemon_factory: Callable[..., Daemon],
    remote: Callable[..., Work],
    git_daemon: Callable[..., GitDaemon],
) -> None:
    work = remote("hello")
    gd = git_daemon()
    d = daemon_factory(
        components=[
            {"name": "hello", "url": gd.url("hello"), "poll_interval": "0"},
            {"name": "hosted"},
        ]
    ).start()
    d.wait_recent("hello", work.push())  # with polling off, remotes are still checked at start
    sha = work.commit_push("only deployd poll will notice")
    out = d.cli("poll", "hello").stdout
    assert f"hello: head {sha[:12]}, queued for build" in out
    d.wait_recent("hello", sha)
    assert "nothing new to build" in d.cli("poll").stdout
    refused = d.cli("poll", "hosted", check=False)
    assert refused.returncode == 1 and "not polled" in refused.stderr
    resp = HTTP.post(f"{d.url}/api/v1/poll", json={}, timeout=5)
    assert resp.status_code == 401
    resp = HTTP.post(
        f"{d.url}/api/v1/poll", json={}, headers={"Authorization": "Bearer nope"}, timeout=5
    )
    assert resp.status_code == 401
    assert len(builds_of(d, "hello", sha)) == 1


def test_unwatched_local_repository_is_polled(
    daemon_factory: Callable[..., Daemon], remote: Callable[..., Work]
) -> None:
    work = remote("hello")
    comp = {"name": "hello", "url": f"file://{work.remote}", "watch": False, "poll_interval": "1s"}
    d = daemon_factory(components=[comp]).start()
    d.wait_recent("hello", work.push())
    d.wait_recent("hello", work.commit_push("polled"))


def test_git_errors_never_show_credentials() -> None:
    url = f"https://deploy:s3cr3t-t0ken@127.0.0.1:{free_port()}/acme/billing.git"
    with pytest.raises(GitError) as err:
        asyncio.run(gitops.ls_remote(url, "main", timeout=20))
    assert "s3cr3t" not in str(err.value)
    assert "https://127.0.0.1:" in str(err.value)
    assert gitops.redact(f"fatal: unable to access '{url}/'") == (
        f"fatal: unable to access '{url.replace('deploy:s3cr3t-t0ken@', '')}/'"
    )


def test_fetch_mirror_follows_force_pushes(tmp_path: Path, remote: Callable[..., Work]) -> None:
    work = remote("hello")
    first = work.push()
    mirror = tmp_path / "mirror.git"
    url = f"file://{work.remote}"
    asyncio.run(gitops.fetch_mirror(url, mirror, "main"))
    assert gitops.head(mirror, "main") == first
    git("commit", "-q", "--amend", "-m", "rewritten", cwd=work.path)
    rewritten = work.push(None, None, "--force")
    asyncio.run(gitops.fetch_mirror(url, mirror, "main"))
    assert gitops.head(mirror, "main") == rewritten
    assert gitops.on_branch(mirror, "main", rewritten)
    assert not gitops.on_branch(mirror, "main", first)
