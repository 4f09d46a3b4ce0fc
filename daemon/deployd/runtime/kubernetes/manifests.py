"""What deployd applies to run a flow version's steps on Kubernetes: per step, a Deployment
and the Secret it reads, as plain dicts (what `deployd flow manifests` prints as YAML and the
orchestrator applies).

- **Names** (`object_name`): `<flow>-<step>-v<version>-<hash>`, flow and step slugs cut so
  the whole is at most 63 characters (a DNS label, as pod names derived from it need), the
  hash (8 hex of sha256 over the exact flow, step id and version) keeping two steps whose
  slugs are the same (`a_b`, `a-b`, long prefixes) apart.
- **Labels**: `app.kubernetes.io/managed-by=deployd`, `deployd.io/flow`, `deployd.io/step`,
  `deployd.io/flow-version`: what reconciliation lists by. The exact step id is also an
  annotation (a label value cannot end in '_' or '-').
- **Secrets** (a step's `env`, its config — which may hold `${VAR}` values and credentials —,
  the flow's variables, the broker url and the pod's tokens) are only in the Secret; the
  Deployment names its keys (`secretKeyRef`). Rendered for review (`reveal=False`), every value
  of the Secret is a placeholder.
- Mapper steps have no Deployment: the router evaluates mappings (as on the other runtimes),
  so they cost no pod.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ...config import KubernetesConfig
from ...types import FlowVersionToRun, RunStep, StepKind

MANAGED_BY = "app.kubernetes.io/managed-by"
FLOW_LABEL = "deployd.io/flow"
STEP_LABEL = "deployd.io/step"
VERSION_LABEL = "deployd.io/flow-version"
STEP_ANNOTATION = "deployd.io/step-id"
SHA_ANNOTATION = "deployd.io/artifact-sha256"
OWNER = "deployd"

# The pod's layout (the entrypoint, `pod.py`, reads the same names).
ARTIFACT_DIR = "/var/lib/deployd-step/artifact"
PROBE_PORT = 8080
COMMAND = ["python3", "-m", "deployd.runtime.kubernetes.pod"]
USER_ID = 10001
# cpu and memory of a step that names none (requests = limits).
DEFAULT_CPU = "250m"
DEFAULT_MEMORY = "256Mi"
HIDDEN = "<set by deployd when it applies this version>"

_LABEL_VALUE_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9_.-]{0,61}[A-Za-z0-9])?$")


def _hash(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:8]


def _slug(text: str, size: int) -> str:
    return re.sub(r"[^a-z0-9-]+", "-", text.lower())[:size].strip("-")


def object_name(flow: str, step: str, version: int) -> str:
    """The Deployment's (and its Secret's) name: a DNS label of at most 63 characters, unique
    for each (flow, step id, version)."""
    parts = [_slug(flow, 22), _slug(step, 18), f"v{version}", _hash(flow, step, str(version))]
    return "-".join(p for p in parts if p)


def step_label(step: str) -> str:
    """The step id as a label value (its slug and hash where the id cannot be one)."""
    if _LABEL_VALUE_RE.match(step):
        return step
    return f"{_slug(step, 50) or 'step'}-{_hash(step)}"


def gate_queue(flow: str, step: str, version: int) -> str:
    """The queue a step's pods wait on before their first call or message: deployd opens it
    (one message) when the version starts — at a switch, once the old version's pods of that
    step are gone, so a trigger hands over at a call boundary and an action's queue has one
    consumer at a time (its order kept)."""
    return f"deployd.{flow}.{step}.v{version}.go"


def hooks_queue(flow: str, step: str, version: int) -> str:
    """The queue a trigger pod takes its `startup()`/`shutdown()` requests from (`hooks.py`):
    declared by the pod only, deleted by deployd with the version's objects."""
    return f"deployd.{flow}.{step}.v{version}.hooks"


def labels(flow: str, step: str, version: int) -> dict[str, str]:
    return {
        MANAGED_BY: OWNER,
        FLOW_LABEL: flow,
        STEP_LABEL: step_label(step),
        VERSION_LABEL: str(version),
    }


@dataclass(frozen=True)
class PodSecrets:
    """What only the Secret holds besides the step's own values: the broker url and the pod's
    tokens (the artifact download's, the object storage's)."""

    amqp_url: str
    artifact_token: str
    object_token: str


