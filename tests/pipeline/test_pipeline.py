"""The pipeline end to end through a real daemon: push → build → register → recent."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from tests.conftest import Daemon, Work, db_rows, default_descriptor, git, wait_until


def test_each_push_registers_the_next_version(
    daemon: Daemon, component: Callable[..., Work]
) -> None:
    work = component()
    work.remote = daemon.hosted("hello")
    first = work.push()
    comp = daemon.wait_recent("hello", first)
    assert comp["recent"]["version"] == 1
    assert comp["recent"]["semver"] is None
    second = work.commit_push("second", {"lib/upper.py": "def process(msg, cfg):\n    return 2\n"})
    comp = daemon.wait_recent("hello", second)
    assert comp["recent"]["version"] == 2
    assert comp["last_build"]["status"] == "succeeded"
    assert comp["last_build"]["error"] is None
    kinds = [r["kind"] for r in db_rows(daemon.state_dir, "SELECT kind FROM events ORDER BY id")]
    for kind in ("repo.created", "push.received", "build.started", "version.registered"):
        assert kind in kinds
    # artifact folders are complete, immutable, one per version
    rows = db_rows(daemon.state_dir, "SELECT version, artifact_dir FROM versions ORDER BY version")
    assert [r["version"] for r in rows] == [1, 2]
    assert (
        Path(rows[0]["artifact_dir"], "lib/upper.py").read_text()
        != Path(rows[1]["artifact_dir"], "lib/upper.py").read_text()
    )
    # the scratch folder of finished builds is gone
    assert list((daemon.state_dir / "builds").iterdir()) == []


def test_a_burst_of_pushes_builds_the_last_commit_and_not_every_one(
    daemon: Daemon, component: Callable[..., Work], tmp_path: Path
) -> None:
    hold = tmp_path / "hold-build"
    hold.touch()
    work = component(descriptor=None)
    work.write({"component.json": _held_descriptor(hold)})
    work.remote = daemon.hosted("hello")
    shas = [work.commit_push(f"push {i}", {"n.txt": str(i)}) for i in range(10)]
    hold.unlink()  # the whole burst has arrived while a build ran, however slow the pushes
    comp = daemon.wait_recent("hello", shas[-1])
    builds = daemon.builds("hello")
    assert 1 <= len(builds) < 10
    assert all(b["status"] == "succeeded" for b in builds)
    assert builds[0]["sha"] == shas[-1]
    assert comp["recent"]["version"] == len(builds)
    artifact = db_rows(
        daemon.state_dir, "SELECT artifact_dir FROM versions WHERE sha = ?", shas[-1]
    )[0]["artifact_dir"]
    assert Path(artifact, "n.txt").read_text() == "9"


def _held_descriptor(hold: Path) -> dict[str, object]:
    # a build that runs while `hold` exists, so later pushes of the burst arrive while it runs
    return default_descriptor(build=f"while [ -e '{hold}' ]; do sleep 0.02; done")


def test_the_same_commit_notified_again_is_not_built_again(
    daemon_factory: Callable[..., Daemon], component: Callable[..., Work]
) -> None:
    d = daemon_factory().start()
    work = component()
    work.remote = d.hosted("hello")
    sha = work.push()
    d.wait_recent("hello", sha)
    git("config", "receive.denyDeleteCurrent", "ignore", cwd=d.hosted("hello"))
    # the same commit arrives again: on another branch, then deleted and pushed back to main
    work.push(None, "HEAD:refs/heads/other")
    work.push(None, ":refs/heads/main")
    work.push(None, "HEAD:refs/heads/main")
    # and the daemon restarts (reconciliation sees the same head)
    assert d.stop() == 0
    d.start()
    # a new commit is the barrier: once it is recent, everything before it was handled
    later = work.commit_push("later")
    d.wait_recent("hello", later)
    shas = [b["sha"] for b in d.builds("hello")]
    assert shas.count(sha) == 1
    assert len(shas) == 2
    assert [v["version"] for v in _versions(d)] == [2, 1]


def test_build_exports_exactly_the_pushed_commit(
    daemon: Daemon, component: Callable[..., Work]
) -> None:
    work = component(**{"data__a.txt": "first\n", "exec.sh": "#!/bin/sh\necho hi\n"})
    (work.path / "exec.sh").chmod(0o755)
    (work.path / "ignored.txt").write_text("untracked\n")
    git("add", "exec.sh", cwd=work.path)
    git("commit", "-qm", "exec", cwd=work.path)
    work.remote = daemon.hosted("hello")
    sha = work.push()
    daemon.wait_recent("hello", sha)
    artifact = Path(
        db_rows(daemon.state_dir, "SELECT artifact_dir FROM versions WHERE sha = ?", sha)[0][
            "artifact_dir"
        ]
    )
    tracked = set(git("ls-tree", "-r", "--name-only", sha, cwd=work.path).splitlines())
    exported = {
        str(p.relative_to(artifact))
        for p in artifact.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts  # bytecode compiled at build time
    }
    assert exported == tracked
    assert not (artifact / ".git").exists()
    assert (artifact / "data/a.txt").read_text() == "first\n"
    assert (artifact / "exec.sh").stat().st_mode & 0o100


def test_force_push_builds_the_new_commit(daemon: Daemon, component: Callable[..., Work]) -> None:
    work = component()
    work.remote = daemon.hosted("hello")
    first = work.push()
    daemon.wait_recent("hello", first)
    git("commit", "-q", "--amend", "-m", "rewritten", "--allow-empty", cwd=work.path)
    rewritten = work.push(None, None, "--force")
    assert rewritten != first
    comp = daemon.wait_recent("hello", rewritten)
    assert comp["recent"]["version"] == 2


def test_deleting_the_branch_keeps_the_recent_version(
    daemon: Daemon, component: Callable[..., Work]
) -> None:
    work = component()
    work.remote = daemon.hosted("hello")
    first = work.push()
    daemon.wait_recent("hello", first)
    # git refuses to delete a bare repository's current branch unless told to
    git("config", "receive.denyDeleteCurrent", "ignore", cwd=daemon.hosted("hello"))
    work.push(None, ":refs/heads/main")

    def deletion_recorded() -> bool:
        rows = db_rows(daemon.state_dir, "SELECT message FROM events WHERE kind = 'push.ignored'")
        return any("deleted" in r["message"] for r in rows)

    wait_until(deletion_recorded)
    assert daemon.recent_sha("hello") == first
    assert daemon.proc is not None and daemon.proc.poll() is None
    # and the branch can come back with new work
    again = work.commit_push("after deletion")
    comp = daemon.wait_recent("hello", again)
    assert comp["recent"]["version"] == 2


def test_refs_with_shell_metacharacters_are_just_other_branches(
    daemon: Daemon, component: Callable[..., Work], tmp_path: Path
) -> None:
    work = component()
    work.remote = daemon.hosted("hello")
    first = work.push()
    daemon.wait_recent("hello", first)
    marker = tmp_path / "PWNED"
    evil = [
        f"feat/$(touch${{IFS}}{marker})",
        f"x;touch${{IFS}}{marker};",
        f"`touch${{IFS}}{marker}`",
        "a|b&c'd\"e<f>g",
    ]
    for ref in evil:
        git("check-ref-format", f"refs/heads/{ref}", cwd=work.path)
        work.commit("evil")
        work.push(None, f"HEAD:refs/heads/{ref}")
    later = work.commit_push("later")
    daemon.wait_recent("hello", later)
    assert not marker.exists()
    assert not Path("PWNED").exists()
    assert [b["sha"] for b in daemon.builds("hello")] == [later, first]
    ignored = db_rows(daemon.state_dir, "SELECT message FROM events WHERE kind = 'push.ignored'")
    assert sum("ignored: hello deploys branch 'main'" in r["message"] for r in ignored) == 4


def test_component_files_can_be_symlinks_inside_the_tree(
    daemon: Daemon, component: Callable[..., Work]
) -> None:
    work = component()
    (work.path / "lib/real.py").write_text("def process(msg, cfg):\n    return msg\n")
    (work.path / "lib/upper.py").unlink()
    (work.path / "lib/upper.py").symlink_to("real.py")
    work.commit("symlink inside")
    work.remote = daemon.hosted("hello")
    sha = work.push()
    comp = daemon.wait_recent("hello", sha)
    assert comp["last_build"]["status"] == "succeeded"


def _versions(d: Daemon) -> list[dict[str, object]]:
    return list(json.loads(d.cli("versions", "hello", "--json").stdout))
