"""The manifests deployd renders for steps on Kubernetes (issue 13): names, labels, secrets,
probes and resources; every one validated with `kubernetes-validate --strict` against a pinned
Kubernetes version, and their shape pinned by golden files (`UPDATE_GOLDEN=1` rewrites them)."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes_validate import utils as kv

from deployd.config import KubernetesConfig
from deployd.errors import FlowError
from deployd.flows import model
from deployd.runtime.kubernetes.manifests import (
    FLOW_LABEL,
    MANAGED_BY,
    STEP_LABEL,
    VERSION_LABEL,
    PodSecrets,
    object_name,
    render,
    step_label,
)
from deployd.types import FlowVersionToRun, RunStep, StepKind

K8S_VERSION = "1.33.0"  # pinned: what every manifest is validated against
GOLDEN = Path(__file__).parent / "golden"
SHA = "ab" * 32
KUBE = KubernetesConfig(
    namespace="deployd-flows",
    image="registry.example.com/deployd-step:1",
    public_url="https://deployd.example.com",
)
SECRETS = PodSecrets("amqp://u:p@broker:5672/", "artifact-token-x", "object-token-y")


def validate(doc: dict[str, Any]) -> None:
    """`kubernetes-validate --strict` of one document (raises with the schema's complaint)."""
    kv.validate(doc, K8S_VERSION, strict=True)


def step(id_: str, kind: StepKind = StepKind.ACTION, **kw: Any) -> RunStep:
    base: dict[str, Any] = {
        "component": "hello",
        "version": 3,
        "function": "write" if kind != StepKind.TRIGGER else "ticker",
        "artifact_dir": "/nowhere",
        "main": "write.py",
    }
    return RunStep(id=id_, kind=kind, **{**base, **kw})


def spec(*steps: RunStep, flow: str = "orders", version: int = 7) -> FlowVersionToRun:
    return FlowVersionToRun(flow, version, steps, "rabbitmq", {"REGION": "eu"})


def sample() -> FlowVersionToRun:
    return spec(
        step("tick", StepKind.TRIGGER, main="tick.py"),
        step(
            "write",
            config={"out": "/tmp/out", "password": "hunter2"},
            env={"API_KEY": "s3cret-value"},
            replicas=3,
            cpu={"request": "100m", "limit": "1"},
            memory={"request": "128Mi", "limit": "512Mi"},
        ),
        step("map", StepKind.MAPPER, component="", function="", main=""),
    )


def render_sample(secrets: PodSecrets | None = SECRETS) -> list[dict[str, Any]]:
    return render(sample(), KUBE, {("hello", 3): SHA}, stop_timeout=20, secrets=secrets)


def test_every_rendered_manifest_validates_strictly() -> None:
    docs = render_sample() + render_sample(None)
    assert [d["kind"] for d in docs[:4]] == ["Secret", "Deployment", "Secret", "Deployment"]
    assert len(docs) == 8  # the mapper step has no pod
    for doc in docs:
        validate(doc)


def test_the_strict_check_catches_a_wrong_manifest() -> None:
    doc = render_sample()[1]
    doc["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["pth"] = "/x"
    with pytest.raises(kv.ValidationError):
        validate(doc)


def test_labels_and_selector() -> None:
    secret, deploy = render_sample()[2:4]
    want = {MANAGED_BY: "deployd", FLOW_LABEL: "orders", STEP_LABEL: "write", VERSION_LABEL: "7"}
    assert deploy["metadata"]["labels"] == want
    assert secret["metadata"]["labels"] == want
    assert deploy["spec"]["selector"]["matchLabels"] == want
    assert deploy["spec"]["template"]["metadata"]["labels"] == want
    assert deploy["metadata"]["namespace"] == "deployd-flows"


def test_secrets_only_in_the_secret() -> None:
    docs = render_sample()
    deployments = json.dumps([d for d in docs if d["kind"] == "Deployment"])
    for value in ("hunter2", "s3cret-value", "u:p@broker", "artifact-token-x", "object-token-y"):
        assert value not in deployments
    env = {e["name"]: e for e in docs[3]["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["API_KEY"]["valueFrom"]["secretKeyRef"] == {
        "name": docs[2]["metadata"]["name"],
        "key": "env.API_KEY",
    }
    assert "value" not in env["DEPLOYD_AMQP_URL"]
    import base64

    data = {k: base64.b64decode(v).decode() for k, v in docs[2]["data"].items()}
    assert data["env.API_KEY"] == "s3cret-value"
    assert json.loads(data["step.json"])["config"]["password"] == "hunter2"
    assert docs[2]["immutable"] is True


def test_for_review_the_secret_values_are_hidden() -> None:
    text = yaml.safe_dump_all(render_sample(None))
    for value in ("hunter2", "s3cret-value", "u:p@broker", "artifact-token-x"):
        assert value not in text
    assert "set by deployd when it applies this version" in text


def test_resources_replicas_probes_strategy() -> None:
    docs = render_sample()
    trigger, action = docs[1], docs[3]
    assert trigger["spec"]["replicas"] == 1
    assert trigger["spec"]["strategy"] == {"type": "Recreate"}
    assert action["spec"]["replicas"] == 3
    container = action["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"] == {
        "requests": {"cpu": "100m", "memory": "128Mi"},
        "limits": {"cpu": "1", "memory": "512Mi"},
    }
    default = trigger["spec"]["template"]["spec"]["containers"][0]["resources"]
    assert default["requests"] == default["limits"]  # requests = limits when not given apart
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "probe"}
    assert container["image"] == KUBE.image


DNS_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")


@pytest.mark.parametrize(
    ("flow", "step_id", "version"),
    [
        ("a" * 63, "B" * 63, 10**9),
        ("orders", "Write_Out-", 1),
        ("x", "_", 2),
        ("f-" * 31 + "f", "s_" * 31 + "s", 123456),
    ],
)
def test_names_are_dns_labels(flow: str, step_id: str, version: int) -> None:
    name = object_name(flow, step_id, version)
    assert DNS_LABEL.match(name), name
    assert len(name) <= 63
    label = step_label(step_id)
    assert re.match(r"^[A-Za-z0-9]([A-Za-z0-9_.-]{0,61}[A-Za-z0-9])?$", label), label


def test_names_do_not_collide() -> None:
    long = "x" * 40
    names = {
        object_name("orders", "a_b", 1),
        object_name("orders", "a-b", 1),
        object_name("orders", "A-B", 1),
        object_name("orders", long + "1", 1),
        object_name("orders", long + "2", 1),
        object_name("orders", "a-b", 11),
        object_name("orders-a", "b", 1),
        object_name("orders", "a-b", 1),  # the same step: the same name
    }
    assert len(names) == 7


def test_golden_shape() -> None:
    """The whole shape, pinned: a change to it is seen in review (UPDATE_GOLDEN=1 rewrites)."""
    text = yaml.safe_dump_all(render_sample(None), sort_keys=False)
    path = GOLDEN / "orders-v7.yaml"
    if os.environ.get("UPDATE_GOLDEN"):
        path.write_text(text)
    assert text == path.read_text()


# -- flow step keys --------------------------------------------------------------------------


def flow(**action: Any) -> dict[str, Any]:
    return {
        "name": "f",
        "steps": [
            {"id": "t", "component": "c", "function": "tick"},
            {"id": "a", "component": "c", "function": "act", **action},
        ],
    }


def test_step_keys_accepted() -> None:
    spec_ = model.parse(flow(replicas=2, cpu="500m", memory={"request": "128Mi", "limit": "1Gi"}))
    step_ = spec_.steps[1]
    assert step_.replicas == 2
    assert step_.cpu == "500m"
    steps = model.resolve(spec_, {"c": 1})
    assert steps[1].model_dump()["memory"] == {"request": "128Mi", "limit": "1Gi"}


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ({"cpu": "lots"}, "steps[1].cpu: 'lots' is not a cpu quantity"),
        ({"memory": "12 GB"}, "steps[1].memory: '12 GB' is not a memory quantity"),
        ({"replicas": 0}, "steps[1].replicas: Input should be greater than or equal to 1"),
        (
            {"memory": {"request": "1Gi", "limit": "256Mi"}},
            "request '1Gi' is more than limit '256Mi'",
        ),
        ({"cpu": {"request": "1"}}, "steps[1].cpu: must be a quantity"),
        ({"cpu": 2}, 'steps[1].cpu: must be a quantity (e.g. cpu = "500m"'),
    ],
)
def test_step_keys_refused_with_a_clear_message(keys: dict[str, Any], message: str) -> None:
    with pytest.raises(FlowError) as exc:
        model.parse(flow(**keys))
    assert message in str(exc.value)


def test_a_trigger_has_one_replica() -> None:
    raw = flow()
    raw["steps"][0]["replicas"] = 2
    with pytest.raises(FlowError, match="a trigger runs as one process"):
        model.parse(raw)
