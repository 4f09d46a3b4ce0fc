"""The orchestrator (`runtime/kubernetes/cluster.py`) through lightkube against the loopback
Kubernetes API emulator (`emulator.py`), with the tests setting the status a cluster would:
create, readiness (watched), failures with the cluster's reason (forbidden, quota, image pull,
unschedulable, timeout), scale back (rollback), delete once final, reconcile by label after a
restart (missing recreated, orphans deleted)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from deployd.config import KubernetesConfig
from deployd.runtime.kubernetes.cluster import Cluster, ClusterError, client_for
from deployd.runtime.kubernetes.manifests import render
from tests.kubernetes.emulator import TOKEN, Emulator
from tests.kubernetes.test_manifests import KUBE, SECRETS, SHA, sample

NS = "deployd-flows"


@pytest.fixture
def emu() -> Iterator[Emulator]:
    e = Emulator().start()
    yield e
    e.close()


def kubeconfig(tmp_path: Path, url: str) -> Path:
    path = tmp_path / "kubeconfig"
    path.write_text(
        "apiVersion: v1\nkind: Config\ncurrent-context: emu\n"
        f"clusters: [{{name: emu, cluster: {{server: '{url}'}}}}]\n"
        "contexts: [{name: emu, context: {cluster: emu, user: emu, namespace: deployd-flows}}]\n"
        f"users: [{{name: emu, user: {{token: '{TOKEN}'}}}}]\n"
    )
    return path


def run(emu: Emulator, tmp_path: Path, body: Any, timeout: float = 30) -> Any:
    """body(cluster) in a fresh event loop, with a client from a kubeconfig file."""
    kube = KubernetesConfig(namespace=NS, kubeconfig=str(kubeconfig(tmp_path, emu.url)))

    async def main() -> Any:
        cluster = Cluster(client_for(kube), NS)
        try:
            return await asyncio.wait_for(body(cluster), timeout)
        finally:
            await cluster.close()

    return asyncio.run(main())


def docs(version: int = 7, flow: str = "orders") -> list[dict[str, Any]]:
    spec = sample()
    spec = type(spec)(flow, version, spec.steps, spec.runtime, spec.variables)
    return render(spec, KUBE, {("hello", 3): SHA}, stop_timeout=20, secrets=SECRETS)


def deployments(version: int = 7) -> list[str]:
    return [d["metadata"]["name"] for d in docs(version) if d["kind"] == "Deployment"]


async def later(emu: Emulator, fn: Any, *args: Any) -> None:
    """Call fn(*args) on the emulator once the orchestrator is watching (a short hop)."""
    await asyncio.sleep(0)  # let the waiter list first; events after that reach its watch
    await asyncio.to_thread(fn, *args)


def test_apply_then_wait_until_available_watched(emu: Emulator, tmp_path: Path) -> None:
    async def body(cluster: Cluster) -> None:
        await cluster.apply(docs())
        assert sorted(emu.names("deployments")) == sorted(deployments())
        assert len(emu.names("secrets")) == 2
        waiter = asyncio.ensure_future(cluster.wait_available("orders", 7, 20))
        await asyncio.sleep(0.05)
        assert not waiter.done()
        for name in deployments():
            await later(emu, emu.make_available, name)
        await waiter

    run(emu, tmp_path, body)
    watches = [p for m, p in emu.requests if m == "GET" and "watch=true" in p]
    lists = [p for m, p in emu.requests if m == "GET" and "watch" not in p]
    assert watches, "readiness is watched"
    assert len(lists) <= 3  # listed once (deployments, pods), not polled
    applies = [p for m, p in emu.requests if m == "PATCH"]
    assert all("fieldManager=deployd" in p and "force=true" in p for p in applies)
    secret = emu.get("secrets", deployments()[0])
    assert secret is not None and secret["immutable"] is True


def test_replicas_and_generation_count_for_available(emu: Emulator, tmp_path: Path) -> None:
    async def body(cluster: Cluster) -> None:
        await cluster.apply(docs())
        name = deployments()[1]  # 3 replicas
        waiter = asyncio.ensure_future(cluster.wait_available("orders", 7, 20))
        await later(emu, emu.make_available, deployments()[0])
        partly = {"availableReplicas": 2, "conditions": [{"type": "Available", "status": "True"}]}
        await later(emu, emu.set_status, name, partly)
        await asyncio.sleep(0.1)
        assert not waiter.done()  # 2 of 3 is not available
        await later(emu, emu.make_available, name)
        await waiter

    run(emu, tmp_path, body)


@pytest.mark.parametrize(
    ("setup", "words"),
    [
        (
            lambda e, n: e.set_status(
                n,
                {
                    "conditions": [
                        {
                            "type": "ReplicaFailure",
                            "status": "True",
                            "reason": "FailedCreate",
                            "message": 'pods "x" is forbidden: exceeded quota: flows, '
                            "requested: limits.memory=512Mi",
                        }
                    ]
                },
            ),
            'FailedCreate: pods "x" is forbidden: exceeded quota: flows',
        ),
        (
            lambda e, n: e.set_pod(
                "p1",
                n,
                {
                    "containerStatuses": [
                        {
                            "name": "step",
                            "image": "x",
                            "imageID": "",
                            "ready": False,
                            "restartCount": 0,
                            "state": {
                                "waiting": {
                                    "reason": "ImagePullBackOff",
                                    "message": 'Back-off pulling image "nope:1"',
                                }
                            },
                        }
                    ]
                },
            ),
            'ImagePullBackOff: Back-off pulling image "nope:1"',
        ),
        (
            lambda e, n: e.set_pod(
                "p2",
                n,
                {
                    "conditions": [
                        {
                            "type": "PodScheduled",
                            "status": "False",
                            "reason": "Unschedulable",
                            "message": "0/3 nodes are available: 3 Insufficient cpu.",
                        }
                    ]
                },
            ),
            "cannot be scheduled: 0/3 nodes are available: 3 Insufficient cpu.",
        ),
        (
            lambda e, n: e.set_status(
                n,
                {
                    "conditions": [
                        {
                            "type": "Progressing",
                            "status": "False",
                            "reason": "ProgressDeadlineExceeded",
                            "message": "ReplicaSet has timed out progressing.",
                        }
                    ]
                },
            ),
            "ProgressDeadlineExceeded: ReplicaSet has timed out progressing.",
        ),
    ],
    ids=["quota", "image-pull", "unschedulable", "deadline"],
)
@pytest.mark.parametrize("before", [False, True], ids=["while-waiting", "before-the-wait"])
def test_cluster_failures_carry_the_cluster_reason(
    emu: Emulator, tmp_path: Path, setup: Any, words: str, before: bool
) -> None:
    """Whether the cluster records the failure while deployd watches or before it lists (no
    further event comes then), the wait ends with the cluster's reason, not a timeout."""

    async def body(cluster: Cluster) -> str:
        await cluster.apply(docs())
        if before:
            await asyncio.to_thread(setup, emu, deployments()[1])
        waiter = asyncio.ensure_future(cluster.wait_available("orders", 7, 20))
        if not before:
            await later(emu, setup, emu, deployments()[1])
        with pytest.raises(ClusterError) as exc:
            await waiter
        return str(exc.value)

    assert words in run(emu, tmp_path, body)


