"""The orchestrator behind placement = "kubernetes": what deployd asks of the cluster, through
lightkube's async client, in the flows namespace only (the Role of deploy/kubernetes).

- `apply(docs)`: server-side apply (field manager "deployd") of a flow version's Secrets and
  Deployments, as `manifests.render` made them.
- `wait_available(flow, version, timeout)`: warm-up. Watches (from the listed
  resourceVersion, no polling) the version's Deployments and Pods until every Deployment is
  available with all its replicas; fails at once with the cluster's reason on a failure it
  reports (ReplicaFailure such as an exceeded quota, ProgressDeadlineExceeded, an image that
  cannot be pulled, a pod that cannot be scheduled); bounded by `timeout`.
- `scale`, `delete_version`: a rollback scales the old version back up; old versions are
  deleted once their switch is final.
- `owned()` and `reconcile(wanted, render)`: crash-only. What deployd owns is listed by the
  label `app.kubernetes.io/managed-by=deployd`; a version deployd's records run that is
  missing is applied again, an orphan (a version no flow runs) is deleted.

Every error of the cluster (forbidden, quota, invalid, unreachable) is a `ClusterError` whose
message is the cluster's own reason, so a failed deployment records it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

import httpx2 as httpx  # lightkube's own transport (lightkube 1.x): its errors are these
from lightkube import AsyncClient, KubeConfig
from lightkube.codecs import from_dict
from lightkube.core.exceptions import ApiError, ConfigError
from lightkube.resources.apps_v1 import Deployment
from lightkube.resources.core_v1 import Pod, Secret

from ...config import KubernetesConfig
from ...errors import FlowError
from .manifests import FLOW_LABEL, MANAGED_BY, OWNER, STEP_LABEL, VERSION_LABEL

FIELD_MANAGER = "deployd"
Selector = dict[str, Any]  # label = value (lightkube's selector type, values all strings)
# Waiting reasons of a container that a wait will not cure.
IMAGE_REASONS = {"ErrImagePull", "ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull"}
FATAL_REASONS = IMAGE_REASONS | {"CreateContainerConfigError", "CrashLoopBackOff"}


class ClusterError(FlowError):
    """The cluster refused or could not do what deployd asked (its reason is the message)."""


def client_for(kube: KubernetesConfig) -> AsyncClient:
    """The client of `kube`: a kubeconfig file, else the pod's service account."""
    logging.getLogger("httpx2").setLevel(logging.WARNING)  # not a log line per request
    try:
        if kube.kubeconfig:
            config = KubeConfig.from_file(kube.kubeconfig)
        else:
            config = KubeConfig.from_service_account()
    except (ConfigError, KeyError, OSError) as exc:
        where = kube.kubeconfig or "the in-cluster service account"
        raise ClusterError(
            f"[runtime.kubernetes] cannot use {where}: {exc} (set kubeconfig to a file, or "
            'run deployd in the cluster with kubeconfig = "")'
        ) from None
    return AsyncClient(config=config, namespace=kube.namespace, field_manager=FIELD_MANAGER)


def _reason(exc: Exception) -> str:
    if isinstance(exc, ApiError):
        status = exc.status
        return f"{status.reason or 'error'} ({status.code}): {status.message}"
    return f"the cluster cannot be reached: {exc}"


def _version_labels(flow: str, version: int) -> Selector:
    return {MANAGED_BY: OWNER, FLOW_LABEL: flow, VERSION_LABEL: str(version)}


