"""What deployd reads of npm: `engines.node` ranges, npm's reason for failing, a refused lock file.

The reason is read from real npm output (an `npm ci` refusing an out-of-sync lock file fails
before it would reach any registry).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from deployd.toolchains import npm
from deployd.toolchains.env import clean_env

RANGES = [
    ("v20.20.2", ">=18", True),
    ("v20.20.2", ">=99", False),
    ("v20.1.0", "^14 || ^16", False),
    ("v16.3.0", "^14 || ^16", True),
    ("v18.2.0", "18.x", True),
    ("v19.0.0", "18.x", False),
    ("v20.0.0", "1 - 20", True),
    ("v21.0.0", "1 - 20", False),
    ("v20.0.9", "18.0.0 - 20.0", True),
    ("v20.1.0", "18.0.0 - 20.0", False),
    ("v20.1.0", ">=12.13.0", True),
    ("v20.0.5", "~20.0", True),
    ("v20.1.0", "~20.0", False),
    ("v20.0.0", "*", True),
    ("v20.0.0", "", True),
    ("v20.0.0", ">= 18 <21", True),
    ("v21.0.0", ">= 18 <21", False),
    ("v20.0.0", "<20", False),
    ("v19.9.9", "<20", True),
    ("v20.0.0", ">19", True),
    ("v19.5.0", ">19", False),
    ("v20.0.0", "<=19", False),
    ("v19.5.0", "<=19", True),
    ("v0.2.5", "^0.2.3", True),
    ("v0.3.0", "^0.2.3", False),
    ("v20.3.1", "=20", True),
    ("v20.3.1", "20.3.1", True),
    ("v20.3.2", "20.3.1", False),
    ("v20.0.0", ">=20.0.0-0", True),
    ("v20.0.0", "v20.x", True),
]


@pytest.mark.parametrize(("node", "spec", "expected"), RANGES)
def test_engines_ranges_read_as_npm_reads_them(node: str, spec: str, expected: bool) -> None:
    assert npm.satisfies(node, spec) is expected


def test_engines_warning_names_the_range_and_the_node() -> None:
    assert npm.engines_warning({"engines": {"node": ">=18"}}, "v20.20.2") is None
    assert npm.engines_warning({}, "v20.20.2") is None
    warning = npm.engines_warning({"engines": {"node": ">=99"}}, "v20.20.2")
    assert warning is not None
    assert "engines.node '>=99' is not satisfied by node v20.20.2" in warning
    unreadable = npm.engines_warning({"engines": {"node": ">=eighteen"}}, "v20.20.2")
    assert unreadable is not None and "cannot be read" in unreadable


def test_reason_of_a_refused_lock_file_is_npms_reason_not_its_usage(tmp_path: Path) -> None:
    (tmp_path / "package.json").write_text(
        json.dumps({"name": "x", "version": "1.0.0", "dependencies": {"tiny": "file:tiny"}})
    )
    (tmp_path / "package-lock.json").write_text(
        json.dumps(
            {
                "name": "x",
                "version": "1.0.0",
                "lockfileVersion": 3,
                "requires": True,
                "packages": {"": {"name": "x", "version": "1.0.0"}},
            }
        )
    )
    proc = subprocess.run(
        npm.install_ci(),
        cwd=tmp_path,
        env=clean_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "Usage:" in output
    assert npm.lock_refused(output)
    reason = npm.reason(output)
    assert "Missing: tiny@" in reason and "from lock file" in reason
    assert "can only install packages when your package.json and package-lock.json" in reason
    assert "Usage" not in reason and "--install-strategy" not in reason
    assert "complete log" not in reason and "\n" not in reason


def test_reason_of_other_failures() -> None:
    output = (
        "npm warn tarball tarball data seems to be corrupted. Trying again.\n"
        "npm error code ENOENT\n"
        "npm error syscall open\n"
        "npm error enoent ENOENT: no such file or directory, open '/x/vendor/nope.tgz'\n"
        "npm error enoent\n"
        "npm error A complete log of this run can be found in: /x/_logs/debug-0.log\n"
    )
    assert not npm.lock_refused(output)
    assert npm.reason(output) == (
        "code ENOENT; syscall open; enoent ENOENT: no such file or directory, "
        "open '/x/vendor/nope.tgz'"
    )
    assert npm.reason("npm ERR! code E404\nnpm ERR! 404 Not Found - GET x\n") == (
        "code E404; 404 Not Found - GET x"
    )
    assert npm.reason("plain output\n") == ""
