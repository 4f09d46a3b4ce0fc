"""Build and test commands: clean environment, exit codes, timeout, capped log."""

from __future__ import annotations

import asyncio
import io
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from deployd.errors import BuildError
from deployd.pipeline.build import MAX_LOG_BYTES, CommandFailed, run_command
from deployd.toolchains.env import clean_env
from tests.conftest import Daemon, Work, db_rows, default_descriptor


def _started(daemon_factory: Callable[..., Daemon], **component_keys: Any) -> Daemon:
    return daemon_factory([{"name": "hello", **component_keys}]).start()


def _artifact(d: Daemon, sha: str) -> Path:
    rows = db_rows(d.state_dir, "SELECT artifact_dir FROM versions WHERE sha = ?", sha)
    return Path(rows[0]["artifact_dir"])


def test_build_then_test_run_in_the_exported_tree(
    daemon: Daemon, component: Callable[..., Work]
) -> None:
    work = component(
        descriptor=default_descriptor(
            build="echo built > out.txt && echo building-now", test="test -f out.txt"
        )
    )
    work.remote = daemon.hosted("hello")
    sha = work.push()
    comp = daemon.wait_recent("hello", sha)
    assert (_artifact(daemon, sha) / "out.txt").read_text() == "built\n"
    log = daemon.cli("build-log", str(comp["last_build"]["id"])).stdout
    assert "$ echo built > out.txt && echo building-now" in log
    assert "building-now" in log
    assert "$ test -f out.txt" in log
    assert log.index("$ echo built") < log.index("$ test -f")


def test_a_failing_test_fails_the_build_and_keeps_recent(
    daemon: Daemon, component: Callable[..., Work]
) -> None:
    work = component()
    work.remote = daemon.hosted("hello")
    good = work.push()
    daemon.wait_recent("hello", good)
    bad = work.commit_push(
        "tests fail",
        {
            "component.json": default_descriptor(
                build="echo built", test="echo 'assertion failed: 1 != 2'; exit 3"
            )
        },
    )
    build = daemon.wait_build("hello", bad)
    assert build["status"] == "failed"
    assert "test command" in build["error"] and "exited with code 3" in build["error"]
    assert "assertion failed: 1 != 2" in build["error"]  # the tail of the log
    comp = daemon.component_status("hello")
    assert comp["recent"]["sha"] == good and comp["recent"]["version"] == 1
    assert comp["last_build"]["status"] == "failed"
    assert comp["last_build"]["error"] == build["error"]
    assert db_rows(daemon.state_dir, "SELECT COUNT(*) AS n FROM versions")[0]["n"] == 1


def test_a_failing_build_skips_the_test(daemon: Daemon, component: Callable[..., Work]) -> None:
    work = component(descriptor=default_descriptor(build="exit 7", test="touch tested"))
    work.remote = daemon.hosted("hello")
    sha = work.push()
    build = daemon.wait_build("hello", sha)
    assert build["status"] == "failed"
    assert "build command `exit 7` exited with code 7" in build["error"]
    log = daemon.cli("build-log", str(build["id"])).stdout
    assert "touch tested" not in log
    assert daemon.component_status("hello")["recent"] is None


def test_a_hanging_build_times_out(
    daemon_factory: Callable[..., Daemon], component: Callable[..., Work]
) -> None:
    d = _started(daemon_factory, build_timeout="2s")
    work = component(descriptor=default_descriptor(build="echo started; sleep 60"))
    work.remote = d.hosted("hello")
    sha = work.push()
    build = d.wait_build("hello", sha)
    assert build["status"] == "failed"
    assert "timed out: build_timeout 2s" in build["error"]
    assert "build_timeout" in build["error"]
    log = d.cli("build-log", str(build["id"])).stdout
    assert "started" in log and "build_timeout 2s reached" in log
    assert d.component_status("hello")["recent"] is None
    # the daemon is still fine: the next push builds
    work.write({"component.json": default_descriptor()})
    fixed = work.commit_push("no more hanging")
    d.wait_recent("hello", fixed)