class Cluster:
    """deployd's view of the flows namespace."""

    def __init__(self, client: AsyncClient, namespace: str) -> None:
        self.client = client
        self.namespace = namespace

    async def close(self) -> None:
        await self.client.close()

    async def apply(self, docs: Iterable[dict[str, Any]]) -> None:
        """Apply every document: the Secrets together, then the Deployments together (their
        pods read the Secrets). One refusal fails the whole with its reason."""
        docs = list(docs)
        for kind in ("Secret", "Deployment"):
            batch = [d for d in docs if d["kind"] == kind]
            results = await asyncio.gather(
                *(self.client.apply(from_dict(d), force=True) for d in batch),
                return_exceptions=True,
            )
            for doc, result in zip(batch, results, strict=True):
                if isinstance(result, ApiError | httpx.HTTPError):
                    name = doc["metadata"]["name"]
                    raise ClusterError(f"applying {kind} {name}: {_reason(result)}") from None
                if isinstance(result, BaseException):
                    raise result

    async def wait_available(self, flow: str, version: int, timeout: float) -> None:
        """Until every Deployment of the version is available (see the module docstring)."""
        labels = _version_labels(flow, version)
        try:
            async with asyncio.timeout(timeout):
                await self._watch_until_available(labels)
        except TimeoutError:
            pending = await self._not_available(labels)
            raise ClusterError(
                f"not available within warmup_timeout ({timeout:g}s): {', '.join(pending)}"
            ) from None
        except (ApiError, httpx.HTTPError) as exc:
            raise ClusterError(_reason(exc)) from None

    async def _not_available(self, labels: Selector) -> list[str]:
        with contextlib.suppress(Exception):
            return [
                str(d.metadata.name)
                async for d in self.client.list(Deployment, labels=labels)
                if d.metadata is not None and not _available(d)
            ]
        return ["?"]

    async def _watch_until_available(self, labels: Selector) -> None:
        state: dict[str, Deployment] = {}
        listing = self.client.list(Deployment, labels=labels)
        async for d in listing:
            assert d.metadata is not None
            state[str(d.metadata.name)] = d
        if not state:
            raise ClusterError("no Deployment of this version exists in the cluster")
        for name, d in state.items():  # a failure already recorded gets no further event
            problem = _failure(d)
            if problem is not None:
                raise ClusterError(f"Deployment {name}: {problem}")
        if all(_available(d) for d in state.values()):
            return
        deployments = asyncio.ensure_future(
            self._watch_deployments(labels, state, listing.resourceVersion)
        )
        pods = asyncio.ensure_future(self._watch_pods(labels))
        try:
            done, _ = await asyncio.wait({deployments, pods}, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()  # a failure (of either watch) is raised here
        finally:
            for task in (deployments, pods):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, ClusterError, ApiError):
                    await task

    async def _watch_deployments(
        self, labels: Selector, state: dict[str, Deployment], version: str
    ) -> None:
        """Returns once every Deployment in `state` is available; raises on a failure."""
        async for kind, d in self.client.watch(Deployment, labels=labels, resource_version=version):
            assert d.metadata is not None
            if kind == "DELETED":
                raise ClusterError(f"Deployment {d.metadata.name} was deleted meanwhile")
            state[str(d.metadata.name)] = d
            problem = _failure(d)
            if problem is not None:
                raise ClusterError(f"Deployment {d.metadata.name}: {problem}")
            if all(_available(x) for x in state.values()):
                return

    async def _watch_pods(self, labels: Selector) -> None:
        """Raises ClusterError on the first pod that cannot come up; else waits forever."""
        listing = self.client.list(Pod, labels=labels)
        async for pod in listing:
            _check_pod(pod)
        version = None
        with contextlib.suppress(Exception):  # an empty list may carry no version
            version = listing.resourceVersion
        async for _kind, pod in self.client.watch(Pod, labels=labels, resource_version=version):
            _check_pod(pod)

    async def scale_down(self, name: str, timeout: float) -> None:
        """Deployment `name` scaled to 0, then until its Pods are gone (listed by its
        selector, then watched); ClusterError after `timeout`. Not `status.replicas`: that
        counts no terminating pod, so it is 0 while the last one still finishes its call or
        message. A pod the controller has not marked yet is listed, and waited for, too."""
        try:
            async with asyncio.timeout(timeout):
                patched = await self.client.patch(Deployment, name, {"spec": {"replicas": 0}})
                selector = _selector(patched)
                if selector:
                    await self._pods_gone(selector)
        except TimeoutError:
            raise ClusterError(f"Deployment {name} still has pods after {timeout:g}s") from None
        except ApiError as exc:
            if exc.status.code == 404:
                return
            raise ClusterError(f"scaling {name}: {_reason(exc)}") from None
        except httpx.HTTPError as exc:
            raise ClusterError(f"scaling {name}: {_reason(exc)}") from None

    async def _pods_gone(self, labels: Selector) -> None:
        """Until no pod with `labels` is left that still runs (listed, then watched)."""
        listing = self.client.list(Pod, labels=labels)
        left = {_pod_name(pod) async for pod in listing if not _finished(pod)}
        if not left:
            return
        version = None
        with contextlib.suppress(Exception):  # an empty list may carry no version
            version = listing.resourceVersion
        async for kind, pod in self.client.watch(Pod, labels=labels, resource_version=version):
            if kind == "DELETED" or _finished(pod):
                left.discard(_pod_name(pod))
            else:
                left.add(_pod_name(pod))
            if not left:
                return

    async def restarts(self, flow: str, version: int) -> AsyncIterator[tuple[str, str]]:
        """(step label, reason) each time a container of the version's pods restarts."""
        labels = _version_labels(flow, version)
        counts: dict[str, int] = {}
        listing = self.client.list(Pod, labels=labels)
        async for pod in listing:
            counts[_pod_name(pod)] = _restart_count(pod)
        version_seen = None
        with contextlib.suppress(Exception):
            version_seen = listing.resourceVersion
        async for _kind, pod in self.client.watch(
            Pod, labels=labels, resource_version=version_seen
        ):
            name, count = _pod_name(pod), _restart_count(pod)
            if count > counts.get(name, 0):
                counts[name] = count
                step = ((pod.metadata.labels if pod.metadata else None) or {}).get(STEP_LABEL, "")
                yield step, f"pod {name} restarted ({_last_exit(pod)})"

    async def scale(self, name: str, replicas: int) -> None:
        try:
            patch = {"spec": {"replicas": replicas}}
            await self.client.patch(Deployment, name, patch)
        except (ApiError, httpx.HTTPError) as exc:
            raise ClusterError(f"scaling {name}: {_reason(exc)}") from None

    async def delete_version(self, flow: str, version: int) -> int:
        """Delete the version's Deployments and Secrets; how many objects went."""
        return await self._delete(_version_labels(flow, version))

    async def _delete(self, labels: Selector) -> int:
        kinds: tuple[Any, ...] = (Deployment, Secret)
        names: list[tuple[Any, str]] = []
        try:
            for res in kinds:
                async for obj in self.client.list(res, labels=labels):
                    assert obj.metadata is not None and obj.metadata.name is not None
                    names.append((res, obj.metadata.name))
        except (ApiError, httpx.HTTPError) as exc:
            raise ClusterError(_reason(exc)) from None
        results = await asyncio.gather(
            *(self.client.delete(res, name) for res, name in names), return_exceptions=True
        )
        gone = 0
        for result in results:
            if isinstance(result, ApiError) and result.status.code == 404:
                continue  # gone meanwhile: fine
            if isinstance(result, ApiError | httpx.HTTPError):
                raise ClusterError(_reason(result)) from None
            if isinstance(result, BaseException):
                raise result
            gone += 1
        return gone

    async def owned(self) -> set[tuple[str, int]]:
        """(flow, version) of every Deployment or Secret deployd owns in the namespace."""
        out: set[tuple[str, int]] = set()
        try:
            kinds: tuple[Any, ...] = (Deployment, Secret)
            for res in kinds:
                async for obj in self.client.list(res, labels={MANAGED_BY: OWNER}):
                    labels = (obj.metadata.labels if obj.metadata else None) or {}
                    version = labels.get(VERSION_LABEL, "")
                    if FLOW_LABEL in labels and version.isdigit():
                        out.add((labels[FLOW_LABEL], int(version)))
        except (ApiError, httpx.HTTPError) as exc:
            raise ClusterError(_reason(exc)) from None
        return out

    async def deployment_names(self, flow: str, version: int) -> set[str]:
        labels = _version_labels(flow, version)
        try:
            return {
                str(d.metadata.name)
                async for d in self.client.list(Deployment, labels=labels)
                if d.metadata is not None
            }
        except (ApiError, httpx.HTTPError) as exc:
            raise ClusterError(_reason(exc)) from None

    async def reconcile(
        self,
        wanted: set[tuple[str, int]] | Callable[[], set[tuple[str, int]]],
        render: Callable[[str, int], list[dict[str, Any]]],
        busy: Callable[[], set[tuple[str, int]]] = set,
    ) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
        """Make the cluster match deployd's records: (recreated, deleted) versions.

        `wanted`: the (flow, version)s that should run (a callable: asked after the cluster
        was listed and again before each deletion, so a version that starts to run meanwhile
        is never taken for an orphan); `render`: their documents; `busy`: the versions being
        applied, warmed or brought back right now (a warm-up, a rollback) — neither recreated
        nor deleted: what the listing found of them may be half of what is being applied."""
        want = wanted if callable(wanted) else (lambda: set(wanted))
        have = await self.owned()
        recreated, deleted = [], []
        for flow, version in sorted(want() - busy()):
            if (flow, version) not in want() or (flow, version) in busy():  # ended meanwhile
                continue
            docs = render(flow, version)
            names = {d["metadata"]["name"] for d in docs if d["kind"] == "Deployment"}
            if (flow, version) not in have or names - await self.deployment_names(flow, version):
                await self.apply(docs)
                recreated.append((flow, version))
        for flow, version in sorted(have - want() - busy()):
            if (flow, version) in want() | busy():  # started meanwhile
                continue
            await self.delete_version(flow, version)
            deleted.append((flow, version))
        return recreated, deleted


