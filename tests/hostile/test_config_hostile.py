"""Hostile config files: every key wrong in turn gets `key.path: what is wrong`, nothing crashes.

Each case is a TOML snippet, the key path its problem must name and the words that say
what is wrong. The loader is called directly (fast); `check-config` is run on a few.
"""

from __future__ import annotations

import os
import subprocess
import tomllib
from pathlib import Path

import pytest

from deployd import config as cfgmod
from deployd.errors import ConfigError
from tests.conftest import DEPLOYD

C = '[[components]]\nname = "a"\n'  # a valid component to hang a bad key on
NOT_DURATION = "is not a duration; write a number and a unit"
ONE_OFF = (
    '\nfrom = "2026-12-20T00:00:00Z"\nto = "2027-01-02T00:00:00Z"'  # a valid [[freeze]] window
)

# (id, TOML, key path, expected words)
CASES: list[tuple[str, str, str, str]] = [
    # [daemon]
    ("daemon-not-a-table", "daemon = 3", "daemon", "must be a table of keys"),
    ("daemon-unknown-key", '[daemon]\nstate_dri = "var"', "daemon.state_dri", "unknown key"),
    ("state-dir-int", "[daemon]\nstate_dir = 5", "daemon.state_dir", "must be a path written"),
    ("state-dir-empty", '[daemon]\nstate_dir = ""', "daemon.state_dir", "is empty"),
    ("state-dir-nul", '[daemon]\nstate_dir = "a\\u0000b"', "daemon.state_dir", "NUL character"),
    ("state-dir-is-a-file", '[daemon]\nstate_dir = "f"', "daemon.state_dir", "not a directory"),
    ("listen-no-port", '[daemon]\nlisten = "localhost"', "daemon.listen", "is not HOST:PORT"),
    ("listen-port-0", '[daemon]\nlisten = "127.0.0.1:0"', "daemon.listen", "out of range"),
    ("listen-port-big", '[daemon]\nlisten = "127.0.0.1:99999"', "daemon.listen", "out of range"),
    ("listen-int", "[daemon]\nlisten = 8787", "daemon.listen", "valid string"),
    ("listen-space", '[daemon]\nlisten = "exa mple:80"', "daemon.listen", "is not HOST:PORT"),
    ("api-token-int", "[daemon]\napi_token = 5", "daemon.api_token", "valid string"),
    ("api-token-empty", '[daemon]\napi_token = "  "', "daemon.api_token", "is empty"),
    (
        "max-builds-0",
        "[daemon]\nmax_parallel_builds = 0",
        "daemon.max_parallel_builds",
        "greater than or equal to 1",
    ),
    (
        "max-builds-str",
        '[daemon]\nmax_parallel_builds = "two"',
        "daemon.max_parallel_builds",
        "valid integer",
    ),
    (
        "max-builds-float",
        "[daemon]\nmax_parallel_builds = 1.5",
        "daemon.max_parallel_builds",
        "fractional part",
    ),
    ("timezone-unknown", '[daemon]\ntimezone = "Mars/Olympus"', "daemon.timezone", "IANA"),
    ("timezone-traversal", '[daemon]\ntimezone = "../../etc/passwd"', "daemon.timezone", "IANA"),
    ("timezone-empty", '[daemon]\ntimezone = ""', "daemon.timezone", "not a time zone"),
    ("timezone-int", "[daemon]\ntimezone = 1", "daemon.timezone", "valid string"),
    ("warmup-word", '[daemon]\nwarmup_timeout = "soon"', "daemon.warmup_timeout", NOT_DURATION),
    ("warmup-negative", "[daemon]\nwarmup_timeout = -1", "daemon.warmup_timeout", "negative"),
    ("warmup-bool", "[daemon]\nwarmup_timeout = true", "daemon.warmup_timeout", "a duration"),
    ("warmup-inf", "[daemon]\nwarmup_timeout = inf", "daemon.warmup_timeout", "finite"),
    ("warmup-nan", "[daemon]\nwarmup_timeout = nan", "daemon.warmup_timeout", "finite"),
    ("warmup-zero", '[daemon]\nwarmup_timeout = "0"', "daemon.warmup_timeout", "longer than 0"),
    ("rollback-zero", '[daemon]\nrollback_window = "0"', "daemon.rollback_window", "than 0"),
    ("stop-zero", '[daemon]\nstop_timeout = "0s"', "daemon.stop_timeout", "longer than 0"),
    (
        "rollback-window-weeks",
        '[daemon]\nrollback_window = "3 weeks"',
        "daemon.rollback_window",
        NOT_DURATION,
    ),
    (
        "rollback-exits-0",
        "[daemon]\nrollback_exits = 0",
        "daemon.rollback_exits",
        "greater than or equal to 1",
    ),
    ("poll-interval-year", '[daemon]\npoll_interval = "1y"', "daemon.poll_interval", NOT_DURATION),
    (
        "webhook-bytes-tiny",
        "[daemon]\nmax_webhook_bytes = 10",
        "daemon.max_webhook_bytes",
        "greater than or equal to 1024",
    ),
    ("stop-timeout", '[daemon]\nstop_timeout = "x"', "daemon.stop_timeout", NOT_DURATION),
    ("node-empty", '[daemon]\nnode = ""', "daemon.node", "at least 1 character"),
    (
        "node-pool-negative",
        "[daemon]\nnode_pool = -1",
        "daemon.node_pool",
        "greater than or equal to 0",
    ),
    ("node-end-list", "[daemon]\nnode_end_timeout = []", "daemon.node_end_timeout", "a duration"),
    ("webhook-wait", '[daemon]\nwebhook_wait = "1 minute"', "daemon.webhook_wait", NOT_DURATION),
    ("log-format-xml", '[daemon]\nlog_format = "xml"', "daemon.log_format", "'text' or 'json'"),
    (
        "health-lag",
        '[daemon]\nhealth_max_loop_lag = "fast"',
        "daemon.health_max_loop_lag",
        NOT_DURATION,
    ),
    (
        "health-mb",
        "[daemon]\nhealth_min_free_mb = -5",
        "daemon.health_min_free_mb",
        "greater than or equal to 0",
    ),
    (
        "health-percent",
        "[daemon]\nhealth_min_free_percent = 101",
        "daemon.health_min_free_percent",
        "less than or equal to 100",
    ),
    (
        "keep-versions-0",
        "[daemon]\nkeep_versions = 0",
        "daemon.keep_versions",
        "greater than or equal to 1",
    ),
    ("keep-logs", '[daemon]\nkeep_logs = "forever"', "daemon.keep_logs", NOT_DURATION),
    ("gc-interval", '[daemon]\ngc_interval = "hourly"', "daemon.gc_interval", NOT_DURATION),
    # top level
    ("unknown-top-key", "compnents = []", "compnents", "unknown key"),
    ("components-a-table", '[components]\nname = "x"', "components", "array of tables"),
    ("component-a-string", 'components = ["x"]', "components[0]", "must be a table of keys"),
    # [[components]]
    ("name-missing", '[[components]]\nbranch = "main"', "components[0].name", "Field required"),
    ("name-uppercase", '[[components]]\nname = "Hello"', "components[0].name", "not a valid name"),
    ("name-traversal", '[[components]]\nname = "../x"', "components[0].name", "not a valid name"),
    ("name-shell", '[[components]]\nname = "a;rm -rf"', "components[0].name", "not a valid name"),
    ("name-unicode", '[[components]]\nname = "héllo"', "components[0].name", "not a valid name"),
    ("name-too-long", f'[[components]]\nname = "{"a" * 64}"', "components[0].name", "1-63"),
    ("name-int", "[[components]]\nname = 3", "components[0].name", "valid string"),
    ("name-duplicate", C + C, "components[1].name", "already used by components[0]"),
    ("branch-ref", C + 'branch = "refs/heads/main"', "components[0].branch", "not the ref"),
    ("branch-dotdot", C + 'branch = "a..b"', "components[0].branch", "not a valid branch"),
    ("branch-space", C + 'branch = "a b"', "components[0].branch", "not a valid branch"),
    ("branch-shell", C + 'branch = "$(rm -rf /)"', "components[0].branch", "not a valid branch"),
    ("branch-lock", C + 'branch = "x.lock"', "components[0].branch", "not a valid branch"),
    ("branch-reflog", C + 'branch = "a@{1}"', "components[0].branch", "not a valid branch"),
    ("url-missing-repo", C + 'url = "/nonexistent/r.git"', "components[0].url", "not a readable"),
    ("url-option", C + 'url = "--upload-pack=evil"', "components[0].url", "must not start"),
    ("url-ftp", C + 'url = "ftp://example.com/x.git"', "components[0].url", "unsupported scheme"),
    (
        "url-password",
        C + 'url = "https://u:p@example.com/x.git"',
        "components[0].url",
        "contains a password",
    ),
    ("url-empty", C + 'url = ""', "components[0].url", "is empty"),
    ("url-space", C + 'url = "https://example.com/a b"', "components[0].url", "spaces"),
    ("url-int", C + "url = 5", "components[0].url", "valid string"),
    ("build-timeout", C + 'build_timeout = "ten minutes"', "components[0].build_timeout", "not a"),
    (
        "secret-env-unset",
        C + 'webhook_secret = "${DEPLOYD_HOSTILE_UNSET}"',
        "components[0].webhook_secret",
        "environment variable DEPLOYD_HOSTILE_UNSET is not set",
    ),
    ("secret-empty", C + 'webhook_secret = ""', "components[0].webhook_secret", "is empty"),
    ("secret-int", C + "webhook_secret = 5", "components[0].webhook_secret", "valid string"),
    (
        "secret-and-file",
        C + 'webhook_secret = "x"\nwebhook_secret_file = "f"',
        "components[0]",
        "not both",
    ),
    (
        "secret-file-missing",
        C + 'webhook_secret_file = "nope.secret"',
        "components[0].webhook_secret_file",
        "cannot be read (No such file or directory)",
    ),
    (
        "secret-file-dir",
        C + 'webhook_secret_file = "."',
        "components[0].webhook_secret_file",
        "cannot be read (Is a directory)",
    ),
    (
        "secret-file-empty",
        C + 'webhook_secret_file = "empty"',
        "components[0].webhook_secret_file",
        "is empty",
    ),
    (
        "secret-file-nul",
        C + 'webhook_secret_file = "a\\u0000b"',
        "components[0].webhook_secret_file",
        "NUL character",
    ),
    ("poll-interval", C + 'poll_interval = "often"', "components[0].poll_interval", NOT_DURATION),
    ("watch-word", C + 'watch = "maybe"', "components[0].watch", "valid boolean"),
    ("component-unknown-key", C + 'secret = "x"', "components[0].secret", "unknown key"),
    (
        "public-listen-unsigned",
        '[daemon]\nlisten = "0.0.0.0:8787"\n' + C,
        "components[0].webhook_secret",
        "not a loopback address",
    ),
    # monorepos (issue 16): path and paths of [[components]]
    ("path-dotdot", C + 'path = "../secrets"', "components[0].path", "leaves the repository"),
    ("path-inner-dotdot", C + 'path = "a/../../b"', "components[0].path", "leaves the repository"),
    ("path-absolute", C + 'path = "/etc"', "components[0].path", "is absolute"),
    ("path-empty", C + 'path = ""', "components[0].path", "is empty"),
    ("path-double-slash", C + 'path = "a//b"', "components[0].path", "empty or '.' part"),
    ("path-backslash", C + 'path = "a\\\\b"', "components[0].path", "backslash"),
    ("path-newline", C + 'path = "a\\nb"', "components[0].path", "control character"),
    ("path-glob", C + 'path = "components/*"', "components[0].path", "is a glob"),
    ("path-int", C + "path = 3", "components[0].path", "valid string"),
    ("paths-string", C + 'paths = "a/**"', "components[0].paths", "valid tuple"),
    ("paths-empty", C + "paths = []", "components[0].paths", "is empty"),
    ("paths-dotdot", C + 'paths = ["../**"]', "components[0].paths", "leaves the repository"),
    ("paths-absolute", C + 'paths = ["/a/**"]', "components[0].paths", "is absolute"),
    ("paths-magic", C + 'paths = [":(exclude)a"]', "components[0].paths", "starts with ':'"),
    ("paths-bang", C + 'paths = ["!a/**"]', "components[0].paths", "starts with '!'"),
    ("paths-unclosed", C + 'paths = ["a/[bc/**"]', "components[0].paths", "unclosed '['"),
    ("paths-stars", C + 'paths = ["a/b**"]', "components[0].paths", "must be a whole part"),
    ("paths-nul", C + 'paths = ["a\\u0000b"]', "components[0].paths", "control character"),
    # [[freeze]] (issue 16) and daemon.timezone
    ("timezone-unknown", '[daemon]\ntimezone = "Mars/Base"', "daemon.timezone", "not a time zone"),
    ("timezone-path", '[daemon]\ntimezone = "../../etc/passwd"', "daemon.timezone", "IANA"),
    ("timezone-int", "[daemon]\ntimezone = 1", "daemon.timezone", "valid string"),
    ("freeze-not-array", "freeze = 3", "freeze", "valid tuple"),
    ("freeze-empty", "[[freeze]]", "freeze[0]", "give schedule"),
    ("freeze-unknown-key", '[[freeze]]\nuntil = "x"', "freeze[0].until", "unknown key"),
    (
        "freeze-bad-cron",
        '[[freeze]]\nschedule = "0 17 * *"\nduration = "1h"',
        "freeze[0].schedule",
        "not a cron schedule",
    ),
    (
        "freeze-bad-weekday",
        '[[freeze]]\nschedule = "0 17 * * FRY"\nduration = "1h"',
        "freeze[0].schedule",
        "not a cron schedule",
    ),
    (
        "freeze-cron-range",
        '[[freeze]]\nschedule = "61 17 * * *"\nduration = "1h"',
        "freeze[0].schedule",
        "higher than the maximum",
    ),
    (
        "freeze-bad-duration",
        '[[freeze]]\nschedule = "0 17 * * FRI"\nduration = "a weekend"',
        "freeze[0].duration",
        NOT_DURATION,
    ),
    (
        "freeze-zero-duration",
        '[[freeze]]\nschedule = "0 17 * * FRI"\nduration = "0"',
        "freeze[0]",
        "longer than 0",
    ),
    (
        "freeze-no-duration",
        '[[freeze]]\nschedule = "0 17 * * FRI"',
        "freeze[0]",
        "needs both schedule",
    ),
    (
        "freeze-both-forms",
        '[[freeze]]\nschedule = "0 17 * * FRI"\nduration = "1h"\nfrom = "2026-12-20T00:00:00Z"'
        '\nto = "2026-12-21T00:00:00Z"',
        "freeze[0]",
        "not both",
    ),
    (
        "freeze-naive-from",
        '[[freeze]]\nfrom = "2026-12-20T00:00:00"\nto = "2026-12-21T00:00:00Z"',
        "freeze[0].from",
        "no time zone",
    ),
    (
        "freeze-toml-local-datetime",
        "[[freeze]]\nfrom = 2026-12-20T00:00:00\nto = 2026-12-21T00:00:00Z",
        "freeze[0].from",
        "no time zone",
    ),
    (
        "freeze-bad-to",
        '[[freeze]]\nfrom = "2026-12-20T00:00:00Z"\nto = "next year"',
        "freeze[0].to",
        "not an RFC 3339 time",
    ),
    (
        "freeze-to-before-from",
        '[[freeze]]\nfrom = "2026-12-20T00:00:00Z"\nto = "2026-12-19T00:00:00Z"',
        "freeze[0]",
        "is not after from",
    ),
    (
        "freeze-no-to",
        '[[freeze]]\nfrom = "2026-12-20T00:00:00Z"',
        "freeze[0]",
        "needs both from and to",
    ),
    (
        "freeze-glob-upper",
        '[[freeze]]\nflows = ["Billing-*"]' + ONE_OFF,
        "freeze[0].flows",
        "not a flow-name glob",
    ),
    (
        "freeze-glob-bracket",
        '[[freeze]]\nflows = ["billing-[ab"]' + ONE_OFF,
        "freeze[0].flows",
        "not a flow-name glob",
    ),
    (
        "freeze-glob-path",
        '[[freeze]]\nflows = ["../x"]' + ONE_OFF,
        "freeze[0].flows",
        "not a flow-name glob",
    ),
    (
        "freeze-glob-empty-list",
        "[[freeze]]\nflows = []" + ONE_OFF,
        "freeze[0].flows",
        "is empty",
    ),
    (
        "freeze-reason-newline",
        '[[freeze]]\nreason = "a\\nb"' + ONE_OFF,
        "freeze[0].reason",
        "printable",
    ),
]