def _resources(step: RunStep) -> dict[str, dict[str, str]]:
    cpu = step.cpu or {"request": DEFAULT_CPU, "limit": DEFAULT_CPU}
    memory = step.memory or {"request": DEFAULT_MEMORY, "limit": DEFAULT_MEMORY}
    return {
        "requests": {"cpu": cpu["request"], "memory": memory["request"]},
        "limits": {"cpu": cpu["limit"], "memory": memory["limit"]},
    }


def step_document(
    spec: FlowVersionToRun, step: RunStep, config: Mapping[str, Any], max_queue: int = 10000
) -> str:
    """What the pod's sailor is told about its step (the Secret's `step.json`): its cfg, the
    flow's variables and the step's env are secrets, so this is never in the Deployment.
    `next`: the step its outputs go to, with that step's mapping (applied before they are
    published to its queue, as the daemon's router does) and its queue's limit (`max_queue`,
    the daemon's default where the step names none): the pod holds back while it is full."""
    index = spec.steps.index(step)
    after = spec.steps[index + 1] if index + 1 < len(spec.steps) else None
    return json.dumps(
        {
            "flow": spec.flow,
            "flow_version": spec.version,
            "step": step.id,
            "kind": str(step.kind),
            "component": step.component,
            "version": step.version,
            "function": step.function,
            "main": step.main,
            "runtime": step.runtime,
            "interval": step.interval,
            "prefetch": step.prefetch,
            "credential": step.credential,
            "config": dict(config),
            "variables": dict(spec.variables),
            "env": dict(step.env),
            "next": None
            if after is None
            else {
                "step": after.id,
                "mapping": after.mapping,
                "max_queue": after.max_queue or max_queue,
            },
        },
        sort_keys=True,
        separators=(",", ":"),
    )


def render(
    spec: FlowVersionToRun,
    kube: KubernetesConfig,
    digests: Mapping[tuple[str, int], str],
    *,
    stop_timeout: float,
    secrets: PodSecrets | None,
    configs: Mapping[str, Mapping[str, Any]] | None = None,
    max_queue: int = 10000,
) -> list[dict[str, Any]]:
    """A Secret and a Deployment for every trigger and action step of `spec`, in flow order.

    `digests`: the sha256 of each (component, version)'s archive (`artifacts.py`).
    `secrets`: None renders for review, every Secret value a placeholder. `configs`: a step's
    cfg as its process gets it (its credential merged), by step id; else the flow file's.
    `max_queue`: `daemon.max_queue`, the limit of a step's queue that names none.
    """
    out: list[dict[str, Any]] = []
    for step in spec.steps:
        if step.kind == StepKind.MAPPER:
            continue
        config = (configs or {}).get(step.id, step.config)
        name = object_name(spec.flow, step.id, spec.version)
        values = {"step.json": step_document(spec, step, config, max_queue)}
        values |= {f"env.{key}": value for key, value in step.env.items()}
        if secrets is not None:
            values |= {
                "amqp-url": secrets.amqp_url,
                "artifact-token": secrets.artifact_token,
                "object-storage-token": secrets.object_token,
            }
        else:
            values |= {key: "" for key in ("amqp-url", "artifact-token", "object-storage-token")}
        out.append(_secret(name, spec, step, kube, values, reveal=secrets is not None))
        sha = digests[(step.component, step.version)]
        out.append(_deployment(name, spec, step, kube, sha, stop_timeout))
    return out


def _metadata(name: str, spec: FlowVersionToRun, step: RunStep, kube: KubernetesConfig) -> Any:
    return {
        "name": name,
        "namespace": kube.namespace,
        "labels": labels(spec.flow, step.id, spec.version),
        "annotations": {STEP_ANNOTATION: step.id},
    }


def _secret(
    name: str,
    spec: FlowVersionToRun,
    step: RunStep,
    kube: KubernetesConfig,
    values: dict[str, str],
    reveal: bool,
) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": _metadata(name, spec, step, kube),
        "type": "Opaque",
        "immutable": True,  # a flow version never changes; a new one gets new Secrets
    }
    if reveal:
        doc["data"] = {k: base64.b64encode(v.encode()).decode() for k, v in sorted(values.items())}
    else:
        doc["stringData"] = {k: HIDDEN for k in sorted(values)}
    return doc


def _secret_env(name: str, secret: str, key: str) -> dict[str, Any]:
    return {"name": name, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}}


