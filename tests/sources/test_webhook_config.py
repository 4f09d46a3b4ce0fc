"""Configuration rules of issue 4: unsigned hooks only on loopback, remote urls without secrets."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from deployd import config as cfgmod
from deployd.errors import ConfigError
from tests.conftest import Daemon


def parse(
    tmp_path: Path, daemon: dict[str, object], *components: dict[str, object]
) -> cfgmod.Config:
    return cfgmod.parse(
        {"daemon": {"state_dir": str(tmp_path / "var"), **daemon}, "components": list(components)},
        base=tmp_path,
    )


def problems(
    tmp_path: Path, daemon: dict[str, object], *components: dict[str, object]
) -> list[str]:
    with pytest.raises(ConfigError) as err:
        parse(tmp_path, daemon, *components)
    return err.value.problems


def test_a_component_without_secret_needs_a_loopback_listen(tmp_path: Path) -> None:
    parse(tmp_path, {"listen": "127.0.0.1:8787"}, {"name": "a"})
    parse(tmp_path, {"listen": "[::1]:8787"}, {"name": "a"})
    found = problems(
        tmp_path,
        {"listen": "0.0.0.0:8787"},
        {"name": "a", "webhook_secret": "s"},
        {"name": "b"},
    )
    assert len(found) == 1
    assert found[0].startswith("components[1].webhook_secret: required because daemon.listen")


def test_remote_urls(tmp_path: Path) -> None:
    for url in (
        "https://git.example.com/acme/billing.git",
        "ssh://git@git.example.com:2222/acme/billing.git",
        "git@github.com:acme/billing.git",
        "git://127.0.0.1:9418/billing.git",
    ):
        comp = parse(tmp_path, {}, {"name": "a", "url": url}).components[0]
        assert comp.mirrored and comp.poll_every(180.0) == 180.0
    found = problems(
        tmp_path,
        {},
        {"name": "a", "url": "https://deploy:hunter22@git.example.com/acme/billing.git"},
        {"name": "b", "url": "ext::sh -c evil"},
        {"name": "c", "url": "--upload-pack=evil"},
    )
    assert any(p.startswith("components[0].url: contains a password") for p in found)
    assert any(p.startswith("components[1].url:") for p in found)
    assert any(p.startswith("components[2].url:") for p in found)
    assert not any("hunter22" in p for p in found)


def test_which_components_are_polled(tmp_path: Path) -> None:
    bare = tmp_path / "r.git"
    (bare / "objects").mkdir(parents=True)
    (bare / "HEAD").write_text("ref: refs/heads/main\n")
    cfg = parse(
        tmp_path,
        {"poll_interval": "2m"},
        {"name": "hosted"},
        {"name": "watched", "url": str(bare)},
        {"name": "unwatched", "url": f"file://{bare}", "watch": False},
        {"name": "forced", "url": str(bare), "poll_interval": "30s"},
        {"name": "off", "url": "https://git.example.com/x.git", "poll_interval": "0"},
    )
    every = {c.name: c.poll_every(cfg.daemon.poll_interval) for c in cfg.components}
    assert every == {"hosted": 0, "watched": 0, "unwatched": 120, "forced": 30, "off": 0}


def test_check_config_and_serve_refuse_unsigned_hooks_off_loopback(
    daemon_factory: Callable[..., Daemon],
) -> None:
    d = daemon_factory(components=[{"name": "hello"}])
    d.write_config()
    d.config_path.write_text(d.config_path.read_text().replace("127.0.0.1:", "0.0.0.0:"))
    for command in ("check-config", "serve"):
        proc = d.cli(command, check=False)
        assert proc.returncode == 2, proc.stdout + proc.stderr
        assert "components[0].webhook_secret: required" in proc.stderr
    assert not d.state_dir.exists()  # refused before touching any state


def test_secrets_are_never_shown(daemon_factory: Callable[..., Daemon]) -> None:
    d = daemon_factory(components=[{"name": "hello", "webhook_secret": "${HELLO_HOOK_SECRET}"}])
    d.env["HELLO_HOOK_SECRET"] = "very-secret-value-123"
    d.write_config()
    out = d.cli("check-config")
    assert "secret set" in out.stdout and "very-secret-value-123" not in out.stdout + out.stderr
    d.start()
    status = d.cli("status", "--json").stdout
    assert "very-secret-value-123" not in status
    assert "very-secret-value-123" not in d.log()
