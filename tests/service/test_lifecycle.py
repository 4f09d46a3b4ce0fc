"""Signals and lifecycle of a real `deployd serve`: SIGTERM/SIGINT stop, SIGHUP reload, logs.

Every test drives the daemon subprocess with real signals and real git pushes.
"""

from __future__ import annotations

import json
import logging
import signal
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from deployd import config as cfgmod
from deployd.service import logs as service
from tests.conftest import HTTP, Daemon, Work, default_descriptor, wait_until


def _db_rows(d: Daemon, sql: str, params: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
    conn = sqlite3.connect(f"file:{d.state_dir / 'deployd.db'}?mode=ro", uri=True)
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute(sql, params).fetchall()]
    finally:
        conn.close()


def _hup_and_wait(d: Daemon, needle: str) -> None:
    seen = d.log().count(needle)
    assert d.proc is not None
    d.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: d.log().count(needle) > seen, timeout=30)


# -- SIGTERM / SIGINT -----------------------------------------------------------------------


def test_sigterm_during_a_long_build_exits_0_and_the_build_is_retried_at_start(
    daemon_factory: Callable[..., Daemon], component: Callable[..., Work], tmp_path: Path
) -> None:
    slow = tmp_path / "slow-build"
    slow.touch()
    # The build hangs while `slow` exists: long enough to be caught by the stop.
    desc = default_descriptor(build=f"if [ -e '{slow}' ]; then sleep 60; fi")
    work = component(descriptor=desc)
    d = daemon_factory(stop_timeout="4s").start()
    sha = work.push(d.hosted("hello"))
    wait_until(lambda: any(b["status"] == "building" for b in d.build_rows("hello")))

    started = time.monotonic()
    assert d.stop(signal.SIGTERM, timeout=30) == 0
    # Within stop_timeout (4 s) plus signal delivery and interpreter exit, which a loaded
    # machine stretches by seconds; the hanging build alone would hold the stop for 60 s.
    assert time.monotonic() - started < 4 + 10
    [build] = d.builds("hello")
    assert build["status"] == "failed" and "interrupted" in build["error"]
    assert d.log().count("deployd stopped") == 1

    # Next start: the interrupted build is retried (and now succeeds).
    slow.unlink()
    d.start()
    comp = d.wait_recent("hello", sha)
    assert comp["recent"]["version"] == 1
    assert [b["status"] for b in d.builds("hello")] == ["succeeded", "failed"]
    assert d.stop() == 0


def test_sigint_stops_cleanly_and_json_logs_are_one_object_per_line(
    daemon_factory: Callable[..., Daemon],
) -> None:
    d = daemon_factory(log_format="json").start()
    assert d.stop(signal.SIGINT) == 0
    lines = [line for line in d.log().splitlines() if line.strip()]
    assert lines
    records = [json.loads(line) for line in lines]
    assert {"level", "logger", "msg"} <= set(records[0])
    assert records[-1]["msg"] == "deployd stopped"


# -- SIGHUP ---------------------------------------------------------------------------------


def test_reload_starts_added_and_stops_removed_components(
    daemon_factory: Callable[..., Daemon],
    component: Callable[..., Work],
    bare_repo: Callable[[str], Path],
) -> None:
    remote = bare_repo("watched")
    watched = component("watched")
    watched.remote = remote
    first = watched.push()
    d = daemon_factory(components=[{"name": "hello"}, {"name": "watched", "url": str(remote)}])
    d.start()
    d.wait_recent("watched", first)

    d.components = [{"name": "hello"}, {"name": "added"}]
    d.write_config()
    _hup_and_wait(d, "config reloaded")

    # Added: its hosted repository exists with the hook, and a push to it is built.
    assert (d.hosted("added") / "hooks" / "post-receive").exists()
    added = component("added")
    d.wait_recent("added", added.push(d.hosted("added")))

    # Removed: a push to its url is no longer noticed; its version stays in the state.
    ignored = watched.commit_push("after removal")
    hello = component("hello")
    d.wait_recent("hello", hello.push(d.hosted("hello")))
    assert not _db_rows(d, "SELECT id FROM builds WHERE sha = ?", (ignored,))
    assert [
        r["version"]
        for r in _db_rows(d, "SELECT version FROM versions WHERE component = 'watched'")
    ] == [1]
    assert [c["name"] for c in d.status()["components"]] == ["hello", "added"]
    events = _db_rows(d, "SELECT detail FROM events WHERE kind = 'config.reloaded'")
    assert json.loads(events[-1]["detail"]) == {
        "added": ["added"],
        "removed": ["watched"],
        "moved": [],
    }

    # Added back (same url): watched again, and the push made meanwhile is built.
    d.components = [{"name": "hello"}, {"name": "added"}, {"name": "watched", "url": str(remote)}]
    d.write_config()
    _hup_and_wait(d, "config reloaded")
    d.wait_recent("watched", ignored)
    assert d.stop() == 0


@pytest.mark.parametrize(
    "bad",
    [
        "[daemon\nstate_dir = 'x'\n",  # not TOML
        None,  # valid TOML, invalid config (bad component name)
    ],
)
def test_bad_config_is_rejected_and_the_old_one_keeps_running(
    daemon_factory: Callable[..., Daemon], component: Callable[..., Work], bad: str | None
) -> None:
    d = daemon_factory().start()
    if bad is None:
        d.components = [{"name": "hello"}, {"name": "Not A Name"}]
        d.write_config()
    else:
        d.config_path.write_text(bad)
    _hup_and_wait(d, "reload rejected")
    assert HTTP.get(d.url + "/healthz", timeout=5).status_code == 200
    work = component()
    d.wait_recent("hello", work.push(d.hosted("hello")))
    rejected = _db_rows(d, "SELECT message FROM events WHERE kind = 'config.rejected'")
    assert len(rejected) == 1
    # The daemon still runs on the old config: a good file is picked up by the next SIGHUP.
    d.components = [{"name": "hello"}, {"name": "second"}]
    d.write_config()
    _hup_and_wait(d, "config reloaded")
    assert d.hosted("second").is_dir()
    assert d.stop() == 0


# -- logs -----------------------------------------------------------------------------------


def _record(msg: str, *args: Any) -> logging.LogRecord:
    return logging.LogRecord("deployd.test", logging.INFO, __file__, 1, msg, args, None)


def test_configured_secrets_never_reach_a_log_line(tmp_path: Path) -> None:
    (tmp_path / "hook.secret").write_text("file-secret-42\n")
    cfg = cfgmod.parse(
        {
            "daemon": {"state_dir": "var", "api_token": "token-abcdef"},
            "components": [
                {"name": "a", "webhook_secret": 'inline"secret'},
                {"name": "b", "webhook_secret_file": "hook.secret"},
            ],
        },
        base=tmp_path,
    )
    service.set_redactions(service.config_secrets(cfg))
    try:
        record = _record("got %s, %s and %s", "token-abcdef", 'inline"secret', "file-secret-42")
        for formatter in (service._KeyValueFormatter(), service._JsonFormatter()):
            line = formatter.format(record)
            for secret in ("token-abcdef", "inline", "file-secret-42"):
                assert secret not in line, line
            assert line.count("***") == 3, line
        try:
            raise RuntimeError("failed with token-abcdef")
        except RuntimeError:
            import sys

            record = _record("boom")
            record.exc_info = sys.exc_info()
        assert "token-abcdef" not in service._KeyValueFormatter().format(record)
    finally:
        service.set_redactions([])