def _deployment(
    name: str,
    spec: FlowVersionToRun,
    step: RunStep,
    kube: KubernetesConfig,
    sha: str,
    stop_timeout: float,
) -> dict[str, Any]:
    pod_labels = labels(spec.flow, step.id, spec.version)
    url = kube.public_url or "https://deployd.invalid"
    env: list[dict[str, Any]] = [
        {"name": "DEPLOYD_URL", "value": url},
        {
            "name": "DEPLOYD_ARTIFACT_URL",
            "value": f"{url}/api/v1/artifacts/{step.component}/{step.version}",
        },
        {"name": "DEPLOYD_ARTIFACT_SHA256", "value": sha},
        {"name": "DEPLOYD_ARTIFACT_DIR", "value": ARTIFACT_DIR},
        {"name": "DEPLOYD_PROBE_PORT", "value": str(PROBE_PORT)},
        _secret_env("DEPLOYD_STEP", name, "step.json"),
        _secret_env("DEPLOYD_AMQP_URL", name, "amqp-url"),
        _secret_env("DEPLOYD_ARTIFACT_TOKEN", name, "artifact-token"),
        {"name": "ELASTICIO_FLOW_ID", "value": spec.flow},
        {"name": "ELASTICIO_FLOW_VERSION", "value": str(spec.version)},
        {"name": "ELASTICIO_STEP_ID", "value": step.id},
        {"name": "ELASTICIO_COMP_ID", "value": step.component},
        {"name": "ELASTICIO_FUNCTION", "value": step.function},
        {"name": "ELASTICIO_API_URI", "value": url},
        {"name": "ELASTICIO_OBJECT_STORAGE_URI", "value": url},
        _secret_env("ELASTICIO_OBJECT_STORAGE_TOKEN", name, "object-storage-token"),
    ]
    env += [_secret_env(key, name, f"env.{key}") for key in sorted(step.env)]
    probe = {"path": "/readyz", "port": "probe"}
    container = {
        "name": "step",
        "image": kube.image or "deployd-step:unset",
        "imagePullPolicy": "IfNotPresent",
        "command": list(COMMAND),
        "env": env,
        "ports": [{"name": "probe", "containerPort": PROBE_PORT, "protocol": "TCP"}],
        "readinessProbe": {
            "httpGet": probe,
            "periodSeconds": 2,
            "timeoutSeconds": 2,
            "failureThreshold": 3,
        },
        "livenessProbe": {
            "httpGet": {"path": "/healthz", "port": "probe"},
            "initialDelaySeconds": 10,
            "periodSeconds": 10,
            "timeoutSeconds": 5,
            "failureThreshold": 3,
        },
        "resources": _resources(step),
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
            "runAsUser": USER_ID,
            "runAsGroup": USER_ID,
            "capabilities": {"drop": ["ALL"]},
        },
        "volumeMounts": [
            {"name": "artifact", "mountPath": ARTIFACT_DIR},
            {"name": "tmp", "mountPath": "/tmp"},
        ],
    }
    meta = _metadata(name, spec, step, kube)
    meta["annotations"][SHA_ANNOTATION] = sha
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": meta,
        "spec": {
            "replicas": step.replicas if step.kind == StepKind.ACTION else 1,
            "selector": {"matchLabels": dict(pod_labels)},
            # A trigger never runs twice: its old pod is gone before a new one starts.
            "strategy": {"type": "Recreate" if step.kind == StepKind.TRIGGER else "RollingUpdate"},
            "revisionHistoryLimit": 1,
            "template": {
                "metadata": {
                    "labels": dict(pod_labels),
                    "annotations": {STEP_ANNOTATION: step.id, SHA_ANNOTATION: sha},
                },
                "spec": {
                    "automountServiceAccountToken": False,  # a step never talks to the cluster
                    "enableServiceLinks": False,
                    "terminationGracePeriodSeconds": max(1, int(stop_timeout + 5)),
                    "securityContext": {
                        "runAsNonRoot": True,
                        "fsGroup": USER_ID,
                        "seccompProfile": {"type": "RuntimeDefault"},
                    },
                    "containers": [container],
                    "volumes": [
                        {"name": "artifact", "emptyDir": {"sizeLimit": "1Gi"}},
                        {"name": "tmp", "emptyDir": {"sizeLimit": "256Mi"}},
                    ],
                },
            },
        },
    }
