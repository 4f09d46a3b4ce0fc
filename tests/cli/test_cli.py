"""The command line: the status contract, JSON outputs, one-line errors, hook install, serve."""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.conftest import DEPLOYD, Daemon, Work, default_descriptor, wait_until

ISO = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(\+00:00|Z)$")
SHA = re.compile(r"^[0-9a-f]{40}$")


def assert_status_shape(data: dict[str, Any]) -> None:
    """The contract of `deployd status --json` (issue 2), key for key, with its types."""
    # later issues add keys (e.g. "paused", "poll"); issue 2's are all there, with their types
    assert {"daemon", "components", "flows"} <= set(data)
    assert {"running", "pid", "listen"} <= set(data["daemon"])
    assert isinstance(data["daemon"]["running"], bool)
    assert data["daemon"]["pid"] is None or isinstance(data["daemon"]["pid"], int)
    assert isinstance(data["daemon"]["listen"], str)
    assert isinstance(data["flows"], list)
    for comp in data["components"]:
        assert {"name", "branch", "url", "recent", "last_build"} <= set(comp)
        assert "hosted" not in comp
        assert isinstance(comp["name"], str) and isinstance(comp["branch"], str)
        assert isinstance(comp["url"], str)
        recent = comp["recent"]
        if recent is not None:
            assert {"version", "sha", "semver", "built_at"} <= set(recent)
            assert isinstance(recent["version"], int)
            assert SHA.match(recent["sha"])
            assert recent["semver"] is None or isinstance(recent["semver"], str)
            assert ISO.match(recent["built_at"])
        build = comp["last_build"]
        if build is not None:
            assert {"id", "sha", "status", "error"} <= set(build)
            assert isinstance(build["id"], int)
            assert SHA.match(build["sha"])
            assert build["status"] in ("queued", "building", "succeeded", "failed")
            assert build["error"] is None or isinstance(build["error"], str)


def assert_one_line_error(proc: subprocess.CompletedProcess[str], code: int = 1) -> str:
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("deployd: error: ")
    return lines[0]


def status_json(d: Daemon) -> dict[str, Any]:
    return dict(json.loads(d.cli("status", "--json").stdout))


def test_status_contract_with_the_daemon_stopped_and_running(
    daemon_factory: Callable[..., Daemon], component: Callable[..., Work]
) -> None:
    d = daemon_factory([{"name": "hello"}, {"name": "other", "branch": "release"}])
    # never started: no state dir yet, and status does not create one
    d.write_config()
    data = status_json(d)
    assert_status_shape(data)
    assert not d.state_dir.exists()
    assert data["daemon"]["running"] is False and data["daemon"]["pid"] is None
    assert data["daemon"]["listen"] == f"127.0.0.1:{d.port}"
    assert [c["name"] for c in data["components"]] == ["hello", "other"]
    assert data["components"][1]["branch"] == "release"
    assert data["components"][0]["url"] == str(d.hosted("hello"))
    assert all(c["recent"] is None and c["last_build"] is None for c in data["components"])

    d.start()
    assert d.proc is not None
    work = component()
    sha = work.push(d.hosted("hello"))
    d.wait_recent("hello", sha)
    running = status_json(d)
    assert_status_shape(running)
    assert running["daemon"]["running"] is True
    assert running["daemon"]["pid"] == d.proc.pid
    hello = running["components"][0]
    assert hello["recent"]["version"] == 1 and hello["recent"]["sha"] == sha
    assert hello["last_build"]["status"] == "succeeded" and hello["last_build"]["sha"] == sha
    # the HTTP API serves the same object
    api = d.status()
    assert api["components"] == running["components"]

    assert d.stop() == 0
    stopped = status_json(d)
    assert_status_shape(stopped)
    assert stopped["daemon"]["running"] is False and stopped["daemon"]["pid"] is None
    assert stopped["components"] == running["components"]


def test_status_human_output(daemon: Daemon, component: Callable[..., Work]) -> None:
    sha = component().push(daemon.hosted("hello"))
    daemon.wait_recent("hello", sha)
    out = daemon.cli("status").stdout
    assert "daemon running" in out
    assert re.search(rf"hello\s+main\s+v1\s+{sha[:12]}", out), out
    # an error holding rich markup is printed as written, not interpreted (nor a crash)
    work = Work(path=Path(daemon.root.parent / "work" / "hello"), remote=daemon.hosted("hello"))
    bad = work.commit_push(
        "markup", {"component.json": default_descriptor(build="echo '[/red] [bold]x'; exit 4")}
    )
    daemon.wait_build("hello", bad)
    out = daemon.cli("status").stdout
    assert "failed: build command" in out and "[/red] [bold]x" in out
    daemon.stop()
    assert "daemon not running" in daemon.cli("status").stdout


