"""Bare repositories given by a local `url`: ref changes are watched, and reconciled at start."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from deployd.sources.watch import is_ref_change
from tests.conftest import Daemon, Work, db_rows, git, wait_until


def test_is_ref_change() -> None:
    assert is_ref_change("/srv/x.git/refs/heads/main")
    assert is_ref_change("/srv/x.git/refs/heads/feat/y")
    assert is_ref_change("/srv/x.git/packed-refs")
    assert not is_ref_change("/srv/x.git/refs/heads/main.lock")
    assert not is_ref_change("/srv/x.git/objects/ab/cdef")
    assert not is_ref_change("/srv/x.git/refs/tags/v1")


def test_a_push_no_hook_reports_is_noticed_within_seconds(
    daemon_factory: Callable[..., Daemon],
    component: Callable[..., Work],
    bare_repo: Callable[[str], Path],
) -> None:
    remote = bare_repo("lib")
    d = daemon_factory([{"name": "lib", "url": str(remote)}]).start()
    assert not (remote / "hooks" / "post-receive").exists()  # nothing but the watcher
    work = component("lib")
    work.remote = remote
    first = work.push()
    comp = d.wait_recent("lib", first)
    assert comp["url"] == str(remote)
    assert comp["recent"]["version"] == 1
    assert d.builds("lib")[0]["source"] == "watch"
    second = work.commit_push("second")
    d.wait_recent("lib", second)
    # a pack-refs run (git gc) rewrites packed-refs; the head did not move, nothing is built
    git("pack-refs", "--all", cwd=remote)
    third = work.commit_push("third")
    d.wait_recent("lib", third)
    assert [b["sha"] for b in d.builds("lib")] == [third, second, first]


def test_local_push_while_stopped_is_built_at_start(
    daemon_factory: Callable[..., Daemon],
    component: Callable[..., Work],
    bare_repo: Callable[[str], Path],
) -> None:
    remote = bare_repo("lib")
    work = component("lib")
    work.remote = remote
    first = work.push()  # before the daemon ever ran
    d = daemon_factory([{"name": "lib", "url": str(remote)}]).start()
    d.wait_recent("lib", first)
    assert d.builds("lib")[0]["source"] == "reconcile"
    assert d.stop() == 0
    second = work.commit_push("while stopped")
    d.start()
    comp = d.wait_recent("lib", second)
    assert comp["recent"]["version"] == 2


def test_a_deleted_local_branch_keeps_the_recent_version(
    daemon_factory: Callable[..., Daemon],
    component: Callable[..., Work],
    bare_repo: Callable[[str], Path],
) -> None:
    remote = bare_repo("lib")
    d = daemon_factory([{"name": "lib", "url": str(remote)}]).start()
    work = component("lib")
    work.remote = remote
    first = work.push()
    d.wait_recent("lib", first)
    git("update-ref", "-d", "refs/heads/main", cwd=remote)

    def noticed() -> bool:
        rows = db_rows(d.state_dir, "SELECT message FROM events WHERE kind = 'push.ignored'")
        return any("does not exist" in r["message"] for r in rows)

    wait_until(noticed)
    assert d.recent_sha("lib") == first
    assert d.stop() == 0  # also at start: a missing branch is not an error
    d.start()
    assert d.recent_sha("lib") == first
    again = work.commit_push("back")
    d.wait_recent("lib", again)
