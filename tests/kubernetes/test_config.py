"""[runtime.kubernetes] and placement = "kubernetes": the keys of issue 13, each checked with
a message that names the key and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from deployd import config as cfgmod
from tests.test_config import problems_of, write

GOOD = """
[runtime.rabbitmq]
url = "amqp://u:p@localhost:5672/"
placement = "kubernetes"

[runtime.kubernetes]
namespace = "deployd-flows"
kubeconfig = "kube/config"
image = "registry.example.com/deployd-step:1"
public_url = "https://deployd.example.com/"
"""


def test_the_contract_keys(tmp_path: Path) -> None:
    cfg = cfgmod.load(write(tmp_path / "config.toml", GOOD))
    kube = cfg.runtime.kubernetes
    assert cfg.runtime.rabbitmq.placement == "kubernetes"
    assert kube.namespace == "deployd-flows"
    assert kube.kubeconfig == str(tmp_path / "kube" / "config")  # relative to the config file
    assert kube.image == "registry.example.com/deployd-step:1"
    assert kube.public_url == "https://deployd.example.com"


def test_defaults_and_in_cluster(tmp_path: Path) -> None:
    cfg = cfgmod.load(write(tmp_path / "config.toml", "[runtime.kubernetes]\n"))
    assert cfg.runtime.kubernetes.namespace == "deployd-flows"
    assert cfg.runtime.kubernetes.kubeconfig == ""  # the in-cluster service account
    assert cfg.runtime.rabbitmq.placement == "local"


def test_kubeconfig_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KUBECONFIG", "/etc/kube/admin.conf")
    text = GOOD.replace('"kube/config"', '"${KUBECONFIG}"')
    cfg = cfgmod.load(write(tmp_path / "config.toml", text))
    assert cfg.runtime.kubernetes.kubeconfig == "/etc/kube/admin.conf"


def test_placement_kubernetes_needs_image_url_and_broker(tmp_path: Path) -> None:
    problems = problems_of('[runtime.rabbitmq]\nplacement = "kubernetes"\n', tmp_path)
    text = "\n".join(problems)
    assert 'runtime.kubernetes.image: placement is "kubernetes" but no step image' in text
    assert 'runtime.kubernetes.public_url: placement is "kubernetes"' in text
    assert 'runtime.rabbitmq.url: placement is "kubernetes" but no broker url' in text


@pytest.mark.parametrize(
    ("line", "words"),
    [
        ('namespace = "Flows_NS"', "runtime.kubernetes.namespace: 'Flows_NS' is not a Kubernetes"),
        ('image = "no spaces allowed"', "runtime.kubernetes.image: 'no spaces allowed' is not an"),
        ('public_url = "ftp://x"', "runtime.kubernetes.public_url: 'ftp://x' is not an http(s)"),
        ('public_url = "https://u:p@x"', "runtime.kubernetes.public_url: must be scheme://host"),
        ("replicas = 2", "runtime.kubernetes.replicas: unknown key"),
    ],
)
def test_bad_values_name_their_key(tmp_path: Path, line: str, words: str) -> None:
    problems = problems_of(f"[runtime.kubernetes]\n{line}\n", tmp_path)
    assert any(words in p for p in problems), problems


def test_placement_must_be_known(tmp_path: Path) -> None:
    problems = problems_of('[runtime.rabbitmq]\nplacement = "nomad"\n', tmp_path)
    assert any(p.startswith("runtime.rabbitmq.placement:") and "kubernetes" in p for p in problems)
