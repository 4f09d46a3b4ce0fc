"""deploy/kubernetes (deployd in a cluster) and deploy/step (the step image): every manifest
validates with `kubernetes-validate --strict`, the Role is least privilege, the config in the
ConfigMap is one deployd accepts, and the image runs what the step Deployments name."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from deployd import config as config_mod
from deployd.runtime.kubernetes.manifests import COMMAND, USER_ID
from tests.kubernetes.test_manifests import validate

ROOT = Path(__file__).resolve().parents[2]
KUSTOMIZE = ROOT / "deploy" / "kubernetes"


def resources() -> list[dict[str, Any]]:
    kustomization = yaml.safe_load((KUSTOMIZE / "kustomization.yaml").read_text())
    docs = []
    for name in kustomization["resources"]:
        docs += [d for d in yaml.safe_load_all((KUSTOMIZE / name).read_text()) if d]
    return docs


def by_kind(kind: str) -> list[dict[str, Any]]:
    return [d for d in resources() if d["kind"] == kind]


def test_kustomization_lists_every_manifest() -> None:
    kustomization = yaml.safe_load((KUSTOMIZE / "kustomization.yaml").read_text())
    files = {p.name for p in KUSTOMIZE.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == files


def test_every_manifest_validates_strictly() -> None:
    docs = resources()
    assert len(docs) >= 9
    for doc in docs:
        validate(doc)


def test_role_is_least_privilege() -> None:
    assert not by_kind("ClusterRole") and not by_kind("ClusterRoleBinding")
    (role,) = by_kind("Role")
    assert role["metadata"]["namespace"] == "deployd-flows"
    granted = {
        (g, r) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"]
    }
    assert granted == {("apps", "deployments"), ("", "secrets"), ("", "pods")}
    for rule in role["rules"]:
        assert "*" not in rule["verbs"]
        if rule["resources"] == ["pods"]:
            assert set(rule["verbs"]) == {"get", "list", "watch"}  # read only
    (binding,) = by_kind("RoleBinding")
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "deployd", "namespace": "deployd"}
    ]


def test_one_replica_with_state_on_a_volume_and_probes() -> None:
    (deploy,) = by_kind("Deployment")
    assert deploy["spec"]["replicas"] == 1
    assert deploy["spec"]["strategy"] == {"type": "Recreate"}
    pod = deploy["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["resources"]["limits"]
    claim = next(v for v in pod["volumes"] if "persistentVolumeClaim" in v)
    (pvc,) = by_kind("PersistentVolumeClaim")
    assert claim["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
    mount = next(m for m in container["volumeMounts"] if m["name"] == claim["name"])
    (cm,) = by_kind("ConfigMap")
    cfg = tomllib.loads(cm["data"]["config.toml"])
    assert cfg["daemon"]["state_dir"] == mount["mountPath"]
    (service,) = by_kind("Service")
    assert service["spec"]["selector"] == deploy["spec"]["selector"]["matchLabels"]


def test_the_configmap_config_is_valid(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DEPLOYD_AMQP_URL", "amqp://u:p@rabbit:5672/")
    (cm,) = by_kind("ConfigMap")
    cfg = config_mod.parse(tomllib.loads(cm["data"]["config.toml"]), base=tmp_path)
    assert cfg.runtime.rabbitmq.placement == "kubernetes"
    assert cfg.runtime.kubernetes.namespace == by_kind("Role")[0]["metadata"]["namespace"]


def test_the_step_image_runs_what_the_deployments_name() -> None:
    text = (ROOT / "deploy" / "step" / "Containerfile").read_text()
    assert f"--uid {USER_ID}" in text and f"USER {USER_ID}" in text
    cmd = next(line for line in text.splitlines() if line.startswith("CMD "))
    assert yaml.safe_load(cmd.removeprefix("CMD ")) == COMMAND
    assert "nodejs" in text  # node components
