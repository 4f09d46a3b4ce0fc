"""Invalid component trees: each gets a recorded, readable error; the recent version stays."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from deployd.errors import ComponentError
from deployd.pipeline import descriptor
from tests.conftest import Daemon, Work, default_descriptor, git


def _set_descriptor(text: str) -> Callable[[Path], None]:
    def change(tree: Path) -> None:
        (tree / "component.json").write_text(text)

    return change


def _set_functions(**changes: Any) -> Callable[[Path], None]:
    return _set_descriptor(json.dumps(default_descriptor(**changes)))


def _main(main: str) -> Callable[[Path], None]:
    return _set_functions(actions={"upper": {"main": main}})


def _symlink(target: str) -> Callable[[Path], None]:
    def change(tree: Path) -> None:
        (tree / "lib/upper.py").unlink()
        os.symlink(target, tree / "lib/upper.py")

    return change


def _remove(rel: str) -> Callable[[Path], None]:
    return lambda tree: (tree / rel).unlink()


def _descriptor_symlink(tree: Path) -> None:
    (tree / "real.json").write_text((tree / "component.json").read_text())
    (tree / "component.json").unlink()
    os.symlink("real.json", tree / "component.json")


BAD_TREES: list[tuple[str, Callable[[Path], None], str]] = [
    ("malformed json", _set_descriptor('{"title": "x",\n'), "component.json is not valid JSON"),
    ("not an object", _set_descriptor("[1, 2]"), "component.json must hold a JSON object"),
    ("no component.json", _remove("component.json"), "component.json is missing"),
    ("component.json symlink", _descriptor_symlink, "not a symbolic link"),
    (
        "missing main file",
        _main("./lib/nope.py"),
        "component.json actions.upper.main: file './lib/nope.py' does not exist",
    ),
    ("main with ..", _main("../outside.py"), "actions.upper.main: '../outside.py' escapes"),
    ("main inside with ..", _main("lib/../../x.py"), "escapes the component tree"),
    ("absolute main", _main("/etc/passwd"), "must be a relative path inside the component"),
    ("symlink escaping the tree", _symlink("../../../../../../etc/passwd"), "outside"),
    ("absolute symlink", _symlink("/etc/passwd"), "is a link to an absolute path"),
    (
        "no functions",
        _set_descriptor('{"title": "nothing"}'),
        "declares no triggers and no actions",
    ),
    ("bad runtime", _set_functions(runtime="ruby"), "component.json runtime: "),
    (
        "bad semver",
        _set_functions(version="1.2"),
        "component.json version: '1.2' is not a semantic",
    ),
    ("bad triggers type", _set_functions(triggers="ticker"), "component.json triggers: "),
    ("bad function name", _set_functions(actions={"a b": {"main": "lib/upper.py"}}), "'a b'"),
]


def test_invalid_component_trees_fail_with_a_readable_error(
    daemon: Daemon, component: Callable[..., Work]
) -> None:
    work = component()
    work.remote = daemon.hosted("hello")
    good = work.push()
    daemon.wait_recent("hello", good)
    for case, change, expected in BAD_TREES:
        git("reset", "-q", "--hard", good, cwd=work.path)
        change(work.path)
        bad = work.commit(case)
        work.push(None, None, "--force")
        build = daemon.wait_build("hello", bad)
        assert build["status"] == "failed", case
        assert expected in build["error"], (case, build["error"])
        assert "Traceback" not in build["error"] and "\n" not in build["error"], case
        assert daemon.recent_sha("hello") == good, case
    assert daemon.component_status("hello")["recent"]["version"] == 1
    assert daemon.proc is not None and daemon.proc.poll() is None


def test_semver_must_not_go_down(daemon: Daemon, component: Callable[..., Work]) -> None:
    work = component(descriptor=default_descriptor(version="1.2.0"))
    work.remote = daemon.hosted("hello")
    first = work.push()
    comp = daemon.wait_recent("hello", first)
    assert comp["recent"]["semver"] == "1.2.0"
    for version in ("1.1.9", "1.2.0-rc.1"):
        bad = work.commit_push(version, {"component.json": default_descriptor(version=version)})
        build = daemon.wait_build("hello", bad)
        assert build["status"] == "failed", version
        assert build["error"] == (
            f"component.json version: {version} is lower than 1.2.0 of hello v1; "
            "keep 1.2.0 or raise it"
        )
        assert daemon.recent_sha("hello") == first
    # a version without semver in between does not reset the comparison
    plain = work.commit_push("plain", {"component.json": default_descriptor()})
    daemon.wait_recent("hello", plain)
    bad = work.commit_push("1.0.0", {"component.json": default_descriptor(version="1.0.0")})
    assert daemon.wait_build("hello", bad)["status"] == "failed"
    ok = work.commit_push("1.10.0", {"component.json": default_descriptor(version="1.10.0")})
    comp = daemon.wait_recent("hello", ok)
    assert comp["recent"]["semver"] == "1.10.0"
    assert comp["recent"]["version"] == 3


def test_same_semver_on_a_new_commit_is_a_new_version(
    daemon: Daemon, component: Callable[..., Work]
) -> None:
    """Real components keep their `version` across many commits (a README change)."""
    work = component(descriptor=default_descriptor(version="1.6.1"))
    work.remote = daemon.hosted("hello")
    first = work.push()
    daemon.wait_recent("hello", first)
    second = work.commit_push("only the README", {"README.md": "# hello\n\nbetter words\n"})
    comp = daemon.wait_recent("hello", second)
    assert comp["recent"] == {**comp["recent"], "version": 2, "semver": "1.6.1", "sha": second}
    rows = json.loads(daemon.cli("versions", "hello", "--json").stdout)
    assert [(r["version"], r["semver"], r["recent"], r["same_semver_as"]) for r in rows] == [
        (2, "1.6.1", True, 1),
        (1, "1.6.1", False, None),
    ]
    assert [r["sha"] for r in rows] == [second, first]
    plain = daemon.cli("versions", "hello").stdout.splitlines()
    assert "v2" in plain[1] and "1.6.1" in plain[1] and "same semver as v1" in plain[1]
    assert "recent" in plain[1] and "v1" in plain[2] and "same semver" not in plain[2]
    events = json.loads(daemon.cli("history", "--component", "hello", "--json").stdout)
    [registered] = [
        e for e in events if e["kind"] == "version.registered" and second[:12] in e["message"]
    ]
    assert registered["message"].endswith("(semver 1.6.1, as v1)"), registered
    # a third commit, same semver: the newest sequence number is the recent version
    third = work.commit_push("again", {"README.md": "# hello\n\neven better\n"})
    comp = daemon.wait_recent("hello", third)
    assert comp["recent"]["version"] == 3
    rows = json.loads(daemon.cli("versions", "hello", "--json").stdout)
    assert [(r["version"], r["same_semver_as"]) for r in rows] == [(3, 2), (2, 1), (1, None)]
    # lower is still refused, naming the recent version
    lower = work.commit_push("lower", {"component.json": default_descriptor(version="1.6.0")})
    build = daemon.wait_build("hello", lower)
    assert build["status"] == "failed"
    assert (
        "version: 1.6.0 is lower than 1.6.1 of hello v3; keep 1.6.1 or raise it" in (build["error"])
    )
    assert daemon.recent_sha("hello") == third


def test_semver_ordering() -> None:
    ordered = ["0.9.9", "1.0.0-alpha", "1.0.0-alpha.1", "1.0.0-beta.2", "1.0.0-beta.11", "1.0.0"]
    ordered += ["1.0.1", "1.2.0", "1.10.0", "2.0.0+build.5"]
    assert sorted(ordered, key=descriptor.semver_key) == ordered


def test_runtime_defaults_from_the_tree(tmp_path: Path) -> None:
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib/a.js").write_text("")
    (tmp_path / "component.json").write_text(json.dumps({"actions": {"a": {"main": "lib/a.js"}}}))
    assert descriptor.load(tmp_path).runtime == "python"
    (tmp_path / "package.json").write_text("{}")
    assert descriptor.load(tmp_path).runtime == "node"
    (tmp_path / "component.json").write_text(
        json.dumps({"runtime": "python", "actions": {"a": {"main": "lib/a.js"}}})
    )
    assert descriptor.load(tmp_path).runtime == "python"


def test_main_must_be_a_file(tmp_path: Path) -> None:
    (tmp_path / "lib").mkdir()
    (tmp_path / "component.json").write_text(json.dumps({"triggers": {"t": {"main": "lib"}}}))
    with pytest.raises(ComponentError, match=r"triggers\.t\.main: 'lib' is a directory"):
        descriptor.load(tmp_path)