@pytest.fixture
def base(tmp_path: Path) -> Path:
    (tmp_path / "f").write_text("a file, not a folder")
    (tmp_path / "empty").write_text("\n")
    return tmp_path


@pytest.mark.parametrize(
    ("text", "key", "words"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_every_bad_key_names_itself(base: Path, text: str, key: str, words: str) -> None:
    with pytest.raises(ConfigError) as info:
        cfgmod.parse(tomllib.loads(text), base=base)
    problems = info.value.problems
    mine = [p for p in problems if p.startswith(f"{key}: ")]
    assert mine, problems
    assert any(words in p for p in mine), problems
    for p in problems:
        assert "\n" not in p and "Traceback" not in p
        assert "instance of" not in p, p  # no pydantic class names


def test_every_problem_at_once(base: Path) -> None:
    """One file with a bad key in each section: every problem is listed, in one run."""
    text = "\n".join(
        [
            "bogus = 1",
            "[daemon]",
            'listen = "nope"',
            'warmup_timeout = "soon"',
            "[[components]]",
            'name = "Bad"',
            "[[components]]",
            'name = "b"',
            'branch = "a b"',
        ]
    )
    with pytest.raises(ConfigError) as info:
        cfgmod.parse(tomllib.loads(text), base=base)
    keys = {p.split(": ", 1)[0] for p in info.value.problems}
    assert keys >= {
        "bogus",
        "daemon.listen",
        "daemon.warmup_timeout",
        "components[0].name",
        "components[1].branch",
    }


FILE_CASES: list[tuple[str, bytes, str]] = [
    ("not-toml", b"[daemon\nstate_dir = 1", "is not valid TOML"),
    ("not-utf8", b"\xff\xfe[daemon]", "is not valid TOML"),
    ("duplicate-table", b"[daemon]\n[daemon]\n", "is not valid TOML"),
    ("binary", bytes(range(256)), "is not valid TOML"),
    ("deep-nesting", b"a = " + b"[" * 100_000 + b"]" * 100_000, "nested too deeply to read"),
    ("deep-tables", b"a = " + b"{b = " * 5000 + b"1" + b"}" * 5000, "nested too deeply to read"),
]


@pytest.mark.parametrize(
    ("content", "words"), [c[1:] for c in FILE_CASES], ids=[c[0] for c in FILE_CASES]
)
def test_unreadable_files(tmp_path: Path, content: bytes, words: str) -> None:
    path = tmp_path / "config.toml"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=words):
        cfgmod.load(path)


def test_check_config_exits_2_with_every_problem_on_its_own_line(base: Path) -> None:
    path = base / "config.toml"
    path.write_text('[daemon]\napi_token = ""\nstate_dir = ""\n[[components]]\nname = "../x"\n')
    proc = subprocess.run(
        [*DEPLOYD, "check-config", "-c", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ},
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.startswith("deployd: error: ")
    lines = proc.stderr.splitlines()
    assert any(line.strip().startswith("daemon.api_token: is empty") for line in lines)
    assert any(line.strip().startswith("daemon.state_dir: is empty") for line in lines)
    assert any(line.strip().startswith("components[0].name: '../x'") for line in lines)
    assert not (base / "var").exists()  # nothing was created
