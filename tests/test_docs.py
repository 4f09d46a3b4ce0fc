"""The docs are checked: every CLI command has help text and is documented in README.md."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import typer.main

from deployd.cli import app
from tests.conftest import DEPLOYD

README = (Path(__file__).parent.parent / "README.md").read_text()


def _walk(group: Any, prefix: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    """Every command and sub-group under `group`, as (path, click command)."""
    for name, command in sorted(group.commands.items()):
        path = (*prefix, name)
        yield path, command
        if hasattr(command, "commands"):  # a sub-group such as `hook`
            yield from _walk(command, path)


COMMANDS = list(_walk(typer.main.get_command(app)))
LEAVES = [(path, cmd) for path, cmd in COMMANDS if not hasattr(cmd, "commands")]


def test_the_tree_is_walked() -> None:
    names = {" ".join(path) for path, _ in COMMANDS}
    for expected in ("serve", "check-config", "status", "versions", "builds", "build-log"):
        assert expected in names
    assert "hook" in names and "hook install" in names


@pytest.mark.parametrize(
    ("path", "command"), COMMANDS, ids=[" ".join(path) for path, _ in COMMANDS]
)
def test_command_has_help(path: tuple[str, ...], command: Any) -> None:
    text = (command.help or command.short_help or "").strip()
    assert text, f"`deployd {' '.join(path)}` has no help text (add a docstring)"
    for param in command.params:
        if getattr(param, "param_type_name", "") == "option" and not param.hidden:
            assert param.help, f"`deployd {' '.join(path)}` option {param.opts} has no help"


@pytest.mark.parametrize(("path", "command"), LEAVES, ids=[" ".join(p) for p, _ in LEAVES])
def test_command_is_documented_in_readme(path: tuple[str, ...], command: Any) -> None:
    assert f"deployd {' '.join(path)}" in README, (
        f"README.md does not mention `deployd {' '.join(path)}`; add it to a CLI section"
    )


def test_help_runs_for_every_command() -> None:
    """`--help` works through the real entry point (no import error, exit 0)."""
    proc = subprocess.run([*DEPLOYD, "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    for path, _ in COMMANDS:
        if len(path) == 1:
            assert path[0] in proc.stdout