def test_versions_builds_and_build_log(daemon: Daemon, component: Callable[..., Work]) -> None:
    work = component()
    work.remote = daemon.hosted("hello")
    first = work.push()
    daemon.wait_recent("hello", first)
    second = work.commit_push("second", {"component.json": {"title": "x"}})  # invalid
    daemon.wait_build("hello", second)

    versions = json.loads(daemon.cli("versions", "hello", "--json").stdout)
    assert len(versions) == 1
    keys = {"version", "sha", "semver", "runtime", "built_at", "recent", "warnings"}
    assert set(versions[0]) == keys | {"same_semver_as"}
    assert versions[0]["warnings"] == [] and versions[0]["same_semver_as"] is None
    assert versions[0]["version"] == 1 and versions[0]["sha"] == first
    assert versions[0]["recent"] is True and versions[0]["runtime"] == "python"
    assert ISO.match(versions[0]["built_at"])

    builds = json.loads(daemon.cli("builds", "--json").stdout)
    assert [b["sha"] for b in builds] == [second, first]
    keys = {"id", "component", "sha", "status", "version", "source", "error"}
    assert set(builds[0]) == keys | {"started_at", "finished_at"}
    assert builds[0]["status"] == "failed" and builds[0]["version"] is None
    assert "no triggers and no actions" in builds[0]["error"]
    assert builds[1]["status"] == "succeeded" and builds[1]["version"] == 1
    assert json.loads(daemon.cli("builds", "hello", "--json", "--limit", "1").stdout) == builds[:1]

    log = daemon.cli("build-log", str(builds[0]["id"])).stdout
    assert f"build {builds[0]['id']} of hello at {second}" in log
    assert "no triggers and no actions" in log
    human = daemon.cli("versions", "hello").stdout
    assert "v1" in human and first[:12] in human and "recent" in human
    assert "failed" in daemon.cli("builds").stdout


def test_errors_are_one_line_without_traceback(daemon_factory: Callable[..., Daemon]) -> None:
    d = daemon_factory()
    d.write_config()
    for args in (["versions", "nope"], ["builds", "nope"], ["versions", "Bad/../name"]):
        line = assert_one_line_error(d.cli(*args, check=False))
        assert "unknown component" in line and "known: hello" in line
    line = assert_one_line_error(d.cli("build-log", "12345", check=False))
    assert "no build 12345" in line
    line = assert_one_line_error(
        d.cli("hook", "install", str(d.root / "nothing.git"), "--component", "nope", check=False)
    )
    assert "unknown component 'nope'" in line
    # a config problem is exit 2, for every command that reads the config
    d.config_path.write_text('[daemon]\nstate_dir = "x"\nlisten = "bad"\n')
    for args in (["status"], ["versions", "hello"], ["builds"], ["serve"]):
        proc = d.cli(*args, check=False)
        assert proc.returncode == 2, args
        assert "daemon.listen: " in proc.stderr and "Traceback" not in proc.stderr