def _available(d: Deployment) -> bool:
    spec, status = d.spec, d.status
    want = spec.replicas if spec is not None and spec.replicas is not None else 1
    if status is None:
        return want == 0
    if (status.observedGeneration or 0) < ((d.metadata.generation if d.metadata else 0) or 0):
        return False
    available = any(c.type == "Available" and c.status == "True" for c in (status.conditions or []))
    return (available or want == 0) and (status.availableReplicas or 0) >= want


def _pod_name(pod: Pod) -> str:
    return str(pod.metadata.name) if pod.metadata else "?"


def _restart_count(pod: Pod) -> int:
    statuses = (pod.status.containerStatuses if pod.status else None) or []
    return sum(int(cs.restartCount or 0) for cs in statuses)


def _last_exit(pod: Pod) -> str:
    for cs in (pod.status.containerStatuses if pod.status else None) or []:
        done = cs.lastState.terminated if cs.lastState else None
        if done is not None:
            return f"exit code {done.exitCode}" + (f", {done.reason}" if done.reason else "")
    return "exited"


def _selector(d: Deployment) -> Selector:
    selector = d.spec.selector if d.spec is not None else None
    return dict((selector.matchLabels if selector is not None else None) or {})


def _finished(pod: Pod) -> bool:
    """A pod whose containers ended (it runs nothing any more)."""
    return pod.status is not None and pod.status.phase in ("Succeeded", "Failed")


def _failure(d: Deployment) -> str | None:
    """The cluster's reason why the Deployment's current generation cannot come up, if any
    (conditions of an older generation are stale: a re-apply or scale-up starts afresh)."""
    status = d.status
    if status is None:
        return None
    if (status.observedGeneration or 0) < ((d.metadata.generation if d.metadata else 0) or 0):
        return None
    for c in status.conditions or []:
        if c.type == "ReplicaFailure" and c.status == "True":
            return f"{c.reason}: {c.message}"
        if c.type == "Progressing" and c.status == "False":
            return f"{c.reason}: {c.message}"
    return None


def _check_pod(pod: Pod) -> None:
    name = pod.metadata.name if pod.metadata else "?"
    status = pod.status
    if status is None:
        return
    for c in status.conditions or []:
        if c.type == "PodScheduled" and c.status == "False" and c.reason == "Unschedulable":
            raise ClusterError(f"pod {name} cannot be scheduled: {c.message}")
    for cs in status.containerStatuses or []:
        waiting = cs.state.waiting if cs.state else None
        if waiting is not None and waiting.reason in FATAL_REASONS:
            raise ClusterError(f"pod {name}: {waiting.reason}: {waiting.message}")
