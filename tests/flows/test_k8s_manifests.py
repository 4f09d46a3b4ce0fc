"""`deployd flow manifests NAME [--version N]` (issue 13) against a real daemon's state: the
YAML it prints is what deployd would apply (strictly valid, the artifact's real sha256), with
no secret in it; an unknown flow or version is refused with a clear message."""

from __future__ import annotations

from pathlib import Path

import yaml

from deployd.runtime.kubernetes import artifacts
from tests.conftest import db_rows
from tests.flows.conftest import FlowEnv, flow_toml
from tests.kubernetes.test_manifests import validate

KUBE = """
[runtime.kubernetes]
image = "registry.example.com/deployd-step:1"
public_url = "https://deployd.example.com"
"""


def test_flow_manifests_prints_valid_yaml_without_secrets(make_env: object) -> None:
    env: FlowEnv = make_env(extra_toml=KUBE)  # type: ignore[operator]
    out = env.out()
    steps = [
        {"id": "tick", "component": "hello", "function": "ticker", "interval": "50ms"},
        {
            "id": "Write_Out",
            "component": "hello",
            "function": "write",
            "config": {"out": out, "password": "hunter2"},
            "env": {"API_KEY": "very-secret-value"},
            "replicas": 2,
            "memory": "128Mi",
        },
    ]
    env.apply(flow_toml("orders", out, steps=steps))
    res = env.daemon.cli("flow", "manifests", "orders")
    assert "hunter2" not in res.stdout and "very-secret-value" not in res.stdout
    docs = list(yaml.safe_load_all(res.stdout))
    assert [d["kind"] for d in docs] == ["Secret", "Deployment"] * 2
    for doc in docs:
        validate(doc)
    deploy = docs[3]
    assert deploy["spec"]["replicas"] == 2
    assert deploy["metadata"]["labels"]["deployd.io/step"] == "Write_Out"
    assert deploy["metadata"]["labels"]["deployd.io/flow-version"] == "1"
    (row,) = db_rows(env.daemon.state_dir, "SELECT artifact_dir FROM versions WHERE version = 1")
    env_vars = {e["name"]: e for e in deploy["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env_vars["DEPLOYD_ARTIFACT_SHA256"]["value"] == artifacts.digest(
        Path(row["artifact_dir"])
    )
    assert env_vars["DEPLOYD_ARTIFACT_URL"]["value"].endswith("/api/v1/artifacts/hello/1")
    same = env.daemon.cli("flow", "manifests", "orders", "--version", "1")
    assert same.stdout == res.stdout

    missing = env.daemon.cli("flow", "manifests", "orders", "--version", "9", check=False)
    assert missing.returncode == 2  # a usage error: FlowError
    assert "flow orders has no version 9 (its versions: 1)" in missing.stderr
    unknown = env.daemon.cli("flow", "manifests", "nope", check=False)
    assert unknown.returncode == 1  # no such flow: exit 1 in every command
    assert "unknown flow 'nope'" in unknown.stderr


def test_placement_kubernetes_without_a_cluster_fails_a_publish_clearly(
    make_env: object, amqp_url: str
) -> None:
    """Never silently local: with placement = "kubernetes" and no cluster to reach (no
    kubeconfig, not in a pod), a publish is a failed deployment that says why and what to do,
    and nothing of it runs here."""
    toml = (
        f'[runtime]\ndefault = "rabbitmq"\n[runtime.rabbitmq]\nurl = "{amqp_url}"\n'
        'placement = "kubernetes"\n' + KUBE
    )
    env: FlowEnv = make_env(extra_toml=toml)  # type: ignore[operator]
    out = env.out()
    res = env.apply(flow_toml("orders", out), check=False)
    assert res.returncode == 1
    assert "cannot use the in-cluster service account" in res.stdout
    deploy = env.wait_deploy("orders", 1)
    assert deploy["status"] == "failed"
    assert "set kubeconfig to a file" in deploy["reason"]
    assert not out.exists()
