"""Hostile command lines: each gets one clear line on stderr and the documented exit code.

Usage problems exit 2 (click's own usage message, or `deployd: error: ...` for a bad config
or flow file); anything else is one `deployd: error: ...` line and exit 1. Never a
traceback. Most cases run `deployd.cli.main` in-process (fast); the daemon cases run the
real CLI against a real daemon.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from deployd import cli
from tests.conftest import Daemon

CONFIG = '[daemon]\nstate_dir = "var"\nlisten = "127.0.0.1:1"\n[[components]]\nname = "hello"\n'


@pytest.fixture
def files(tmp_path: Path) -> dict[str, str]:
    (tmp_path / "config.toml").write_text(CONFIG)
    (tmp_path / "binary.toml").write_bytes(b"\xff\xfe\x00[daemon]")
    (tmp_path / "folder.toml").mkdir()
    (tmp_path / "steps-missing.toml").write_text('name = "x"\n')
    return {
        "cfg": str(tmp_path / "config.toml"),
        "missing": str(tmp_path / "missing.toml"),
        "binary": str(tmp_path / "binary.toml"),
        "folder": str(tmp_path / "folder.toml"),
        "flow": str(tmp_path / "steps-missing.toml"),
    }


def run_main(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    saved = sys.argv
    sys.argv = ["deployd", *args]
    try:
        with pytest.raises(SystemExit) as info:
            cli.main()
    finally:
        sys.argv = saved
    code = info.value.code
    return (code if isinstance(code, int) else 1), capsys.readouterr().err


# (id, arguments ({name} is a file from the fixture), exit code, words on stderr)
CASES: list[tuple[str, list[str], int, str]] = [
    ("config-missing", ["status", "-c", "{missing}"], 2, "does not exist; pass -c FILE"),
    ("config-a-folder", ["status", "-c", "{folder}"], 2, "cannot be read: Is a directory"),
    ("config-binary", ["status", "-c", "{binary}"], 2, "is not valid TOML"),
    ("limit-word", ["builds", "--limit", "abc", "-c", "{cfg}"], 2, "Invalid value for '--limit'"),
    ("limit-zero", ["builds", "--limit", "0", "-c", "{cfg}"], 2, "greater than or equal to 1"),
    ("history-negative", ["history", "--limit", "-5", "-c", "{cfg}"], 2, "greater than or equal"),
    ("deploys-zero", ["deploys", "--limit", "0", "-c", "{cfg}"], 2, "greater than or equal to 1"),
    ("build-id-word", ["build-log", "not-a-number", "-c", "{cfg}"], 2, "Invalid value"),
    ("build-id-huge", ["build-log", "9" * 30, "-c", "{cfg}"], 1, f"no build {'9' * 30}"),
    ("versions-traversal", ["versions", "../x", "-c", "{cfg}"], 1, "unknown component '../x'"),
    ("versions-shell", ["versions", "$(reboot)", "-c", "{cfg}"], 1, "unknown component '$(reb"),
    ("versions-unicode", ["versions", "héllo", "-c", "{cfg}"], 1, "(known: hello)"),
    ("versions-empty", ["versions", "", "-c", "{cfg}"], 1, "unknown component ''"),
    ("builds-unknown", ["builds", "nope", "-c", "{cfg}"], 1, "unknown component 'nope'"),
    ("logs-unknown", ["logs", "nope", "-c", "{cfg}"], 1, "no logs for flow 'nope'"),
    ("apply-missing", ["flow", "apply", "{missing}", "-c", "{cfg}"], 2, "does not exist"),
    ("apply-a-folder", ["flow", "apply", "{folder}", "-c", "{cfg}"], 2, "cannot be read"),
    ("apply-binary", ["flow", "apply", "{binary}", "-c", "{cfg}"], 2, "cannot be read"),
    ("apply-invalid", ["flow", "apply", "{flow}", "-c", "{cfg}"], 2, "steps: Field required"),
    (
        "hook-wrong-repo",
        ["hook", "install", "/nonexistent", "--component", "hello", "-c", "{cfg}"],
        1,
        "component hello deploys from",
    ),
    (
        "hook-unknown-component",
        ["hook", "install", "/nonexistent", "--component", "nope", "-c", "{cfg}"],
        1,
        "unknown component 'nope'",
    ),
    ("redeploy-unknown", ["redeploy", "nope", "-c", "{cfg}"], 1, "unknown component 'nope'"),
    ("poll-unknown", ["poll", "nope", "-c", "{cfg}"], 1, "unknown component 'nope'"),
    ("flow-show-no-state", ["flow", "show", "x", "-c", "{cfg}"], 1, "no state yet"),
    ("flow-errors-no-state", ["flow", "errors", "x", "-c", "{cfg}"], 1, "no state yet"),
    ("retry-neither", ["flow", "retry", "x", "-c", "{cfg}"], 2, "give either --id N"),
    ("discard-both", ["flow", "discard", "x", "--id", "1", "--all"], 2, "not both"),
    ("retry-id-word", ["flow", "retry", "x", "--id", "abc"], 2, "Invalid value for '--id'"),
    ("errors-id-zero", ["flow", "errors", "x", "--id", "0"], 2, "Invalid value for '--id'"),
    ("pause-no-token", ["pause", "x", "-c", "{cfg}"], 1, "no API token"),
    ("unknown-command", ["no-such-command"], 2, "No such command"),
    ("unknown-option", ["status", "--bogus"], 2, "No such option: --bogus"),
    ("extra-argument", ["check-config", "extra"], 2, "unexpected extra argument"),
    ("rollback-to-word", ["flow", "rollback", "x", "--to", "abc"], 2, "Invalid value for '--to'"),
    ("missing-argument", ["flow", "show"], 2, "Missing argument"),
]


@pytest.mark.parametrize(
    ("args", "code", "words"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_bad_arguments(
    files: dict[str, str],
    capsys: pytest.CaptureFixture[str],
    args: list[str],
    code: int,
    words: str,
) -> None:
    got, err = run_main([a.format(**files) for a in args], capsys)
    assert got == code, err
    assert words in err, err
    assert "Traceback" not in err
    if "Usage:" not in err:  # click's usage errors have their own three-line format
        assert err.startswith("deployd: error: ") and err.count("\n") == 1, err


def test_bad_arguments_against_a_running_daemon(daemon: Daemon, tmp_path: Path) -> None:
    unknown_component = tmp_path / "unknown.toml"
    unknown_component.write_text(
        'name = "f"\n[[steps]]\nid = "a"\ncomponent = "nope"\nfunction = "ticker"\n'
        '[[steps]]\nid = "b"\ncomponent = "hello"\nfunction = "upper"\n'
    )
    cases: list[tuple[list[str], str]] = [
        (["flow", "publish", "nope"], "unknown flow 'nope'"),
        (["flow", "start", "nope"], "unknown flow 'nope'"),
        (["flow", "stop", "nope"], "unknown flow 'nope'"),
        (["flow", "rollback", "nope", "--to", "1"], "unknown flow 'nope'"),
        (["flow", "publish", "a/b"], "unknown flow 'a/b'"),
        (["flow", "start", "../../gc"], "unknown flow '../../gc'"),
        (["flow", "stop", "x?y=1"], "unknown flow 'x?y=1'"),
        (["flow", "errors", "nope"], "unknown flow 'nope'"),
        (["flow", "retry", "nope", "--all"], "unknown flow 'nope'"),
        (["flow", "discard", "../../gc", "--id", "1"], "unknown flow '../../gc'"),
        (["flow", "retry", "x?y=1", "--step", "a", "--all"], "unknown flow 'x?y=1'"),
        (["redeploy", "hello", "--sha", "xyz"], "'xyz' is not a full commit sha"),
        (["redeploy", "hello", "--sha", "$(reboot)"], "is not a full commit sha"),
        (["pause", "nope"], "'nope' is neither a flow nor a configured component"),
        (["resume", "../x"], "'../x' is neither a flow nor a configured component"),
        (
            ["flow", "apply", str(unknown_component)],
            "step a: unknown component 'nope' (known: hello)",
        ),
    ]
    for args, words in cases:
        proc = daemon.cli(*args, check=False)
        assert proc.returncode in (1, 2), (args, proc.stdout)
        assert proc.stderr.startswith("deployd: error: "), (args, proc.stderr)
        assert proc.stderr.count("\n") == 1 and words in proc.stderr, (args, proc.stderr)
    assert daemon.status()["flows"] == []
    assert daemon.proc is not None and daemon.proc.poll() is None


def test_main_is_reachable_as_a_module(
    daemon_factory: Callable[..., Daemon],
) -> None:
    """The real entry point (not only `cli.main` in-process) keeps errors to one line."""
    d = daemon_factory()
    d.write_config()
    proc = d.cli("versions", "../../etc/passwd", check=False)
    assert proc.returncode == 1
    assert proc.stderr == "deployd: error: unknown component '../../etc/passwd' (known: hello)\n"