def test_usage_errors_exit_2_without_traceback(tmp_path: Path) -> None:
    for args in (["no-such-command"], ["build-log", "not-a-number"], ["versions"]):
        proc = subprocess.run([*DEPLOYD, *args], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2, args
        assert "Traceback" not in proc.stderr
        assert "Error" in proc.stderr


def test_hook_install_into_an_existing_bare_repository(
    daemon_factory: Callable[..., Daemon],
    component: Callable[..., Work],
    bare_repo: Callable[[str], Path],
) -> None:
    remote = bare_repo("served")
    hooks = remote / "hooks"
    hooks.mkdir(exist_ok=True)
    (hooks / "post-receive").write_text("#!/bin/sh\necho theirs\n")
    # watch off: only the hook reports pushes
    d = daemon_factory([{"name": "served", "url": str(remote), "watch": False}]).start()
    proc = d.cli("hook", "install", str(remote), "--component", "served")
    assert "installed" in proc.stdout
    assert (hooks / "post-receive.before-deployd").read_text() == "#!/bin/sh\necho theirs\n"
    work = component("served")
    work.remote = remote
    sha = work.push()
    d.wait_recent("served", sha)
    assert d.builds("served")[0]["source"] == "hook"
    # installing again is harmless
    d.cli("hook", "install", str(remote), "--component", "served")
    again = work.commit_push("again")
    d.wait_recent("served", again)


def test_hook_install_refuses_a_repository_the_component_does_not_build_from(
    daemon_factory: Callable[..., Daemon], bare_repo: Callable[[str], Path], tmp_path: Path
) -> None:
    remote = bare_repo("elsewhere")
    d = daemon_factory([{"name": "hello"}])
    d.write_config()
    line = assert_one_line_error(
        d.cli("hook", "install", str(remote), "--component", "hello", check=False)
    )
    assert f"deploys from {d.hosted('hello')}" in line
    assert not (remote / "hooks" / "post-receive").exists()
    work_tree = tmp_path / "not-bare"
    work_tree.mkdir()
    subprocess.run(["git", "init", "-q", str(work_tree)], check=True)
    d.components = [{"name": "hello", "url": str(work_tree)}]
    d.write_config()
    proc = d.cli("check-config", check=False)
    assert proc.returncode == 2 and "not a readable bare git repository" in proc.stderr


def test_a_second_serve_on_the_same_state_dir_fails_clearly(daemon: Daemon) -> None:
    assert daemon.proc is not None
    proc = daemon.cli("serve", check=False)
    line = assert_one_line_error(proc)
    assert f"another deployd (pid {daemon.proc.pid}) is already running" in line
    # the first one is unharmed
    assert daemon.status()["daemon"]["pid"] == daemon.proc.pid


def test_an_unusable_state_dir_is_a_clear_error(daemon_factory: Callable[..., Daemon]) -> None:
    d = daemon_factory()
    blocker = d.root / "blocker"
    blocker.write_text("a file where a folder should be")
    d.write_config()
    text = d.config_path.read_text().replace(str(d.state_dir), str(blocker / "var"))
    d.config_path.write_text(text)
    line = assert_one_line_error(d.cli("serve", check=False))
    assert f"state_dir {blocker / 'var'} is not usable" in line


def test_a_state_dir_not_writable_by_the_user_is_a_config_error(
    daemon_factory: Callable[..., Daemon],
) -> None:
    if os.geteuid() == 0:
        # root may write anywhere; the unusable-path case above covers the daemon's side
        read_only = Path("/proc/deployd-test-state")
        d = daemon_factory()
        d.write_config()
        text = d.config_path.read_text().replace(str(d.state_dir), str(read_only))
        d.config_path.write_text(text)
        line = assert_one_line_error(d.cli("serve", check=False))
        assert "is not usable" in line
        return
    d = daemon_factory()
    d.state_dir.mkdir()
    d.state_dir.chmod(0o500)
    try:
        d.write_config()
        proc = d.cli("serve", check=False)
        assert proc.returncode == 2
        assert "daemon.state_dir: " in proc.stderr and "not writable" in proc.stderr
    finally:
        d.state_dir.chmod(0o700)


def test_serve_stops_cleanly_on_sigint(daemon: Daemon) -> None:
    import signal

    assert daemon.stop(signal.SIGINT) == 0
    assert "deployd stopped" in daemon.log()
    assert not (daemon.state_dir / "deployd.pid").exists()
    wait_until(lambda: not status_json(daemon)["daemon"]["running"])


def test_an_unexpected_error_is_still_one_line(daemon_factory: Callable[..., Daemon]) -> None:
    """A state database from another (older) schema: no traceback, a hint, exit 1."""
    import sqlite3

    d = daemon_factory()
    d.write_config()
    d.state_dir.mkdir()
    conn = sqlite3.connect(d.state_dir / "deployd.db")
    conn.execute("CREATE TABLE builds (id INTEGER PRIMARY KEY)")
    conn.close()
    line = assert_one_line_error(d.cli("status", check=False))
    assert "OperationalError" in line and "deployd serve" in line
    proc = subprocess.run(
        [*DEPLOYD, "--debug", "status", "-c", str(d.config_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1 and "Traceback" in proc.stderr
