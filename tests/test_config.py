"""The config file: check-config, every problem listed at once, resolution order, paths."""

from __future__ import annotations

import os
import subprocess
import textwrap
from pathlib import Path

import pytest

from deployd import config as cfgmod
from deployd.errors import ConfigError
from tests.conftest import DEPLOYD, git


def run(
    *args: str, cwd: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*DEPLOYD, *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, **(env or {})},
        timeout=60,
    )


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def problems_of(text: str, base: Path) -> list[str]:
    path = write(base / "config.toml", text)
    with pytest.raises(ConfigError) as info:
        cfgmod.load(path)
    return info.value.problems


def test_example_config_is_valid(tmp_path: Path) -> None:
    example = Path(__file__).parent.parent / "config.example.toml"
    cfg = cfgmod.load(example)
    assert [c.name for c in cfg.components] == ["hello"]
    assert cfg.state_dir == example.resolve().parent / "var"


def test_check_config_ok_prints_a_summary(tmp_path: Path) -> None:
    bare = tmp_path / "remotes" / "local-one.git"
    git("init", "-q", "--bare", str(bare))
    path = write(
        tmp_path / "config.toml",
        f"""\
        [daemon]
        state_dir = "state"
        listen = "127.0.0.1:9999"
        [[components]]
        name = "hello"
        build_timeout = "90s"
        [[components]]
        name = "local-one"
        url = "{bare}"
        branch = "release"
        """,
    )
    proc = run("check-config", "-c", str(path))
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    out = proc.stdout
    assert f"config {path}: OK" in out
    assert str(tmp_path / "state") in out
    assert "127.0.0.1:9999" in out
    # one line per component, not wrapped even when stdout is not a terminal
    lines = out.splitlines()
    hello = next(line for line in lines if "hello" in line)
    assert "hosted" in hello and "build_timeout 90s" in hello and "no secret" in hello
    local = next(line for line in lines if "local-one" in line)
    assert "release" in local and str(bare) in local


def test_check_config_lists_every_problem_and_exits_2(tmp_path: Path) -> None:
    (tmp_path / "state-file").write_text("not a folder")
    path = write(
        tmp_path / "config.toml",
        """\
        [daemon]
        state_dir = "state-file"
        listen = "127.0.0.1:8787"
        colour = "blue"
        [[components]]
        name = "../x"
        [[components]]
        name = "Upper"
        [[components]]
        name = "dup"
        build_timeout = "10 minutes"
        [[components]]
        name = "dup"
        url = "does/not/exist.git"
        [[components]]
        name = "ok"
        brnach = "main"
        """,
    )
    proc = run("check-config", "-c", str(path))
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.splitlines()
    assert lines[0].startswith("deployd: error: ") and str(path) in lines[0]
    problems = [line.strip() for line in lines[1:]]
    # each problem is `key.path: what is wrong`
    for p in problems:
        key, _, what = p.partition(": ")
        assert key and " " not in key and what, p
    keys = [p.split(": ", 1)[0] for p in problems]
    assert "daemon.colour" in keys
    assert "components[0].name" in keys
    assert "components[1].name" in keys
    assert "components[2].build_timeout" in keys
    assert "components[3].name" in keys  # duplicate
    assert "components[3].url" in keys
    assert "components[4].brnach" in keys
    assert "daemon.state_dir" in keys
    by_key = dict(p.split(": ", 1) for p in problems)
    assert "unknown key" in by_key["daemon.colour"]
    assert "'../x'" in by_key["components[0].name"]
    assert "'Upper'" in by_key["components[1].name"]
    assert "'10 minutes'" in by_key["components[2].build_timeout"]
    assert "already used by components[2]" in by_key["components[3].name"]
    assert str(tmp_path / "does/not/exist.git") in by_key["components[3].url"]
    assert "not a directory" in by_key["daemon.state_dir"]
    assert len(lines[1:]) == len(problems) == int(lines[0].split(" has ")[1].split()[0])


