"""What the first walk-through tripped over (issue 15 §5), through the real CLI against a real
daemon and state dir: `status` labels, cuts, cleared errors, commits and widths; read-only
commands without the config's secrets; one exit code for a name that does not exist; the pid
file; unknown functions and config keys."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from deployd.cli.render import clip, wrapped
from tests.conftest import DEPLOYD, Daemon, Work, db_rows, default_descriptor, wait_until

pytestmark = pytest.mark.timeout(180)


def status_text(d: Daemon) -> str:
    return d.cli("status").stdout


def flat(text: str) -> str:
    """`text` with its wrapped lines joined (the words, one space apart)."""
    return " ".join(text.split())


def test_status_words_widths_commits_and_cleared_errors(
    daemon_factory: Callable[..., Daemon], component: Callable[..., Work]
) -> None:
    d = daemon_factory(components=[{"name": "billing-connector"}]).start()
    work = component("billing-connector")
    work.commit("Add the invoice export")
    sha = work.push(d.hosted("billing-connector"))
    d.wait_recent("billing-connector", sha)
    text = status_text(d)
    assert '"Add the invoice export" by Test, built 20' in flat(text), text
    assert re.search(
        r"built \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC \((just now|\d+ s ago)\) in ", flat(text)
    ), text
    assert re.search(r"#1 succeeded in \d+\.\d s", text), text
    for line in text.splitlines():
        assert len(line) <= 80, line
    assert "…" not in text.split("runtimes:")[0]  # no cell cut to `compone…`

    # A failed build: dated and shown, cut at a word boundary, not mid-word.
    noise = " ".join(f"word{i}" for i in range(60))
    bad = work.commit(
        "break it",
        {"component.json": default_descriptor(build=f"echo {noise}; exit 4")},
    )
    work.push(d.hosted("billing-connector"))
    d.wait_build("billing-connector", bad)
    text = status_text(d)
    line = flat(text)[flat(text).index("last build error, ") :]
    assert re.match(r"last build error, \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC \(", line), line
    assert re.search(r"word\d+…$", line), line  # a whole word, then the cut
    assert "billing-connector build #2 failed: build command" in flat(text)

    # The config: a rejected reload is "last config error" (the whole word).
    good_config = d.config_path.read_text()
    copy = d.root / "good.toml"  # what the CLI reads while the daemon's file is bad
    copy.write_text(good_config)
    d.config_path.write_text(
        good_config.replace("[daemon]\n", "[daemon]\nmax_parallel_builds = 0\n")
    )
    assert d.proc is not None
    d.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: d.status()["last_errors"]["config"])
    text = subprocess.run(
        [*DEPLOYD, "status", "-c", str(copy)],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    assert "last config error, " in flat(text) and "confi " not in flat(text), text

    # Both parts work again: their last errors are cleared (kept, with when, in --json).
    d.config_path.write_text(good_config)
    d.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: (d.status()["last_errors"]["config"] or {}).get("cleared_at"))
    work.commit("mend it", {"component.json": default_descriptor()})
    good = work.push(d.hosted("billing-connector"))
    d.wait_recent("billing-connector", good)
    errors = json.loads(d.cli("status", "--json").stdout)["last_errors"]
    assert (
        errors["builds"]["cleared_at"] and errors["builds"]["at"] < errors["builds"]["cleared_at"]
    )
    text = status_text(d)
    assert "last build error" not in text and "last config error" not in text, text
    assert '"mend it" by Test' in flat(text)


def test_read_only_commands_need_no_secret_but_check_config_does(
    daemon_factory: Callable[..., Daemon], component: Callable[..., Work]
) -> None:
    d = daemon_factory(components=[{"name": "hello", "webhook_secret": "${HELLO_SECRET}"}])
    d.env["HELLO_SECRET"] = "s3cret-value-123"
    d.start()
    sha = component().push(d.hosted("hello"))
    d.wait_recent("hello", sha)
    shell = {k: v for k, v in os.environ.items() if k != "HELLO_SECRET"}

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*DEPLOYD, *args, "-c", str(d.config_path)],
            capture_output=True,
            text=True,
            env=shell,
            timeout=60,
        )

    for args in (
        ("status",),
        ("status", "--json"),
        ("versions", "hello"),
        ("builds",),
        ("history",),
        ("deploys",),
        ("flow", "list"),
    ):
        proc = run(*args)
        assert proc.returncode == 0, (args, proc.stderr)
        assert "HELLO_SECRET" not in proc.stderr and "s3cret" not in proc.stdout
    checked = run("check-config")
    assert checked.returncode == 2
    assert "components[0].webhook_secret: environment variable HELLO_SECRET is not set" in (
        checked.stderr
    )


def test_one_exit_code_for_a_name_that_does_not_exist(
    daemon_factory: Callable[..., Daemon], component: Callable[..., Work], tmp_path: Path
) -> None:
    d = daemon_factory().start()
    sha = component().push(d.hosted("hello"))
    d.wait_recent("hello", sha)
    for args in (
        ("versions", "nope"),
        ("builds", "nope"),
        ("redeploy", "nope"),
        ("plan", "nope"),
        ("poll", "nope"),
        ("flow", "show", "nope"),
        ("flow", "history", "nope"),
        ("flow", "runs", "nope"),
        ("flow", "errors", "nope"),
        ("flow", "manifests", "nope"),
        ("flow", "publish", "nope"),
        ("flow", "stop", "nope"),
        ("logs", "nope"),
        ("pause", "nope"),
    ):
        proc = d.cli(*args, check=False)
        assert proc.returncode == 1, (args, proc.returncode, proc.stderr)
        assert "Traceback" not in proc.stderr
        assert "'nope'" in proc.stderr, (args, proc.stderr)

    # A flow naming a function its component does not have: it does not exist, and the
    # ones that do are listed.
    flow = tmp_path / "f.toml"
    flow.write_text(
        'name = "f"\n[[steps]]\nid = "t"\ncomponent = "hello"\nfunction = "ticker"\n'
        '[[steps]]\nid = "u"\ncomponent = "hello"\nfunction = "uper"\n'
    )
    proc = d.cli("flow", "apply", str(flow), check=False)
    assert proc.returncode != 0
    assert (
        'step u: action "uper" does not exist in hello v1 (its actions: upper); did you mean'
        ' "upper"?' in proc.stderr
    ), proc.stderr
    assert "no longer exists" not in proc.stderr


def test_the_pid_file_takes_kill_hup(daemon: Daemon) -> None:
    pidfile = daemon.state_dir / "deployd.pid"
    assert daemon.proc is not None
    assert pidfile.read_text() == f"{daemon.proc.pid}\n"
    subprocess.run(["sh", "-c", f'kill -HUP "$(cat {pidfile})"'], check=True, timeout=10)
    wait_until(
        lambda: db_rows(daemon.state_dir, "SELECT 1 FROM events WHERE kind = 'config.reloaded'")
    )
    assert json.loads(daemon.cli("status", "--json").stdout)["daemon"]["pid"] == daemon.proc.pid


def test_unknown_config_keys_name_the_nearest_known_one(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text(
        '[daemon]\nlistne = "127.0.0.1:1"\npush_feedbak_wait = "1s"\n'
        '[[components]]\nname = "x"\nbrnach = "main"\n'
    )
    proc = subprocess.run(
        [*DEPLOYD, "check-config", "-c", str(config)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2
    assert "daemon.listne: unknown key; did you mean 'listen'?" in proc.stderr
    assert "daemon.push_feedbak_wait: unknown key; did you mean 'push_feedback_wait'?" in (
        proc.stderr
    )
    assert "components[0].brnach: unknown key; did you mean 'branch'?" in proc.stderr

    # Flow files too.
    from deployd.errors import FlowError
    from deployd.flows import model

    with pytest.raises(FlowError) as err:
        model.parse(
            {"name": "f", "updte": "auto", "steps": [{"id": "t", "component": "c", "functon": "x"}]}
        )
    assert "steps[0].functon: unknown key; did you mean 'function'?" in str(err.value)
    assert "updte: unknown key; did you mean 'update'?" in str(err.value)


def test_clip_and_wrap_keep_words_whole() -> None:
    text = "the build command exited " + "abcdefghij " * 30
    cut = clip(text, 150)
    assert len(cut) <= 150 and cut.endswith("abcdefghij…")
    assert clip("short", 150) == "short"
    for line in wrapped(text).splitlines():
        assert len(line) <= 80 and line.rstrip().endswith(("abcdefghij", "exited"))
