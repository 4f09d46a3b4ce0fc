"""`git push` to a hosted repository reports back (issue 15): the post-receive hook records
the push, then prints what the daemon does with it as `remote:` lines, through real pushes
to a real daemon."""

from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Daemon, Work, git
from tests.flows.conftest import COUNTER_DESC, counter_files, flow_toml

pytestmark = pytest.mark.timeout(240)


def push(
    work: Work, daemon: Daemon, timeout: float = 90, ref: str = "refs/heads/main"
) -> tuple[str, list[str]]:
    """`git push` to the hosted repository: (the pushed sha, its `remote:` lines)."""
    proc = subprocess.run(
        ["git", "push", str(daemon.hosted("hello")), f"HEAD:{ref}"],
        cwd=work.path,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr
    remote = [
        line.removeprefix("remote:").strip()
        for line in proc.stderr.splitlines()
        if line.startswith("remote:")
    ]
    return git("rev-parse", "HEAD", cwd=work.path), remote


def started(daemon_factory: Callable[..., Daemon], **keys: Any) -> Daemon:
    return daemon_factory(push_feedback_wait=keys.pop("push_feedback_wait", "60s"), **keys).start()


def test_a_push_reports_its_build_and_each_flows_publish(
    daemon_factory: Callable[..., Daemon], component: Callable[..., Work], tmp_path: Path
) -> None:
    d = started(daemon_factory)
    work = component("hello")
    work.commit("counter component", counter_files())
    _sha, lines = push(work, d)
    text = "\n".join(lines)
    assert re.search(r"deployd: hello: build \d+ started \([0-9a-f]{12}\)", text), text
    assert re.search(r"deployd: hello: build \d+ succeeded: v1 in \d+\.\d s", text), text
    assert "deployd: nothing uses hello yet" in text, text

    out = tmp_path / "out.jsonl"
    (tmp_path / "counter.toml").write_text(flow_toml("counter", out))
    d.cli("flow", "apply", str(tmp_path / "counter.toml"))
    work.commit("v2 of the writer", counter_files("v2"))
    sha, lines = push(work, d)
    text = "\n".join(lines)
    # The build, then the flow's publish with its gap: the push waited for it.
    assert re.search(r"hello: build \d+ succeeded: v2 in ", text), text
    assert re.search(r"deployd: counter v2 published, gap \d+\.\d ms \(warm-up \d+ ms\)", text)
    assert d.recent_sha("hello") == sha

    # A failing build: the error and the last lines of its log.
    desc = {**COUNTER_DESC, "build": "echo compiling the thing; echo 'oops: it broke'; exit 3"}
    work.commit("broken build", {"component.json": desc})
    _sha, lines = push(work, d)
    text = "\n".join(lines)
    assert re.search(r"hello: build (\d+) failed: build command .* exited with code 3", text), text
    assert "deployd: last lines of the build log (`deployd build-log" in text, text
    assert "deployd:   | oops: it broke" in text, text
    assert "published" not in text

    # A version the flow cannot take: it needs attention, with the reason.
    desc = {**COUNTER_DESC, "actions": {"upper": COUNTER_DESC["actions"]["upper"]}}
    work.commit("the write action is gone", {"component.json": desc})
    _sha, lines = push(work, d)
    text = "\n".join(lines)
    assert re.search(r"hello: build \d+ succeeded: v3", text), text
    assert re.search(r"deployd: counter needs attention: .*write", text), text
    assert "published" not in text


def test_a_push_while_the_daemon_is_down_says_so_and_is_deployed_at_start(
    daemon_factory: Callable[..., Daemon], component: Callable[..., Work]
) -> None:
    d = started(daemon_factory)  # creates the hosted repository and installs its hook
    assert d.stop() == 0
    work = component("hello")
    begun = time.monotonic()
    sha, lines = push(work, d)
    assert lines == ["deployd: deployd is not running; this push will be deployed when it starts"]
    assert time.monotonic() - begun < 20  # it did not wait for the daemon
    d.start()
    d.wait_recent("hello", sha)

    # Running again: a push to another branch says which one deploys.
    _sha, lines = push(work, d, ref="refs/heads/feature")
    assert lines == ["deployd: refs/heads/feature is not deployed: hello deploys branch 'main'"], (
        lines
    )


def test_with_push_feedback_wait_0_a_push_prints_nothing(
    daemon_factory: Callable[..., Daemon], component: Callable[..., Work]
) -> None:
    d = started(daemon_factory, push_feedback_wait="0")
    work = component("hello")
    sha, lines = push(work, d)
    assert lines == []
    d.wait_recent("hello", sha)
    assert git("config", "--get", "deployd.feedbackwait", cwd=d.hosted("hello")) == "0"


def test_the_follower_stops_at_its_wait(
    daemon_factory: Callable[..., Daemon], component: Callable[..., Work]
) -> None:
    """A build longer than `push_feedback_wait`: the push ends after the wait, and says so."""
    d = started(daemon_factory, push_feedback_wait="2s")
    work = component("hello", descriptor={**COUNTER_DESC, "build": "sleep 30"})
    work.commit("counter", {k: v for k, v in counter_files().items() if k != "component.json"})
    begun = time.monotonic()
    _sha, lines = push(work, d)
    took = time.monotonic() - begun
    assert took < 15, took
    assert lines[-1].startswith("deployd: still under way after 2 s"), lines


# -- the follower on its own (a state dir made here; the lock held by this test) -----------


def _state(tmp_path: Path) -> tuple[Path, Any]:
    import fcntl
    import os

    from deployd.paths import Paths

    paths = Paths(tmp_path / "var")
    for folder in paths.dirs():
        folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(paths.lockfile, os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)  # "the daemon runs"
    return paths.inbox, fd


def test_the_follower_prints_the_noted_lines_until_the_push_is_finished(tmp_path: Path) -> None:
    import io
    import os

    from deployd.cli.feedback import follow
    from deployd.store import Store
    from deployd.store.pushes import PushStore

    inbox, fd = _state(tmp_path)
    store = Store.open(inbox.parent / "deployd.db")
    try:
        pushes = PushStore(store)
        pushes.note("push.1", opened=1)
        pushes.note("push.1", "hello: build 1 started (abc)")
        pushes.note("push.1", "line one\nline two", level="error", closed=1)
        pushes.note("push.2", "someone else's", opened=1)
        out = io.StringIO()
        follow(inbox, "push.1", 30, out)
        assert out.getvalue().splitlines() == [
            "deployd: hello: build 1 started (abc)",
            "deployd: line one",
            "deployd: line two",
        ]
        # Not finished: it stops at its wait, and says so (with a clock that runs fast).
        ticks = iter(range(0, 1000, 5))
        out = io.StringIO()
        follow(inbox, "push.2", 12, out, clock=lambda: float(next(ticks)), sleep=lambda _s: None)
        assert out.getvalue().splitlines()[-1].startswith("deployd: still under way after 12 s")
        # A record the daemon has not taken yet (kept in the inbox): that is what it says.
        (inbox / "push.3").write_text("component hello\n")
        ticks = iter(range(0, 1000, 5))
        out = io.StringIO()
        follow(inbox, "push.3", 12, out, clock=lambda: float(next(ticks)), sleep=lambda _s: None)
        assert "has not picked this push up within 12 s" in out.getvalue()
        # Names that are not a record of the inbox are not looked at; wait 0 prints nothing.
        for name, wait in (("../deployd.db", 30.0), ("push.1", 0.0), ("other", 30.0)):
            out = io.StringIO()
            follow(inbox, name, wait, out)
            assert out.getvalue() == ""
    finally:
        store.close()
        os.close(fd)
    out = io.StringIO()
    follow(inbox, "push.1", 30, out)  # the lock is free: the daemon is not running
    assert out.getvalue() == (
        "deployd: deployd is not running; this push will be deployed when it starts\n"
    )