@pytest.mark.parametrize(
    ("snippet", "key", "words"),
    [
        ('[daemon]\nlisten = "nowhere"', "daemon.listen", "HOST:PORT"),
        ('[daemon]\nlisten = "127.0.0.1:70000"', "daemon.listen", "out of range"),
        ('[daemon]\nstop_timeout = "-1s"', "daemon.stop_timeout", "duration"),
        ("[daemon]\nstop_timeout = true", "daemon.stop_timeout", "duration"),
        ('[[components]]\nname = "a"\nbranch = "refs/heads/main"', "components[0].branch", "ref"),
        ('[[components]]\nname = "a"\nbranch = "a..b"', "components[0].branch", "branch"),
        ('[[components]]\nname = ""', "components[0].name", "valid name"),
        ('[[components]]\nname = "' + "a" * 64 + '"', "components[0].name", "valid name"),
        ('[[components]]\nbranch = "main"', "components[0].name", "required"),
        ('components = "hello"', "components", "array of tables"),
        ("[daemon]\nmax_parallel_builds = 0", "daemon.max_parallel_builds", "greater"),
    ],
)
def test_one_bad_value_names_its_key(tmp_path: Path, snippet: str, key: str, words: str) -> None:
    problems = problems_of(snippet + "\n", tmp_path)
    assert len(problems) == 1, problems
    assert problems[0].startswith(f"{key}: ")
    assert words.lower() in problems[0].lower()


def test_durations() -> None:
    assert cfgmod.parse_duration("500ms") == 0.5
    assert cfgmod.parse_duration("2s") == 2
    assert cfgmod.parse_duration("10m") == 600
    assert cfgmod.parse_duration("2h") == 7200
    assert cfgmod.parse_duration("30d") == 30 * 86400
    assert cfgmod.parse_duration("0") == 0
    assert cfgmod.parse_duration(5) == 5
    for bad in ("10", "1 minute", "m", "", "-1s", "1.s"):
        with pytest.raises(ValueError):
            cfgmod.parse_duration(bad)
    for seconds in (0.0, 0.5, 2.0, 90.0, 600.0, 7200.0, 86400.0):
        assert cfgmod.parse_duration(cfgmod.format_duration(seconds)) == seconds


def test_not_toml_and_missing_file(tmp_path: Path) -> None:
    bad = write(tmp_path / "bad.toml", "[daemon\n")
    proc = run("check-config", "-c", str(bad))
    assert proc.returncode == 2
    assert proc.stderr.startswith("deployd: error: ") and "not valid TOML" in proc.stderr
    assert len(proc.stderr.splitlines()) == 1
    proc = run("check-config", "-c", str(tmp_path / "missing.toml"))
    assert proc.returncode == 2
    assert "does not exist" in proc.stderr and len(proc.stderr.splitlines()) == 1


