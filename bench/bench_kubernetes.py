"""Steps on Kubernetes (issue 13): the control-plane time deployd adds to a publish.

A 10-step flow (a trigger and nine actions) is rendered (a Secret and a Deployment per step,
the real renderer), applied server-side and watched until every Deployment is available,
through lightkube against the loopback Kubernetes API emulator of tests/kubernetes. A
"kubelet" thread plays the pods: it reports a Deployment available as soon as it sees it
applied (pods' own readiness: 0 ms), so the time measured is deployd's alone — rendering,
20 applies, the list and the watches, and noticing the last availability. Then the switch
from the previous version, through deployd's own `KubePlacement.switch`: every old
Deployment scaled to 0 and watched until its pods are gone (the kubelet stops them at once),
each step's start gate closed and opened on a real RabbitMQ (`tests/broker.py`: a quorum
queue declared, "go" published with a confirm; the old action's queue checked for consumers)
— `gap_ms` is the trigger's gap it reports. Then the old version is deleted (2 list + 20
delete requests), as once a switch is final.

Not measured here: a real cluster's API server latency (each request here is a loopback round
trip) and the wait for the records queue to be drained before a gate opens (no pods write
records here).
Target: ≤ 100 ms of control-plane time (publish + switch) on top of the pods' own readiness.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "daemon")]

import aio_pika  # noqa: E402
from lightkube import AsyncClient, KubeConfig  # noqa: E402
from tests.broker import start_broker  # noqa: E402
from tests.kubernetes.emulator import TOKEN, Emulator  # noqa: E402

from deployd.config import DaemonConfig, KubernetesConfig  # noqa: E402
from deployd.paths import Paths  # noqa: E402
from deployd.runtime.kubernetes.cluster import Cluster  # noqa: E402
from deployd.runtime.kubernetes.manifests import PodSecrets, gate_queue, render  # noqa: E402
from deployd.runtime.kubernetes.placement import KubePlacement, KubeRun  # noqa: E402
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
    """Reports each Deployment available as soon as it is applied, and without pods as soon
    as it is scaled to 0 (instant pods)."""
    seen = 0
    while not stop.is_set():
        with emu.cond:
            new = [e for e in emu.events[seen:]]
            seen = len(emu.events)
            if not new:
                emu.cond.wait(0.5)
                continue
        for _rv, kind, _ns, plural, obj in new:
            if plural != "deployments" or kind == "DELETED":
                continue
            if kind == "ADDED":
                emu.make_available(obj["metadata"]["name"])
            elif obj["spec"].get("replicas") == 0 and (obj.get("status") or {}).get("replicas"):
                emu.set_status(obj["metadata"]["name"], {"replicas": 0, "availableReplicas": 0})


class Gates:
    """The start gates' broker side, as `KubeRuntime` does it (a real RabbitMQ)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.conn: Any = None
        self.channel: Any = None

    async def start(self) -> None:
        self.conn = await aio_pika.connect(self.url)
        self.channel = await self.conn.channel(publisher_confirms=True)

    async def open(self, flow: str, name: str) -> None:
        await self.channel.declare_queue(name, durable=True, arguments={"x-queue-type": "quorum"})
        await self.channel.default_exchange.publish(
            aio_pika.Message(b'"go"', delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
            routing_key=name,
        )

    async def declare(self, run: KubeRun) -> None:
        """Each pod of `run` declares its gate (and an action its queue) at its start."""
        for step in run.spec.steps:
            name = gate_queue(run.spec.flow, step.id, run.spec.version)
            await self.channel.declare_queue(
                name, durable=True, arguments={"x-queue-type": "quorum"}
            )
            if step.kind == StepKind.ACTION:
                await self.channel.declare_queue(
                    f"deployd.{run.spec.flow}.{step.id}",
                    durable=True,
                    arguments={"x-queue-type": "quorum"},
                )

    async def close(self, name: str) -> None:
        await self.channel.queue_delete(name)

    async def unconsumed(self, flow: str, step: str) -> None:
        queue = await self.channel.declare_queue(
            f"deployd.{flow}.{step}", durable=True, arguments={"x-queue-type": "quorum"}
        )
        assert not queue.declaration_result.consumer_count

    async def stop(self) -> None:
        await self.conn.close()


async def rounds(url: str, amqp_url: str, root: Path) -> dict[str, list[float]]:
    config = KubeConfig.from_dict(
        {
            "apiVersion": "v1",
            "kind": "Config",
            "current-context": "emu",
            "clusters": [{"name": "emu", "cluster": {"server": url}}],
            "contexts": [{"name": "emu", "context": {"cluster": "emu", "user": "emu"}}],
            "users": [{"name": "emu", "user": {"token": TOKEN}}],
        }
    )
    cluster = Cluster(
        AsyncClient(config=config, namespace=KUBE.namespace, field_manager="deployd"),
        KUBE.namespace,
    )
    gates = Gates(amqp_url)
    await gates.start()
    placement = KubePlacement(
        KUBE,
        DaemonConfig(rollback_window=3600),  # the old version is deleted here, timed
        Paths(root),
        amqp_url,
        lambda: b"k" * 32,
        lambda spec: {},
        gates.open,
        gates.close,
        gates.unconsumed,
    )
    placement._cluster = cluster  # the bench's client (no kubeconfig file)
    out: dict[str, list[float]] = {
        k: [] for k in ("render_ms", "publish_ms", "switch_ms", "gap_ms", "delete_ms", "total_ms")
    }
    old: KubeRun | None = None
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
            new = KubeRun(spec(version), placement, docs)
            await gates.declare(new)  # what each pod does before it is ready: not timed
            t2b = time.perf_counter()
            if old is None:
                await placement.run(new)
                gap = 0.0
            else:
                gap = await placement.switch(old, new)
            t3 = time.perf_counter()
            if old is not None:
                if old.retire is not None:
                    old.retire.cancel()
                if old.closing is not None:
                    await old.closing  # its gates (after the switch, so timed with the delete)
                await cluster.delete_version("bench", version - 1)
            t4 = time.perf_counter()
            if version > 1:  # the first round warms the client's connections up
                out["render_ms"].append((t1 - t0) * 1000)
                out["publish_ms"].append((t2 - t0) * 1000)
                out["switch_ms"].append((t3 - t2b) * 1000)
                out["gap_ms"].append(gap)
                out["delete_ms"].append((t4 - t3) * 1000)
                out["total_ms"].append((t2 - t0 + t3 - t2b) * 1000)
            old = new
    finally:
        await placement.close()
        await gates.stop()
    return out


def serve_emulator(conn: Any) -> None:
    """The emulator and its kubelet in a process of their own (a child): in the bench's
    process their threads would take the GIL from deployd's event loop, and that time is
    the emulator's, not deployd's (an API server is another process, usually another host)."""
    emu = Emulator()
    emu.validate = False  # the tests check every object; here only deployd's time counts
    emu.start()
    stop = threading.Event()
    threading.Thread(target=kubelet, args=(emu, stop), daemon=True).start()
    conn.send(emu.url)
    conn.recv()  # until the bench is done
    stop.set()
    emu.close()


def run() -> dict[str, Any]:
    ctx = multiprocessing.get_context("fork")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=serve_emulator, args=(child,), daemon=True)
    proc.start()
    try:
        url = parent.recv()
        with tempfile.TemporaryDirectory(prefix="bench-k8s-") as tmp:
            broker = start_broker(Path(tmp) / "broker", vhosts=1)
            try:
                figures = asyncio.run(rounds(url, broker.vhost_url(), Path(tmp)))
            finally:
                broker.close()
    finally:
        parent.send("done")
        proc.join(10)
        if proc.is_alive():
            proc.kill()
    result: dict[str, Any] = {"steps": STEPS, "rounds": ROUNDS, "target_control_plane_ms": 100}
    for key, values in figures.items():
        values.sort()
        result[key] = {
            "p50": round(statistics.median(values), 1),
            "p95": round(values[int(len(values) * 0.95) - 1], 1),
            "max": round(values[-1], 1),
        }
    result["control_plane_ms_p50"] = result["total_ms"]["p50"]
    result["gap_ms_p50"] = result["gap_ms"]["p50"]
    return result


if __name__ == "__main__":
    import json

    print(json.dumps(run(), indent=2))