def test_forbidden_apply_is_a_clear_error(emu: Emulator, tmp_path: Path) -> None:
    message = (
        'deployments.apps "x" is forbidden: User "system:serviceaccount:deployd:deployd" '
        'cannot patch resource "deployments" in API group "apps" in the namespace "other"'
    )
    emu.fail("PATCH", "deployments", 403, "Forbidden", message)

    async def body(cluster: Cluster) -> str:
        with pytest.raises(ClusterError) as exc:
            await cluster.apply(docs())
        return str(exc.value)

    text = run(emu, tmp_path, body)
    assert "Forbidden (403): " + message in text
    assert emu.names("deployments") == []


def test_the_emulator_checks_request_shapes(emu: Emulator) -> None:
    """What it refuses as the API server would: so the orchestrator's requests passing it
    means they have the documented shape."""
    import httpx

    doc = docs()[1]
    name = doc["metadata"]["name"]
    url = f"{emu.url}/apis/apps/v1/namespaces/{NS}/deployments/{name}"
    auth = {"Authorization": f"Bearer {TOKEN}"}
    apply = {**auth, "Content-Type": "application/apply-patch+yaml"}
    with httpx.Client(timeout=10) as http:
        assert http.patch(url, json=doc, headers=apply).status_code == 400  # no fieldManager
        query = "?fieldManager=deployd&force=true"
        assert (
            http.patch(url + query, json=doc, headers={**apply, "Authorization": "x"}).status_code
            == 401
        )
        bad = {**doc, "spec": {**doc["spec"], "replicas": "three"}}
        answer = http.patch(url + query, json=bad, headers=apply)
        assert answer.status_code == 422 and answer.json()["reason"] == "Invalid"
        other = url.replace(name, "another-name")
        assert http.patch(other + query, json=doc, headers=apply).status_code == 400
        assert http.patch(url + query, json=doc, headers=apply).status_code == 201


def test_warm_up_is_bounded(emu: Emulator, tmp_path: Path) -> None:
    async def body(cluster: Cluster) -> str:
        await cluster.apply(docs())
        with pytest.raises(ClusterError) as exc:
            await cluster.wait_available("orders", 7, 0.5)
        return str(exc.value)

    text = run(emu, tmp_path, body)
    assert "not available within warmup_timeout (0.5s)" in text
    assert deployments()[0] in text


