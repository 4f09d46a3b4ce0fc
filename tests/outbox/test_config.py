"""The config of commit statuses and notifications: every mistake named, with the fix."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from deployd import config as cfgmod
from deployd.errors import ConfigError
from deployd.outbox.providers import api_base, bitbucket_key, shorten, status_request
from tests.conftest import DEPLOYD

pytestmark = pytest.mark.timeout(60)


def problems(raw: dict[str, Any], tmp_path: Path) -> list[str]:
    with pytest.raises(ConfigError) as err:
        cfgmod.parse(raw, base=tmp_path)
    return err.value.problems


def comp(**keys: Any) -> dict[str, Any]:
    return {"components": [{"name": "billing", **keys}]}


def test_report_value_token_and_api_are_checked(tmp_path: Path) -> None:
    out = problems(comp(report="githb"), tmp_path)
    assert any("components[0].report" in p and "'github'" in p for p in out), out
    out = problems(comp(url="https://github.com/acme/billing.git", report="github"), tmp_path)
    assert any("needs report_token" in p for p in out), out
    out = problems(
        comp(report="gitea", report_token="t0k3n-long", report_api="ftp://x", report_repo="a/b"),
        tmp_path,
    )
    assert any("components[0].report_api" in p and "http" in p for p in out), out
    # A hosted repository (no url) names its repository on the service with report_repo.
    out = problems(comp(report="github", report_token="t0k3n-long"), tmp_path)
    assert any("report_repo" in p for p in out), out


def test_repository_from_https_and_ssh_urls(tmp_path: Path) -> None:
    for url in (
        "https://github.com/acme/billing.git",
        "git@github.com:acme/billing.git",
        "ssh://git@github.com/acme/billing",
    ):
        cfg = cfgmod.parse(comp(url=url, report="github", report_token="t0k3n-long"), base=tmp_path)
        c = cfg.components[0]
        assert c.reported_repo == "acme/billing"
        assert api_base(c) == "https://api.github.com"
    cfg = cfgmod.parse(
        comp(
            url="https://gitlab.example.com/grp/sub/billing.git",
            report="gitlab",
            report_token="glpat-xxxx",
        ),
        base=tmp_path,
    )
    c = cfg.components[0]
    assert api_base(c) == "https://gitlab.example.com/api/v4"
    req = status_request(c, {"sha": "a" * 40, "context": "deployd/build", "state": "failure"})
    assert req.url.endswith("/projects/grp%2Fsub%2Fbilling/statuses/" + "a" * 40)
    cfg = cfgmod.parse(
        comp(
            url="https://ghe.example.com/acme/billing.git",
            report="github",
            report_token="t0k3n-long",
        ),
        base=tmp_path,
    )
    assert api_base(cfg.components[0]) == "https://ghe.example.com/api/v3"


def test_descriptions_are_cut_at_a_word_to_140(tmp_path: Path) -> None:
    text = "word " * 60
    cut = shorten(text)
    assert len(cut) <= 140 and cut.endswith("…") and "wor…" not in cut


def test_notify_events_and_secret(tmp_path: Path) -> None:
    out = problems(
        {"notify": [{"url": "https://hooks.slack.com/x", "events": ["deploy.rolledback"]}]},
        tmp_path,
    )
    assert any("did you mean 'deploy.rolled_back'" in p for p in out), out
    out = problems(
        {"notify": [{"url": "https://example.com/h", "format": "json", "events": ["deploy.done"]}]},
        tmp_path,
    )
    assert any("needs secret" in p for p in out), out
    out = problems({"notify": [{"url": "hooks.slack.com/x"}]}, tmp_path)
    assert any("notify[0].url" in p for p in out), out
    out = problems({"daemon": {"public_url": "deployd.example.com"}}, tmp_path)
    assert any("daemon.public_url" in p for p in out), out


def test_check_config_names_the_problems(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text(
        '[daemon]\nstate_dir = "var"\n'
        '[[components]]\nname = "billing"\nurl = "https://github.com/acme/billing.git"\n'
        'report = "gitlub"\n'
        '[[notify]]\nurl = "${HOOK_NOT_SET_ANYWHERE}"\nevents = ["deploy.faild"]\n'
    )
    env = {k: v for k, v in os.environ.items() if k != "HOOK_NOT_SET_ANYWHERE"}
    proc = subprocess.run(
        [*DEPLOYD, "check-config", "-c", str(path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert proc.returncode == 2, proc
    text = proc.stdout + proc.stderr
    assert "components[0].report" in text
    assert "notify[0].url: environment variable HOOK_NOT_SET_ANYWHERE is not set" in text
    assert "did you mean 'deploy.failed'" in text


def test_read_only_commands_run_without_the_daemons_secrets(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text(
        f'[daemon]\nstate_dir = "{tmp_path / "var"}"\n'
        '[[components]]\nname = "billing"\nurl = "https://github.com/acme/billing.git"\n'
        'report = "github"\nreport_token = "${UNSET_STATUS_TOKEN}"\n'
        '[[notify]]\nurl = "${UNSET_CHAT_HOOK}"\nformat = "json"\n'
        'secret = "${UNSET_NOTIFY_SECRET}"\nevents = ["deploy.failed"]\n'
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("UNSET_")}

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*DEPLOYD, *args, "-c", str(path)], capture_output=True, text=True, env=env, timeout=60
        )

    for args in (("status",), ("history",)):
        proc = run(*args)
        assert proc.returncode == 0, (args, proc.stdout, proc.stderr)
    proc = run("check-config")
    assert proc.returncode == 2
    for name in ("UNSET_STATUS_TOKEN", "UNSET_CHAT_HOOK", "UNSET_NOTIFY_SECRET"):
        assert f"environment variable {name} is not set" in proc.stdout + proc.stderr
    proc = run("serve")
    assert proc.returncode == 2
    assert "UNSET_STATUS_TOKEN" in proc.stdout + proc.stderr
    cfg = cfgmod.load(path, secrets=False)
    assert cfg.unset_env == {"UNSET_STATUS_TOKEN", "UNSET_CHAT_HOOK", "UNSET_NOTIFY_SECRET"}
    with pytest.raises(ConfigError):
        cfgmod.load(path)


def test_bitbucket_keys_fit_40_characters() -> None:
    assert bitbucket_key("deployd/build") == "deployd/build"
    long = "deployd/flow/" + "a-very-long-flow-name" * 2
    key = bitbucket_key(long)
    assert len(key) == 40 and key == bitbucket_key(long) and key.startswith("deployd/flow/")
    assert key != bitbucket_key(long + "x")
