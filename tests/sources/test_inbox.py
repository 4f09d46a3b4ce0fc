"""The post-receive hook and its inbox: records survive a stopped daemon and never fail a push."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

from deployd.sources.inbox import Inbox, parse_record
from deployd.types import PushNotice
from tests.conftest import Daemon, Work, git

A = "a" * 40
B = "b" * 40


def test_parse_record() -> None:
    text = f"component hello\n{A} {B} refs/heads/main\n{B} {A} refs/heads/feat/x\n"
    assert parse_record(text) == [
        PushNotice("hello", "refs/heads/main", B, "hook"),
        PushNotice("hello", "refs/heads/feat/x", A, "hook"),
    ]


def test_parse_record_skips_what_it_cannot_read() -> None:
    assert parse_record("") == []
    assert parse_record("not a record\n") == []
    notices = parse_record(f"component hello\ngarbage\n\n{A} {B} refs/heads/main\n")
    assert [n.sha for n in notices] == [B]


def test_inbox_drain_hands_on_complete_records_and_deletes_them(tmp_path: Path) -> None:
    tmp_path = tmp_path / "inbox"
    tmp_path.mkdir()
    (tmp_path / "push.1").write_text(f"component hello\n{A} {B} refs/heads/main\n")
    (tmp_path / "push.2").write_text(f"component other\n{B} {A} refs/heads/main\n")
    (tmp_path / ".tmp.3").write_text("component hello\n")  # still being written by the hook
    seen: list[PushNotice] = []
    assert Inbox(tmp_path, seen.append).drain() == 2
    assert [(n.component, n.sha) for n in seen] == [("hello", B), ("other", A)]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".tmp.3"]


def test_hook_never_fails_a_push_when_the_daemon_is_gone(
    daemon_factory: Callable[..., Daemon], component: Callable[..., Work]
) -> None:
    d = daemon_factory().start()
    assert d.stop() == 0
    # even with its inbox folder removed, the push succeeds
    inbox = d.state_dir / "inbox"
    inbox.rmdir()
    work = component()
    work.push(d.hosted("hello"))
    assert not inbox.exists()


def test_hosted_push_while_stopped_is_built_at_start(
    daemon_factory: Callable[..., Daemon], component: Callable[..., Work]
) -> None:
    d = daemon_factory().start()  # creates the hosted repository and its hook
    assert d.stop() == 0
    work = component()
    sha = work.push(d.hosted("hello"))
    records = list((d.state_dir / "inbox").glob("push.*"))
    assert len(records) == 1
    assert records[0].read_text() == f"component hello\n{'0' * 40} {sha} refs/heads/main\n"
    d.start()
    comp = d.wait_recent("hello", sha)
    assert comp["recent"]["version"] == 1
    assert d.builds("hello")[0]["source"] in ("hook", "reconcile")
    assert list((d.state_dir / "inbox").glob("push.*")) == []


def test_the_hook_is_fast_and_quiet(
    daemon: Daemon, component: Callable[..., Work], tmp_path: Path
) -> None:
    """The hook's output is what a pushing user sees: nothing, and exit 0."""
    work = component()
    proc = subprocess.run(
        ["git", "push", str(daemon.hosted("hello")), "HEAD:refs/heads/main"],
        cwd=work.path,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 0
    assert "remote:" not in proc.stderr
    daemon.wait_recent("hello", git("rev-parse", "HEAD", cwd=work.path))
