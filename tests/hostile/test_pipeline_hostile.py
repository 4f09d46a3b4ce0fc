"""End to end: hostile pushes and flow files against a real daemon change nothing.

Each bad commit gets a failed build whose recorded reason is the specific one; the recent
version stays, no version is registered, no flow is created, and the daemon stays healthy.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.conftest import HTTP, Daemon, Work, default_descriptor, git


def _descriptor_bytes(data: bytes) -> Callable[[Path], None]:
    return lambda tree: (tree / "component.json").write_bytes(data)


def _descriptor(**changes: Any) -> Callable[[Path], None]:
    return _descriptor_bytes(json.dumps(default_descriptor(**changes)).encode())


def _descriptor_folder(tree: Path) -> None:
    (tree / "component.json").unlink()
    (tree / "component.json").mkdir()
    (tree / "component.json" / "x").write_text("x")


def _main_link(target: str) -> Callable[[Path], None]:
    def change(tree: Path) -> None:
        (tree / "lib/upper.py").unlink()
        os.symlink(target, tree / "lib/upper.py")

    return change


# (what, change to the tree, words of the recorded reason)
BAD_PUSHES: list[tuple[str, Callable[[Path], None], str]] = [
    ("deep nesting", _descriptor_bytes(b"[" * 50_000 + b"]" * 50_000), "nested too deeply"),
    ("huge number", _descriptor_bytes(b'{"version": ' + b"7" * 5000 + b"}"), "too many digits"),
    (
        "300 levels in an action's metadata",
        _descriptor(
            actions={
                "upper": {"main": "./lib/upper.py", "metadata": json.loads("[" * 300 + "]" * 300)}
            }
        ),
        "nested more than 100 levels deep",
    ),
    ("enormous", _descriptor_bytes(b" " * (1024 * 1024 + 1) + b"{}"), "the limit is 1048576"),
    ("component.json a folder", _descriptor_folder, "must be a regular file, not a directory"),
    ("main a symlink loop", _main_link("upper.py"), "symbolic link loop"),
    ("main escaping by symlink", _main_link("../../../../../../../etc/passwd"), "outside"),
    (
        "main a folder",
        _descriptor(actions={"upper": {"main": "./lib"}}),
        "actions.upper.main: './lib' is a directory",
    ),
    (
        "action not an object",
        _descriptor(actions={"upper": "./lib/upper.py"}),
        "component.json actions.upper: must be a JSON object",
    ),
    (
        "shell in build",
        _descriptor(build=["sh", "-c", "touch /tmp/pwned"]),
        "component.json build: Input should be a valid string",
    ),
]


def test_bad_pushes_fail_with_their_reason_and_change_nothing(
    daemon: Daemon, component: Callable[..., Work]
) -> None:
    work = component()
    work.remote = daemon.hosted("hello")
    good = work.push()
    daemon.wait_recent("hello", good)
    for what, change, words in BAD_PUSHES:
        git("reset", "-q", "--hard", good, cwd=work.path)
        git("clean", "-qfdx", cwd=work.path)
        change(work.path)
        bad = work.commit(what)
        work.push(None, None, "--force")
        build = daemon.wait_build("hello", bad)
        assert build["status"] == "failed", what
        assert words in build["error"], (what, build["error"])
        assert "internal error" not in build["error"], (what, build["error"])
        assert "\n" not in build["error"], what
        assert daemon.recent_sha("hello") == good, what
    versions = json.loads(daemon.cli("versions", "hello", "--json").stdout)
    assert [v["version"] for v in versions] == [1]
    assert HTTP.get(daemon.url + "/healthz", timeout=5).status_code == 200
    assert "Traceback" not in daemon.log()


def test_flow_files_naming_what_a_version_lacks_create_nothing(
    daemon: Daemon, component: Callable[..., Work], tmp_path: Path
) -> None:
    work = component()
    work.remote = daemon.hosted("hello")
    daemon.wait_recent("hello", work.push())

    def apply(steps: str) -> str:
        path = tmp_path / "f.toml"
        path.write_text('name = "f"\n' + steps)
        proc = daemon.cli("flow", "apply", str(path), check=False)
        assert proc.returncode != 0, proc.stdout
        assert proc.stderr.startswith("deployd: error: ") and proc.stderr.count("\n") == 1
        return proc.stderr

    tick = '[[steps]]\nid = "t"\ncomponent = "hello"\nfunction = "ticker"\n'
    cases = [
        (
            tick + '[[steps]]\nid = "w"\ncomponent = "hello"\nfunction = "lower"\n',
            'step w: action "lower" does not exist in hello v1 (its actions: upper)',
        ),
        (
            '[[steps]]\nid = "t"\ncomponent = "hello"\nfunction = "upper"\n'
            '[[steps]]\nid = "w"\ncomponent = "hello"\nfunction = "upper"\n',
            "step t: 'upper' is not a trigger of hello v1",
        ),
        (
            tick + '[[steps]]\nid = "w"\ncomponent = "hello"\nfunction = "upper"\nversion = 9\n',
            "step w: hello v9 does not exist",
        ),
        (
            tick + '[[steps]]\nid = "t"\ncomponent = "hello"\nfunction = "upper"\n',
            "step id 't' is used twice",
        ),
        (
            tick.replace('"ticker"\n', '"ticker"\ninterval = "1 fortnight"\n')
            + '[[steps]]\nid = "w"\ncomponent = "hello"\nfunction = "upper"\n',
            "steps[0].interval: '1 fortnight' is not a duration",
        ),
        (
            tick + '[[steps]]\nid = "w"\ncomponent = "hello"\nfunction = "upper"\n'
            "mapping = '$uppercase(text'\n",
            "steps[1].mapping: mapping is not valid JSONata",
        ),
    ]
    for steps, words in cases:
        assert words in apply(steps)
    assert daemon.status()["flows"] == []
    assert HTTP.get(daemon.url + "/healthz", timeout=5).status_code == 200