def test_env_secret_must_be_set(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DEPLOYD_NO_SUCH_VAR", raising=False)
    text = '[[components]]\nname = "a"\nwebhook_secret = "${DEPLOYD_NO_SUCH_VAR}"\n'
    problems = problems_of(text, tmp_path)
    assert any(p.startswith("components[0].webhook_secret: ") for p in problems), problems
    monkeypatch.setenv("DEPLOYD_NO_SUCH_VAR", "s3cret")
    cfg = cfgmod.load(tmp_path / "config.toml")
    assert cfg.components[0].secret() == "s3cret"


def test_resolution_order(tmp_path: Path) -> None:
    """-c, else $DEPLOYD_CONFIG, else ./config.toml, else /etc/deployd/config.toml."""
    for name in ("explicit", "env", "cwd"):
        write(
            tmp_path / name / "config.toml",
            f'[daemon]\nstate_dir = "{name}-state"\n[[components]]\nname = "{name}"\n',
        )
    env_cfg = str(tmp_path / "env" / "config.toml")
    explicit = str(tmp_path / "explicit" / "config.toml")
    cwd = tmp_path / "cwd"

    proc = run("check-config", "-c", explicit, cwd=cwd, env={"DEPLOYD_CONFIG": env_cfg})
    assert proc.returncode == 0 and "explicit-state" in proc.stdout
    proc = run("check-config", cwd=cwd, env={"DEPLOYD_CONFIG": env_cfg})
    assert proc.returncode == 0 and "env-state" in proc.stdout
    proc = run("check-config", cwd=cwd)
    assert proc.returncode == 0 and "cwd-state" in proc.stdout
    if not Path("/etc/deployd/config.toml").exists():
        proc = run("check-config", cwd=tmp_path)
        assert proc.returncode == 2
        assert "/etc/deployd/config.toml does not exist" in proc.stderr


def test_relative_paths_are_relative_to_the_config_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    conf_dir = tmp_path / "etc" / "deployd"
    bare = tmp_path / "etc" / "repos" / "lib.git"
    git("init", "-q", "--bare", str(bare))
    (conf_dir / "secrets").mkdir(parents=True)
    (conf_dir / "secrets" / "lib.secret").write_text("abc\n")
    path = write(
        conf_dir / "config.toml",
        """\
        [daemon]
        state_dir = "state"
        [[components]]
        name = "lib"
        url = "../repos/lib.git"
        webhook_secret_file = "secrets/lib.secret"
        """,
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # resolving against the cwd instead would fail loudly
    cfg = cfgmod.load(Path(os.path.relpath(path)))
    assert cfg.state_dir == conf_dir / "state"
    assert cfg.components[0].url == str(bare)
    assert cfg.components[0].secret() == "abc"
    proc = run("check-config", "-c", str(path), cwd=elsewhere)
    assert proc.returncode == 0, proc.stderr
    assert str(conf_dir / "state") in proc.stdout


def test_serve_refuses_a_bad_config_before_touching_state(tmp_path: Path) -> None:
    state = tmp_path / "state"
    path = write(
        tmp_path / "config.toml",
        f"""\
        [daemon]
        state_dir = "{state}"
        listen = "127.0.0.1:1"
        [[components]]
        name = "Bad_Name"
        """,
    )
    proc = run("serve", "-c", str(path))
    assert proc.returncode == 2
    assert "components[0].name: 'Bad_Name'" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not state.exists()


@pytest.mark.parametrize(
    ("snippet", "words"),
    [
        ('[runtime.rabbitmq]\nurl = "http://broker:5672/"', "is not an AMQP url"),
        ('[runtime.rabbitmq]\nurl = "amqp://u:p@host:99999/v"', "out of range"),
        ('[runtime]\ndefault = "rabbitmq"', "url is not set"),
        ('[runtime]\ndefault = "kafka"', "runtime.default"),
        ('[runtime.rabbitmq]\nurl = "amqp://h/"\nplacement = "mars"', "runtime.rabbitmq.placement"),
        ('[runtime.rabbitmq]\nurl = "amqp://h/"\nprefetch = 0', "runtime.rabbitmq.prefetch"),
        ('[runtime.rabbitmq]\nurl = "${NO_SUCH_AMQP_VAR}"', "NO_SUCH_AMQP_VAR is not set"),
    ],
)
def test_runtime_keys_name_what_is_wrong(tmp_path: Path, snippet: str, words: str) -> None:
    assert any(words in p for p in problems_of(snippet, tmp_path)), problems_of(snippet, tmp_path)


def test_the_amqp_url_comes_from_the_environment_and_is_a_secret(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DEPLOYD_AMQP_URL", "amqp://deployd:pw-123@127.0.0.1:5672/flows")
    path = write(tmp_path / "c.toml", '[runtime.rabbitmq]\nurl = "${DEPLOYD_AMQP_URL}"\n')
    cfg = cfgmod.load(path)
    assert cfg.runtime.default == "embedded" and cfg.runtime.rabbitmq.prefetch == 16
    assert cfg.runtime.rabbitmq.url is not None
    assert cfg.runtime.rabbitmq.url.get_secret_value().endswith("/flows")
    assert "pw-123" not in repr(cfg) and "pw-123" not in str(cfg.model_dump())


def test_check_config_shows_the_broker_without_its_password(tmp_path: Path) -> None:
    path = write(
        tmp_path / "c.toml",
        '[runtime]\ndefault = "rabbitmq"\n[runtime.rabbitmq]\n'
        'url = "amqp://deployd:pw-456@broker.example:5672/flows"\n',
    )
    res = run("check-config", "-c", str(path))
    assert res.returncode == 0, res.stderr
    assert "default rabbitmq; rabbitmq at amqp://broker.example:5672/flows" in res.stdout
    assert "pw-456" not in res.stdout + res.stderr