def test_a_huge_build_log_is_capped(daemon: Daemon, component: Callable[..., Work]) -> None:
    work = component(
        descriptor=default_descriptor(
            build="head -c 6000000 /dev/zero | tr '\\0' x; echo; echo end"
        )
    )
    work.remote = daemon.hosted("hello")
    sha = work.push()
    comp = daemon.wait_recent("hello", sha, timeout=30)
    log_path = Path(
        db_rows(daemon.state_dir, "SELECT log_path FROM builds WHERE sha = ?", sha)[0]["log_path"]
    )
    assert MAX_LOG_BYTES < log_path.stat().st_size < MAX_LOG_BYTES + 4096
    log = daemon.cli("build-log", str(comp["last_build"]["id"])).stdout
    assert f"log truncated at {MAX_LOG_BYTES} bytes" in log
    assert "build exited 0" in log


def test_the_build_environment_holds_none_of_the_daemons(
    daemon_factory: Callable[..., Daemon], component: Callable[..., Work]
) -> None:
    d = daemon_factory()
    d.env["DEPLOYD_TEST_SECRET"] = "hunter2-do-not-leak"
    d.env["AWS_SECRET_ACCESS_KEY"] = "also-secret"
    d.start()
    work = component(descriptor=default_descriptor(build="env > env.txt"))
    work.remote = d.hosted("hello")
    sha = work.push()
    d.wait_recent("hello", sha)
    env_txt = (_artifact(d, sha) / "env.txt").read_text()
    assert "DEPLOYD_TEST_SECRET" not in env_txt
    assert "hunter2" not in env_txt
    assert "AWS_SECRET_ACCESS_KEY" not in env_txt
    env = dict(line.split("=", 1) for line in env_txt.splitlines() if "=" in line)
    assert env["DEPLOYD_COMPONENT"] == "hello"
    assert env["DEPLOYD_COMMIT"] == sha
    assert "PATH" in env


def test_a_main_module_with_a_syntax_error_fails_the_build_and_others_are_compiled(
    daemon: Daemon, component: Callable[..., Work]
) -> None:
    work = component()
    good = work.push(daemon.hosted("hello"))
    comp = daemon.wait_recent("hello", good)
    artifact = daemon.state_dir / "versions" / "hello" / str(comp["recent"]["version"])
    # Steps start from bytecode compiled once at build time.
    assert list((artifact / "lib" / "__pycache__").glob("upper.*.pyc"))
    work.commit("typo", {"lib/upper.py": "def process(msg, cfg)\n    return {}\n"})
    bad = work.push(daemon.hosted("hello"))
    build = daemon.wait_build("hello", bad)
    assert build["status"] == "failed"
    assert "lib/upper.py does not compile" in build["error"]
    assert daemon.recent_sha("hello") == good


def test_argument_lists_run_without_a_shell(tmp_path: Path) -> None:
    """deployd's own commands (the npm steps) are argument lists: nothing is a shell line."""

    async def run(argv: list[str]) -> tuple[Any, str]:
        log = io.BytesIO()
        try:
            result: Any = await run_command(
                "build", argv, cwd=tmp_path, log=log, timeout=30, env=clean_env(tmp_path)
            )
        except BuildError as exc:
            result = exc
        return result, log.getvalue().decode()

    code = "import sys; print(sys.argv[1]); sys.exit(int(sys.argv[2]))"
    ok, log = asyncio.run(run([sys.executable, "-c", code, "$(touch x); echo `id`", "0"]))
    assert ok.returncode == 0 and ok.output == "$(touch x); echo `id`\n"
    assert not (tmp_path / "x").exists()
    assert "$ " in log and "'$(touch x); echo `id`'" in log  # shown quoted, as typed
    failed, _ = asyncio.run(run([sys.executable, "-c", code, "npm error code EX", "4"]))
    assert isinstance(failed, CommandFailed) and failed.returncode == 4
    assert failed.output == "npm error code EX\n" and not failed.explained
    missing, log = asyncio.run(run(["no-such-program-xyz", "ci"]))
    assert isinstance(missing, BuildError) and not isinstance(missing, CommandFailed)
    assert "no-such-program-xyz" in str(missing) and "could not start" in str(missing)
    assert "could not start" in log
