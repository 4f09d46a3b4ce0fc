"""Steps on Kubernetes (issue 13): the control-plane time deployd adds to a publish.

A 10-step flow (a trigger and nine actions) is rendered (a Secret and a Deployment per step,
the real renderer), applied server-side and watched until every Deployment is available,
through lightkube against the loopback Kubernetes API emulator of tests/kubernetes. A
"kubelet" thread plays the pods: it reports a Deployment available as soon as it sees it
applied (pods' own readiness: 0 ms), so the time measured is deployd's alone — rendering,
20 applies, the list and the watches, and noticing the last availability. Then the old
version is deleted (2 list + 20 delete requests), as once a switch is final.

Not measured here: the switch gap on Kubernetes (the runtime's placement does not drive the
switch through the cluster yet; README "Steps on Kubernetes"), and a real cluster's API
server latency (each request here is a loopback round trip).
Target: ≤ 100 ms of control-plane time on top of the pods' own readiness.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "daemon")]

from lightkube import AsyncClient, KubeConfig  # noqa: E402
from tests.kubernetes.emulator import TOKEN, Emulator  # noqa: E402

from deployd.config import KubernetesConfig  # noqa: E402
from deployd.runtime.kubernetes.cluster import Cluster  # noqa: E402
from deployd.runtime.kubernetes.manifests import PodSecrets, render  # noqa: E402
from deployd.types import FlowVersionToRun, RunStep, StepKind  # noqa: E402

STEPS = 10
ROUNDS = 20
KUBE = KubernetesConfig(image="registry.example.com/deployd-step:1", public_url="https://d.example")
SECRETS = PodSecrets("amqp://u:p@rabbit:5672/", "artifact-token", "object-token")


def spec(version: int) -> FlowVersionToRun:
    steps = [
        RunStep(
            id="tick" if i == 0 else f"step{i}",
            kind=StepKind.TRIGGER if i == 0 else StepKind.ACTION,
            component="hello",
            version=1,
            function="ticker" if i == 0 else "write",
            artifact_dir="/nowhere",
            main="lib/x.py",
            config={"i": i},
        )
        for i in range(STEPS)
    ]
    return FlowVersionToRun("bench", version, tuple(steps), "rabbitmq")


def kubelet(emu: Emulator, stop: threading.Event) -> None:
    """Reports each Deployment available as soon as it is applied (instant pods)."""
    seen = 0
    while not stop.is_set():
        with emu.cond:
            new = [e for e in emu.events[seen:]]
            seen = len(emu.events)
            if not new:
                emu.cond.wait(0.5)
                continue
        for _rv, kind, _ns, plural, obj in new:
            if plural == "deployments" and kind == "ADDED":
                emu.make_available(obj["metadata"]["name"])


async def rounds(emu: Emulator) -> dict[str, list[float]]:
    config = KubeConfig.from_dict(
        {
            "apiVersion": "v1",
            "kind": "Config",
            "current-context": "emu",
            "clusters": [{"name": "emu", "cluster": {"server": emu.url}}],
            "contexts": [{"name": "emu", "context": {"cluster": "emu", "user": "emu"}}],
            "users": [{"name": "emu", "user": {"token": TOKEN}}],
        }
    )
    cluster = Cluster(
        AsyncClient(config=config, namespace=KUBE.namespace, field_manager="deployd"),
        KUBE.namespace,
    )
    out: dict[str, list[float]] = {"render_ms": [], "publish_ms": [], "delete_ms": []}
    try:
        for version in range(1, ROUNDS + 2):
            t0 = time.perf_counter()
            docs = render(
                spec(version), KUBE, {("hello", 1): "ab" * 32}, stop_timeout=20, secrets=SECRETS
            )
            t1 = time.perf_counter()
            await cluster.apply(docs)
            await cluster.wait_available("bench", version, 30)
            t2 = time.perf_counter()
            if version > 1:
                await cluster.delete_version("bench", version - 1)
            t3 = time.perf_counter()
            if version > 1:  # the first round warms the client's connections up
                out["render_ms"].append((t1 - t0) * 1000)
                out["publish_ms"].append((t2 - t0) * 1000)
                out["delete_ms"].append((t3 - t2) * 1000)
    finally:
        await cluster.close()
    return out


def run() -> dict[str, Any]:
    emu = Emulator()
    emu.validate = False  # the tests check every object; here only deployd's time counts
    emu.start()
    stop = threading.Event()
    thread = threading.Thread(target=kubelet, args=(emu, stop), daemon=True)
    thread.start()
    try:
        figures = asyncio.run(rounds(emu))
    finally:
        stop.set()
        emu.close()
    result: dict[str, Any] = {"steps": STEPS, "rounds": ROUNDS, "target_control_plane_ms": 100}
    for key, values in figures.items():
        values.sort()
        result[key] = {
            "p50": round(statistics.median(values), 1),
            "p95": round(values[int(len(values) * 0.95) - 1], 1),
            "max": round(values[-1], 1),
        }
    result["control_plane_ms_p50"] = result["publish_ms"]["p50"]
    return result


if __name__ == "__main__":
    import json

    print(json.dumps(run(), indent=2))