def test_scale_back_and_delete_a_version(emu: Emulator, tmp_path: Path) -> None:
    async def body(cluster: Cluster) -> int:
        await cluster.apply(docs(6))
        await cluster.apply(docs(7))
        await cluster.scale(deployments(6)[1], 0)
        await cluster.scale(deployments(6)[1], 3)  # a rollback scales the old one back up
        return await cluster.delete_version("orders", 7)

    assert run(emu, tmp_path, body) == 4
    assert sorted(emu.names("deployments")) == sorted(deployments(6))
    old = emu.get("deployments", deployments(6)[1])
    assert old is not None and old["spec"]["replicas"] == 3


def test_scaled_down_means_the_pods_are_gone(emu: Emulator, tmp_path: Path) -> None:
    """`status.replicas` counts no terminating pod: it is 0 while the last pod still finishes
    its call; a switch must wait for the pod itself (the new trigger would overlap it)."""
    name, other = deployments(7)[:2]

    async def body(cluster: Cluster) -> None:
        await cluster.apply(docs(7))
        emu.set_pod(f"{name}-pod", name, {"phase": "Running"})
        emu.set_pod(f"{other}-pod", other, {"phase": "Succeeded"})  # ended: not waited for
        emu.set_status(name, {"replicas": 0, "availableReplicas": 0})  # its pod terminating
        with pytest.raises(ClusterError, match="still has pods"):
            await cluster.scale_down(name, 0.5)
        assert emu.get("deployments", name)["spec"]["replicas"] == 0  # type: ignore[index]
        await cluster.scale_down(other, 10)
        await asyncio.gather(
            cluster.scale_down(name, 10), later(emu, emu.remove_pod, f"{name}-pod")
        )
        await cluster.scale_down("no-such-deployment", 10)  # gone already: nothing to wait for

    run(emu, tmp_path, body)


def test_reconcile_after_a_restart(emu: Emulator, tmp_path: Path) -> None:
    """What a daemon killed mid-publish left: v7 half applied, v6 (no flow runs it) whole, and
    another flow's objects. A new client (the restarted daemon) makes it match the records."""

    async def crash(cluster: Cluster) -> None:
        await cluster.apply(docs(6))
        await cluster.apply(docs(7)[:3])  # killed after the trigger and one Secret
        await cluster.apply(docs(1, flow="other"))

    run(emu, tmp_path, crash)

    async def restart(cluster: Cluster) -> Any:
        wanted = {("orders", 7), ("other", 1)}
        first = await cluster.reconcile(wanted, lambda f, v: docs(v, flow=f))
        second = await cluster.reconcile(wanted, lambda f, v: docs(v, flow=f))
        return first, second

    (recreated, deleted), again = run(emu, tmp_path, restart)
    assert recreated == [("orders", 7)]
    assert deleted == [("orders", 6)]
    assert again == ([], [])  # converged
    names = set(emu.names("deployments"))
    assert set(deployments(7)) <= names
    assert not set(deployments(6)) & names
    assert not any(n.startswith("orders-") and "-v6-" in n for n in emu.names("secrets"))


def test_no_kubeconfig_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(ClusterError, match="cannot use the in-cluster service account"):
        client_for(KubernetesConfig())
    with pytest.raises(ClusterError, match="set kubeconfig to a file"):
        client_for(KubernetesConfig(kubeconfig=str(tmp_path / "missing")))


def test_reconcile_never_deletes_a_version_being_warmed_or_brought_back(
    emu: Emulator, tmp_path: Path
) -> None:
    """A warm-up (v8 half applied, busy) and a rollback (v6 runs again from the moment the
    cluster was listed on) race the reconciliation: neither is taken for an orphan."""

    async def body(cluster: Cluster) -> Any:
        await cluster.apply(docs(6))
        await cluster.apply(docs(7))
        await cluster.apply(docs(8)[:2])
        runs = {("orders", 7)}

        def wanted() -> set[tuple[str, int]]:
            now = set(runs)
            runs.add(("orders", 6))  # the rollback to v6 began while the listing was read
            return now

        return await cluster.reconcile(
            wanted, lambda f, v: docs(v, flow=f), lambda: {("orders", 8)}
        )

    recreated, deleted = run(emu, tmp_path, body)
    assert (recreated, deleted) == ([], [])
    names = set(emu.names("deployments"))
    assert set(deployments(6)) | set(deployments(7)) <= names


def test_an_unreachable_api_server_is_a_clear_cluster_error(tmp_path: Path) -> None:
    """Nothing listens where the kubeconfig points: a ClusterError that says so (the publish
    fails with it and the running version goes on), not the HTTP client's own exception."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
    kube = KubernetesConfig(namespace=NS, kubeconfig=str(kubeconfig(tmp_path, url)))

    async def main() -> tuple[str, str]:
        cluster = Cluster(client_for(kube), NS)
        try:
            with pytest.raises(ClusterError) as applying:
                await cluster.apply(docs())
            with pytest.raises(ClusterError) as waiting:
                await cluster.wait_available("orders", 7, 5)
            return str(applying.value), str(waiting.value)
        finally:
            await cluster.close()

    applying, waiting = asyncio.run(main())
    assert applying and waiting
    assert "connect" in (applying + waiting).lower(), (applying, waiting)
