"""Publishes through the cluster, end to end: a real deployd with placement = "kubernetes" and a
real RabbitMQ, on one of two backends (the `backend` fixture):

- `emulator` (always): the Kubernetes API is the loopback emulator, and a "kubelet" thread of
  the test runs each Deployment's pods as local processes with the Deployment's command and
  environment (`test_pod.container_env`), reports them available once their readiness probe
  passes, and stops them (SIGTERM) when a Deployment is scaled to 0 or deleted.
- `cluster` (optional, issue 13): with DEPLOYD_K8S_E2E=1, a real cluster — KUBECONFIG, the step
  image DEPLOYD_K8S_IMAGE, the namespace DEPLOYD_K8S_NAMESPACE (default deployd-e2e; it must
  exist, with the Role of deploy/kubernetes/rbac.yaml for the kubeconfig's user), the URL
  the pods reach deployd at, DEPLOYD_K8S_PUBLIC_URL, and the HOST:PORT deployd listens on for
  it, DEPLOYD_K8S_LISTEN, and an AMQP url both deployd and the pods reach, DEPLOYD_K8S_AMQP_URL.
  Without DEPLOYD_K8S_E2E=1 it is skipped before anything starts.

Both backends are read through the same calls: the test flow's Deployments and Secrets listed
by label through lightkube, and its output in a local file — on a real cluster the pods cannot
write to this machine's files, so the write steps publish their lines to a queue of the AMQP
url, which a thread of the test appends to that file (`QueueSink`). A test that needs a power
only the test kubelet has is parametrized on `emulator` alone, and says why.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import secrets
import signal
import subprocess
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from lightkube import Client, KubeConfig
from lightkube.core.exceptions import ApiError
from lightkube.resources.apps_v1 import Deployment
from lightkube.resources.core_v1 import Secret

from deployd.config import split_listen
from deployd.runtime.kubernetes.manifests import (
    FLOW_LABEL,
    MANAGED_BY,
    OWNER,
    gate_queue,
    hooks_queue,
)
from deployd.runtime.kubernetes.records import records_queue
from deployd.runtime.rabbitmq.broker import queue_name
from tests.broker import run_async
from tests.conftest import HTTP, Daemon, Work, free_port, wait_until
from tests.flows.conftest import (
    TICKER,
    FlowEnv,
    assert_contiguous,
    counter_files,
    flow_toml,
    read_out,
)
from tests.kubernetes.emulator import Emulator
from tests.kubernetes.test_cluster import docs, kubeconfig, run
from tests.kubernetes.test_pod import container_env

# Each test publishes two or three versions through pods of real processes (~30-40 s on a quiet
# 2-core machine, several times that under load); the bound is the suite's guard, not a goal.
SLOW = pytest.mark.timeout(360)


class Kubelet:
    def __init__(self, emu: Emulator, tmp: Path) -> None:
        self.emu, self.tmp = emu, tmp
        self.pods: dict[str, subprocess.Popen[bytes]] = {}
        self.restarts: dict[str, int] = {}
        self.started: list[str] = []
        self.stop = threading.Event()
        self.paused = threading.Event()  # no new pod starts (an image that never comes up)
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        seen = 0
        while not self.stop.is_set():
            with self.emu.cond:
                new = self.emu.events[seen:]
                seen = len(self.emu.events)
                if not new:
                    self.emu.cond.wait(0.2)
                    continue
            for _rv, kind, _ns, plural, obj in new:
                if plural != "deployments":
                    continue
                name = obj["metadata"]["name"]
                want = 0 if kind == "DELETED" else obj["spec"].get("replicas", 1)
                with self.lock:
                    running = name in self.pods
                if want and not running and not self.paused.is_set():
                    self._start(name)
                elif not want and running:
                    threading.Thread(target=self._end, args=(name,), daemon=True).start()

    def resume(self) -> None:
        """Start the pods every Deployment wants and has not (after a pause)."""
        self.paused.clear()
        for name in self.emu.names("deployments"):
            deploy = self.emu.get("deployments", name)
            with self.lock:
                running = name in self.pods
            if deploy is not None and deploy["spec"].get("replicas", 1) and not running:
                self._start(name)

    def _start(self, name: str) -> None:
        deploy, secret = self.emu.get("deployments", name), self.emu.get("secrets", name)
        if deploy is None or secret is None:
            return
        volume = self.tmp / f"vol-{name}-{len(self.started)}"
        volume.mkdir()
        port = free_port()
        command, env = container_env(deploy, secret, volume, port)
        log = self.tmp / f"pod-{name}-{len(self.started)}.log"
        with log.open("wb") as fh:
            proc = subprocess.Popen(command, env=env, stdout=fh, stderr=subprocess.STDOUT)
        with self.lock:
            self.pods[name] = proc
            self.started.append(name)
            restarts = self.restarts.get(name, 0)
        running = {"name": "step", "image": "deployd-step", "imageID": "", "ready": False}
        running |= {"restartCount": restarts, "state": {"running": {}}}
        with contextlib.suppress(KeyError):  # its Pod, as the API server lists it
            self.emu.set_pod(
                f"{name}-pod", name, {"phase": "Running", "containerStatuses": [running]}
            )
        threading.Thread(target=self._ready, args=(name, proc, port), daemon=True).start()

    def _ready(self, name: str, proc: subprocess.Popen[bytes], port: int) -> None:
        """Available once ready; a pod whose process ends by itself is restarted, with its
        container's restartCount and last state in the Pod's status, as a kubelet does."""
        while proc.poll() is None and not self.stop.is_set():
            with contextlib.suppress(httpx.HTTPError):
                if HTTP.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                    with contextlib.suppress(KeyError):
                        self.emu.make_available(name)
                    break
            self.stop.wait(0.05)
        code = proc.wait()
        with self.lock:
            crashed = self.pods.get(name) is proc and not self.stop.is_set()
            if crashed:
                del self.pods[name]
                self.restarts[name] = self.restarts.get(name, 0) + 1
        if not crashed:
            return
        status = {
            "containerStatuses": [
                {
                    "name": "step",
                    "image": "deployd-step",
                    "imageID": "",
                    "ready": False,
                    "restartCount": self.restarts[name],
                    "lastState": {"terminated": {"exitCode": code, "reason": "Error"}},
                }
            ]
        }
        with contextlib.suppress(KeyError):
            self.emu.set_pod(f"{name}-pod", name, status)
        self._start(name)

    def _end(self, name: str) -> None:
        with self.lock:
            proc = self.pods.pop(name, None)
        if proc is None:
            return
        # As the Deployment controller does: its pod is terminating, which `status.replicas`
        # no longer counts — deployd must wait for the Pod itself to go.
        with contextlib.suppress(KeyError):
            self.emu.set_status(name, {"replicas": 0, "availableReplicas": 0})
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        self.emu.remove_pod(f"{name}-pod")

    def close(self) -> None:
        self.stop.set()
        with self.lock:
            procs = list(self.pods.values())
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)


# --------------------------------------------------------------------------- the two backends

E2E_VARS = (
    "KUBECONFIG",
    "DEPLOYD_K8S_IMAGE",
    "DEPLOYD_K8S_PUBLIC_URL",
    "DEPLOYD_K8S_LISTEN",
    "DEPLOYD_K8S_AMQP_URL",
)
NOT_ASKED = (
    "real cluster not asked for: set DEPLOYD_K8S_E2E=1, "
    + ", ".join(E2E_VARS)
    + " (and DEPLOYD_K8S_NAMESPACE, default deployd-e2e) to run it there"
)


class Backend:
    """Where the test flow's pods run, and what the assertions read of it: its Deployments and
    Secrets, listed by label through lightkube (the client deployd itself uses)."""

    name = ""
    emu: Emulator | None = None  # the emulator's powers (a refusal on demand): emulator only

    def __init__(self, kubeconfig: str, namespace: str, flow: str, amqp_url: str) -> None:
        self.namespace, self.flow, self.amqp_url = namespace, flow, amqp_url
        self.client = Client(config=KubeConfig.from_file(kubeconfig), namespace=namespace)
        self.kubeconfig = kubeconfig
        self.daemons: list[Daemon] = []

    def _names(self, kind: type[Deployment] | type[Secret]) -> list[str]:
        selector = {MANAGED_BY: OWNER, FLOW_LABEL: self.flow}
        return sorted(str(o.metadata.name) for o in self.client.list(kind, labels=selector))

    def deployments(self) -> list[str]:
        return self._names(Deployment)

    def secrets(self) -> list[str]:
        return self._names(Secret)

    def secret(self, name: str) -> dict[str, Any]:
        return dict(self.client.get(Secret, name).to_dict())

    def config(self, daemon: Daemon) -> str:
        """The [runtime] tables of the daemon (its listen address set where it must be)."""
        raise NotImplementedError

    def out(self, path: Path) -> str:
        """What the write steps get as `out` so that their lines end up in `path`."""
        return str(path)

    def hold_new_pods(self) -> dict[str, Any]:
        """Until `release_pods`, no pod of the next version becomes ready; returns the files
        that version's code needs for it (none on the emulator)."""
        raise NotImplementedError

    def release_pods(self) -> None:
        pass

    def close(self) -> None:
        pass


class EmulatorBackend(Backend):
    name = "emulator"

    def __init__(self, tmp: Path, amqp_url: str) -> None:
        self.emu = Emulator().start()
        super().__init__(str(kubeconfig(tmp, self.emu.url)), "deployd-flows", "orders", amqp_url)
        self.kubelet = Kubelet(self.emu, tmp)

    def config(self, daemon: Daemon) -> str:
        return (
            f'[runtime]\ndefault = "rabbitmq"\n[runtime.rabbitmq]\nurl = "{self.amqp_url}"\n'
            'placement = "kubernetes"\n[runtime.kubernetes]\n'
            f'kubeconfig = "{self.kubeconfig}"\n'
            'image = "registry.example.com/deployd-step:1"\n'
            f'public_url = "{daemon.url}"\n'
        )

    def hold_new_pods(self) -> dict[str, Any]:
        self.kubelet.paused.set()  # the test kubelet starts no pod: an image never coming up
        return {}

    def release_pods(self) -> None:
        self.kubelet.resume()

    def close(self) -> None:
        self.kubelet.close()
        self.client.close()
        assert self.emu is not None
        self.emu.close()


# v2 of the kill -9 test on a real cluster: its trigger pod is not ready for 20 s (init runs
# before a pod reports ready), so deployd is killed while v2 warms up, as the paused test
# kubelet makes sure on the emulator.
HELD_TICKER = (
    TICKER
    + """

import time


def init(cfg):
    time.sleep(20)
"""
)


class ClusterBackend(Backend):
    name = "cluster"

    def __init__(self, tmp: Path) -> None:
        env = os.environ
        # A flow name of its own: a run leaves nothing a later run could meet (the namespace
        # and vhost are the user's), and close() deletes what this one made.
        flow = f"orders-{secrets.token_hex(3)}"
        ns = env.get("DEPLOYD_K8S_NAMESPACE") or "deployd-e2e"
        super().__init__(env["KUBECONFIG"], ns, flow, env["DEPLOYD_K8S_AMQP_URL"])
        self.image, self.public_url = env["DEPLOYD_K8S_IMAGE"], env["DEPLOYD_K8S_PUBLIC_URL"]
        self.listen = env["DEPLOYD_K8S_LISTEN"]
        self.sinks: list[QueueSink] = []
        try:
            self.deployments()
        except Exception as exc:  # ApiError, or the client's transport errors
            pytest.fail(
                f"DEPLOYD_K8S_E2E=1 but Deployments in namespace {ns} cannot be listed with "
                f"KUBECONFIG={self.kubeconfig}: {exc}",
                pytrace=False,
            )

    def config(self, daemon: Daemon) -> str:
        daemon.listen = self.listen
        daemon.port = split_listen(self.listen)[1]
        self.daemons.append(daemon)
        return (
            f'[runtime]\ndefault = "rabbitmq"\n[runtime.rabbitmq]\nurl = "{self.amqp_url}"\n'
            'placement = "kubernetes"\n[runtime.kubernetes]\n'
            f'namespace = "{self.namespace}"\nkubeconfig = "{self.kubeconfig}"\n'
            f'image = "{self.image}"\npublic_url = "{self.public_url}"\n'
        )

    def out(self, path: Path) -> str:
        queue = f"deployd-e2e.{self.flow}.{path.stem}"
        self.sinks.append(QueueSink(self.amqp_url, queue, path))
        return f"{self.amqp_url}#{queue}"

    def hold_new_pods(self) -> dict[str, Any]:
        return {"lib/ticker.py": HELD_TICKER}

    def close(self) -> None:
        """The daemon first (its reconciliation would apply again what is deleted), then
        the flow's objects and queues."""
        for daemon in self.daemons:
            if daemon.proc is not None:
                daemon.kill()
        for kind in (Deployment, Secret):
            for name in self._names(kind):
                with contextlib.suppress(ApiError):
                    self.client.delete(kind, name)
        self.client.close()
        for sink in self.sinks:
            sink.close()
        queues = [queue_name(self.flow, s) for s in ("tick", "write")]
        queues += [records_queue(self.flow)]
        queues += [gate_queue(self.flow, "tick", v) for v in range(1, 6)]
        delete_queues(self.amqp_url, queues)


class QueueSink:
    """The out file of the write steps on a real cluster: they publish each line to `queue`
    (with a confirm, before their message is acked); this thread appends them to `path`."""

    def __init__(self, url: str, queue: str, path: Path) -> None:
        self.url, self.queue, self.path = url, queue, path
        self.ready, self.stop = threading.Event(), threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        assert self.ready.wait(30), f"no AMQP connection to {queue} within 30 s"
        assert self.error is None, f"the sink {queue} cannot consume: {self.error}"

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # reported by __init__ (before ready) or close()
            self.error = exc
            self.ready.set()

    async def _main(self) -> None:
        import aio_pika

        async def got(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            with self.path.open("ab") as fh:  # before any await: in delivery order
                fh.write(message.body + b"\n")
            await message.ack()

        async with await aio_pika.connect_robust(self.url) as conn:
            channel = await conn.channel()
            queue = await channel.declare_queue(self.queue, durable=True)
            await queue.consume(got)
            self.ready.set()
            while not self.stop.is_set():
                await asyncio.sleep(0.1)
            await queue.delete(if_unused=False, if_empty=False)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(30)


def delete_queues(url: str, names: list[str]) -> None:
    async def main() -> None:
        import aio_pika

        async with await aio_pika.connect(url) as conn:
            for name in names:
                channel = await conn.channel()  # a failed delete closes its channel
                with contextlib.suppress(aio_pika.exceptions.AMQPError):
                    await channel.queue_delete(name)

    run_async(main)


EMULATOR = pytest.param("emulator", marks=pytest.mark.rabbitmq)  # the suite's own broker
# A real cluster is optional (issue 13): its variant skips when not asked for, under CI=true
# too — it carries no `rabbitmq` mark and takes no broker fixture, so neither
# `require_broker` (a failure under CI=true) nor a broker start comes before the skip.
CLUSTER = pytest.param("cluster")
BOTH = pytest.mark.parametrize("backend", [EMULATOR, CLUSTER], indirect=True)
# The test kubelet's powers (a pod restarted at once when it crashes; a real kubelet backs
# off 10 s, 20 s, …) are what these tests rest on: emulator only.
EMULATOR_ONLY = pytest.mark.parametrize("backend", [EMULATOR], indirect=True)


@pytest.fixture
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    if request.param == "cluster":
        if os.environ.get("DEPLOYD_K8S_E2E") != "1":
            pytest.skip(NOT_ASKED)  # a skip under CI=true as well: the variant is optional
        missing = [name for name in E2E_VARS if not os.environ.get(name)]
        if missing:
            pytest.fail(f"DEPLOYD_K8S_E2E=1 but {', '.join(missing)} not set", pytrace=False)
        b: Backend = ClusterBackend(tmp_path)
    else:
        b = EmulatorBackend(tmp_path, request.getfixturevalue("amqp_url"))
    yield b
    b.close()


# The write steps' output, in a file on this machine or on a queue (`Backend.out`): an action
# appending {**body, "by": TAG} per message (as `tests.flows.conftest.writer`), awaited before
# the message is acked. `check` is code run first (it may raise: a dead letter).
SINK = """\
import json
import time

_sink = {}


async def put(out, line):
    text = json.dumps(line)
    if not out.startswith(("amqp://", "amqps://")):
        with open(out, "a") as fh:
            fh.write(text + "\\n")
        return
    import aio_pika  # deployd's own AMQP client, in the step image

    url, queue = out.rsplit("#", 1)
    if "channel" not in _sink:
        _sink["connection"] = await aio_pika.connect_robust(url)
        _sink["channel"] = await _sink["connection"].channel()  # publisher confirms
        await _sink["channel"].declare_queue(queue, durable=True)
    message = aio_pika.Message(text.encode(), delivery_mode=aio_pika.DeliveryMode.PERSISTENT)
    await _sink["channel"].default_exchange.publish(message, routing_key=queue)
"""


def writer(tag: str, check: str = "pass") -> str:
    return (
        SINK
        + f"""

async def process(msg, cfg):
    body = msg["body"]
    {check}
    line = {{**body, "by": {tag!r}}}
    await put(cfg["out"], line)
    return line
"""
    )


def files(tag: str = "v1", **overrides: Any) -> dict[str, Any]:
    """The counter component (tests/flows/conftest.py) with the writer above."""
    return counter_files(tag, **{"lib/write.py": writer(tag), **overrides})


def cluster_env(
    backend: Backend,
    daemon_factory: Callable[..., Daemon],
    component: Callable[..., Work],
    tmp_path: Path,
    component_files: dict[str, Any] | None = None,
    **daemon_keys: Any,
) -> FlowEnv:
    work = component("hello")
    work.commit("counter component", component_files or files())
    d = daemon_factory(**{"rollback_window": "2s", "warmup_timeout": "60s", **daemon_keys})
    d.extra_toml = backend.config(d)
    d.start()
    d.wait_recent("hello", work.push(d.hosted("hello")), timeout=30)
    return FlowEnv(d, work, tmp_path)


def counter_flow(backend: Backend, out: Path, **kw: Any) -> str:
    return flow_toml(backend.flow, backend.out(out), **kw)


def test_the_real_cluster_variants_own_parts_work_here(
    monkeypatch: pytest.MonkeyPatch, amqp_url: str, tmp_path: Path
) -> None:
    """What only the `cluster` backend runs, checked here where it can be (the emulator as
    API server, the session broker as the user's, no daemon): the writer's AMQP branch, run
    as the sailor runs it (one event loop, call after call), into the QueueSink's file in
    order; the daemon's config and listen address; the listing by the flow's label; close()
    deleting the flow's objects and queues."""
    emu = Emulator().start()
    loop = asyncio.new_event_loop()
    try:
        for name, value in {
            "KUBECONFIG": str(kubeconfig(tmp_path, emu.url)),
            "DEPLOYD_K8S_NAMESPACE": "deployd-flows",
            "DEPLOYD_K8S_IMAGE": "registry.example.com/deployd-step:1",
            "DEPLOYD_K8S_PUBLIC_URL": "http://deployd.example.com:8787",
            "DEPLOYD_K8S_LISTEN": "0.0.0.0:18787",
            "DEPLOYD_K8S_AMQP_URL": amqp_url,
        }.items():
            monkeypatch.setenv(name, value)
        b = ClusterBackend(tmp_path)
        out = tmp_path / "out.jsonl"
        target = b.out(out)
        assert target.startswith(amqp_url + "#deployd-e2e.orders-")
        step: dict[str, Any] = {}
        exec(writer("v1"), step)
        for n in range(1, 21):
            loop.run_until_complete(step["process"]({"body": {"n": n}}, {"out": target}))
        loop.run_until_complete(step["_sink"]["connection"].close())
        wait_until(lambda: len(read_out(out)) >= 20, timeout=30)
        assert_contiguous(read_out(out))
        assert all(r["by"] == "v1" for r in read_out(out))

        d = Daemon(root=tmp_path, port=free_port())
        toml = b.config(d)
        assert (d.port, d.url) == (18787, "http://127.0.0.1:18787")
        assert 'public_url = "http://deployd.example.com:8787"' in toml
        assert 'namespace = "deployd-flows"' in toml

        run(emu, tmp_path, lambda cluster: cluster.apply(docs(2, b.flow)))
        run(emu, tmp_path, lambda cluster: cluster.apply(docs(2, "other")))
        assert b.deployments() == sorted(n for n in deployments_of(2, b.flow))
        assert len(b.secrets()) == 2
        b.close()
        assert all("other" in n for n in emu.names("deployments") + emu.names("secrets"))
        assert len(emu.names("deployments")) == 2

        async def gone(name: str) -> bool:
            import aio_pika

            async with await aio_pika.connect(amqp_url) as conn:
                channel = await conn.channel()
                try:
                    await channel.declare_queue(name, passive=True)
                except aio_pika.exceptions.ChannelClosed:
                    return True
                return False

        assert run_async(lambda: gone(target.rsplit("#", 1)[1]))
    finally:
        loop.close()
        emu.close()


def deployments_of(version: int, flow: str) -> list[str]:
    return [d["metadata"]["name"] for d in docs(version, flow) if d["kind"] == "Deployment"]


def by(rows: list[dict[str, Any]], tag: str) -> list[int]:
    return [r["n"] for r in rows if r["by"] == tag]


def hooked_ticker(result: str = "{'token': TOKEN}") -> str:
    """The counter's ticker with hooks, each writing a line to cfg["hooks"]: startup() sets
    module state (its calls put it in their output) and returns `result`; shutdown() writes
    what it was given."""
    return (
        "import json\n\nTOKEN = None\n\n\n"
        + TICKER.replace('"n": n}\n', '"n": n, "token": TOKEN}\n')
        + f"""

def startup(cfg):
    global TOKEN
    TOKEN = "from-startup"
    with open(cfg["hooks"], "a") as fh:
        fh.write(json.dumps({{"hook": "startup"}}) + "\\n")
    return {result}


def shutdown(cfg, data):
    with open(cfg["hooks"], "a") as fh:
        fh.write(json.dumps({{"hook": "shutdown", "data": data}}) + "\\n")
"""
    )


def hooked_flow(backend: Backend, out: Path, hooks: Path) -> str:
    """tick (with cfg["hooks"]) → write. The hooks write a file of this machine, so their
    checks run on the emulator only (a real cluster's pods cannot write here)."""
    tick = {"id": "tick", "component": "hello", "function": "ticker", "interval": "100ms"}
    write = {"id": "write", "component": "hello", "function": "write"}
    write["config"] = {"out": backend.out(out)}
    tick["config"] = {"hooks": hooks}
    return flow_toml(backend.flow, backend.out(out), steps=[tick, write])


def hooked_env(
    backend: Backend,
    daemon_factory: Callable[..., Daemon],
    component: Callable[..., Work],
    tmp_path: Path,
    startup_returns: str = "{'token': TOKEN}",
) -> tuple[FlowEnv, dict[str, Any], Path, Path]:
    """A daemon with the counter flow applied; on the emulator its ticker has hooks writing
    to `hooks` (a file of this machine: a real cluster's pods cannot, so there no hooks).
    (env, the ticker's file overrides for later pushes — empty without hooks —, out, hooks)."""
    hooked = backend.emu is not None
    ticker = {"lib/ticker.py": hooked_ticker(startup_returns)} if hooked else {}
    env = cluster_env(backend, daemon_factory, component, tmp_path, component_files=files(**ticker))
    out, hooks = env.out(), tmp_path / "hooks.jsonl"
    if hooked:
        env.apply(hooked_flow(backend, out, hooks))
    else:
        env.apply(counter_flow(backend, out, interval="100ms"))
    return env, ticker, out, hooks


def queue_exists(url: str, name: str) -> bool:
    async def check() -> bool:
        import aio_pika
        import aiormq

        conn = await aio_pika.connect(url)
        try:
            channel = await conn.channel()
            try:
                await channel.declare_queue(name, passive=True)
            except aiormq.exceptions.ChannelNotFoundEntity:
                return False
            return True
        finally:
            await conn.close()

    return bool(run_async(check))


@SLOW
@BOTH
def test_publish_switch_and_cleanup_through_the_cluster(
    backend: Backend,
    daemon_factory: Callable[..., Daemon],
    component: Callable[..., Work],
    tmp_path: Path,
) -> None:
    env, ticker, out, hooks = hooked_env(backend, daemon_factory, component, tmp_path)
    hooked, flow = bool(ticker), backend.flow
    first = env.wait_deploy(flow, 1, timeout=90)
    assert first["status"] == "done", first
    names = backend.deployments()
    assert len(names) == 2 and all("-v1-" in n for n in names)
    secret = backend.secret(names[0])
    assert backend.amqp_url not in str(secret)  # base64 in data only
    assert base64.b64decode(secret["data"]["amqp-url"]).decode() == backend.amqp_url
    wait_until(lambda: len(by(read_out(out), "v1")) >= 3, timeout=60)
    status = env.flow(flow)
    where = f"kubernetes:{backend.namespace}/"
    assert any(where in str(s.get("location")) for s in status["steps"])
    if hooked:  # the flow's first start ran startup() in the trigger pod, before its first call
        assert read_out(hooks) == [{"hook": "startup"}]
        assert {r["token"] for r in read_out(out)} == {"from-startup"}

    # v2's action fails on every fourth n: those messages are dead letters, kept by deployd.
    env.push(files("v2", **{"lib/write.py": FAILING_WRITER, **ticker}))
    second = env.wait_deploy(flow, 2, timeout=90)
    assert second["status"] == "done", second
    assert second["gap_ms"] is not None
    wait_until(lambda: len(by(read_out(out), "v2")) >= 6, timeout=60)
    # The old version goes once the rollback window (2 s) has passed.
    wait_until(lambda: all("-v2-" in n for n in backend.deployments()), timeout=30, interval=0.2)
    wait_until(lambda: all("-v2-" in n for n in backend.secrets()), timeout=30, interval=0.2)
    v1_hooks = hooks_queue(flow, "tick", 1)
    wait_until(lambda: not queue_exists(backend.amqp_url, v1_hooks), timeout=30)
    if hooked:  # a publish is no flow start (as on one machine): no startup() in v2's pod
        assert read_out(hooks) == [{"hook": "startup"}]
        # v2's writer also takes what v1's trigger made and was still queued at the switch
        # (token set); everything v2's trigger made comes after it, without one.
        fresh = wait_until(
            lambda: [r["n"] for r in read_out(out) if r["by"] == "v2" and r["token"] is None],
            timeout=60,
        )
        rows = [r for r in read_out(out) if r["by"] == "v2"]
        assert {r["token"] for r in rows} <= {"from-startup", None}, rows
        assert all(r["n"] < min(fresh) for r in rows if r["token"] is not None), rows
    letters = wait_until(lambda: errors(env, flow) or None, timeout=30)
    assert all(x["step"] == "write" and "n is a multiple of 4" in x["error"] for x in letters)
    # Nothing lost, nothing twice, the snapshot kept across the switch: the v2 trigger went
    # on counting from the v1 trigger's last call, so every n up to the highest was either
    # written once or is a dead letter once (a multiple of 4, failed in v2).
    counts = Counter(r["n"] for r in read_out(out))
    top = max(counts)
    failed = {int(errors(env, flow, x["id"])["body"]["n"]) for x in errors(env, flow)}
    assert all(n % 4 == 0 for n in failed), failed
    assert all(c == 1 for c in counts.values()), counts
    assert not set(counts) & failed
    assert set(range(1, top + 1)) <= set(counts) | failed, (counts, failed)
    # In order across the switch: v2's action consumed only once v1's had left the queue.
    written = [r["n"] for r in read_out(out)]
    assert written == sorted(written), written

    if backend.emu is None:
        return
    # Emulator only (a real API server refuses nothing on demand): the cluster refuses the
    # next version — a failed deployment with its reason; v2 runs on.
    backend.emu.fail(
        "PATCH", "deployments", 403, "Forbidden", "deployments.apps is forbidden: quota"
    )
    env.push(files("v3", **ticker))
    third = env.wait_deploy(flow, 3, timeout=90)
    assert third["status"] == "failed"
    assert "Forbidden (403): deployments.apps is forbidden: quota" in third["reason"]
    have = len(by(read_out(out), "v2"))
    wait_until(lambda: len(by(read_out(out), "v2")) >= have + 3, timeout=60)
    assert all("-v2-" in n for n in backend.deployments())
    assert queue_exists(backend.amqp_url, hooks_queue(flow, "tick", 2))

    # The daemon stopped (an upgrade, a restart): its flows' pods go on handling messages
    # meanwhile, and its next start adopts them — the same objects, no new deployment.
    backend.emu.heal()  # the cluster takes applies again
    names = backend.deployments()
    deploys = len(env.deploys())
    env.daemon.stop()
    assert backend.deployments() == names
    have = len(read_out(out))
    wait_until(lambda: len(read_out(out)) >= have + 3, timeout=60)  # with no daemon running
    env.daemon.start()
    wait_until(lambda: env.flow(flow)["state"] == "running", timeout=60)
    assert env.flow(flow)["version"] == 2 and backend.deployments() == names
    assert len(env.deploys()) == deploys
    counts = Counter(r["n"] for r in read_out(out))
    assert all(c == 1 for c in counts.values()), counts

    # `flow stop`: shutdown() runs in the running trigger pod with what startup() returned at
    # the flow's start; then the version's objects and queues go.
    env.daemon.cli("flow", "stop", flow)
    assert read_out(hooks)[-1] == {"hook": "shutdown", "data": {"token": "from-startup"}}
    wait_until(lambda: not backend.deployments(), timeout=30)
    for name in (hooks_queue(flow, "tick", 2), gate_queue(flow, "tick", 2)):
        assert not queue_exists(backend.amqp_url, name), name


@SLOW
@BOTH
def test_a_daemon_killed_mid_publish_leaves_nothing_twice(
    backend: Backend,
    daemon_factory: Callable[..., Daemon],
    component: Callable[..., Work],
    tmp_path: Path,
) -> None:
    """kill -9 of deployd while v2 is warming up (its Deployments applied, not yet available):
    at start the unfinished deployment is failed and the active version warmed up again (the
    same objects applied again: nothing twice); the catch-up publishes the new code anew as
    the daemon's crash-only rules say, and v2's objects, which no flow runs, are deleted by
    the reconciliation: in the end the cluster holds exactly the active version's. The
    trigger's startup() returned nothing and is not run again at the daemon's start."""
    env, ticker, out, hooks = hooked_env(
        backend, daemon_factory, component, tmp_path, startup_returns="None"
    )
    hooked, flow = bool(ticker), backend.flow
    assert env.wait_deploy(flow, 1, timeout=90)["status"] == "done"
    v1 = backend.deployments()
    wait_until(lambda: len(by(read_out(out), "v1")) >= 3, timeout=60)
    held = backend.hold_new_pods()  # no pod of v2 becomes ready: the publish stays in warm-up
    env.work.commit("v2", files("v2", **{**ticker, **held}))
    env.work.push(env.daemon.hosted("hello"))
    wait_until(lambda: len(backend.deployments()) == 4, timeout=60, interval=0.1)
    env.daemon.kill()
    env.daemon.start()
    dep = env.wait_deploy(flow, 2, timeout=90)
    assert dep["status"] == "failed"  # the crash-only rule: starting_new becomes failed
    backend.release_pods()  # the pods of v1 went on meanwhile (cluster side)
    have = len(read_out(out))
    wait_until(lambda: len(read_out(out)) >= have + 3, timeout=60)

    def converged() -> bool:
        # A version's Deployments and Secrets are deleted concurrently: wait for both.
        active = env.flow(flow)["version"]
        names = backend.deployments()
        return (
            len(names) == 2
            and all(f"-v{active}-" in n for n in names)
            and not any("-v2-" in n for n in backend.secrets())
        )

    wait_until(converged, timeout=90, interval=0.2)
    assert v1
    if hooked:
        assert read_out(hooks) == [{"hook": "startup"}]  # it ran (returning None): not again


FAILING_WRITER = writer(
    "v2", 'if body["n"] % 4 == 0:\n        raise ValueError(f"n is a multiple of 4: {body[\'n\']}")'
)


def errors(env: FlowEnv, flow: str, letter: int | None = None) -> Any:
    """The flow's dead letters as the API lists them (with `letter`: that one whole)."""
    query = "" if letter is None else f"?id={letter}"
    token = (env.daemon.state_dir / "api-token").read_text().strip()
    answer = HTTP.get(
        f"{env.daemon.url}/api/v1/flows/{flow}/errors{query}",
        headers={"Authorization": f"Bearer {token}"},
        timeout=10,
    )
    assert answer.status_code == 200, answer.text
    return answer.json()


CRASHING_TICKER = """\
import os


def process(msg, cfg, snapshot, ctx):
    n = snapshot.get("n", 0) + 1
    if n >= 2:
        os._exit(3)  # the second call of every start kills the pod's sailor
    ctx.emit("snapshot", {"n": n})
    return {"text": f"hi {n}", "n": n}
"""


@SLOW
@EMULATOR_ONLY
def test_a_version_whose_pods_crash_is_rolled_back(
    backend: Backend,
    daemon_factory: Callable[..., Daemon],
    component: Callable[..., Work],
    tmp_path: Path,
) -> None:
    """v2's trigger pod crashes after it came up; Kubernetes restarts it; deployd sees the
    restarts (the pods' restartCount, watched) and rolls back: v1 applied again (its replicas
    back), warmed, switched to, and v2 removed. Emulator only: its kubelet restarts a crashed
    pod at once, so two restarts fall within the 30 s window; a real one backs off."""
    env = cluster_env(
        backend, daemon_factory, component, tmp_path, rollback_window="30s", rollback_exits=2
    )
    flow = backend.flow
    out = env.out()
    env.apply(counter_flow(backend, out, interval="100ms"))
    assert env.wait_deploy(flow, 1, timeout=90)["status"] == "done"
    wait_until(lambda: len(by(read_out(out), "v1")) >= 3, timeout=60)
    env.push(files("v2", **{"lib/ticker.py": CRASHING_TICKER}))
    dep = env.wait_deploys(
        lambda ds: next(
            (d for d in ds if d["to_version"] == 2 and d["status"] == "rolled_back"), None
        ),
        timeout=120,
    )
    assert "restarted (exit code 1" in dep["reason"], dep
    assert env.flow(flow)["version"] == 1
    wait_until(lambda: all("-v1-" in n for n in backend.deployments()), timeout=60, interval=0.2)
    have = len(by(read_out(out), "v1"))
    wait_until(lambda: len(by(read_out(out), "v1")) >= have + 3, timeout=60)


@SLOW
@BOTH
def test_flow_move_onto_kubernetes_and_back_carries_queue_and_snapshot(
    backend: Backend,
    daemon_factory: Callable[..., Daemon],
    component: Callable[..., Work],
    tmp_path: Path,
) -> None:
    """The path of a user who outgrows one machine: a flow on the embedded runtime is moved
    onto Kubernetes (`flow move --runtime rabbitmq`, placement "kubernetes") and back while
    messages flow and its action is behind (a queue builds up). Each move is a deployment with
    a gap: the old version stops wholly (its trigger at a call boundary), its queued messages
    are carried to the other side, then the new version starts — from the trigger's last
    snapshot. Nothing lost, nothing handled twice, in order; the pods go once it is back."""
    env = cluster_env(backend, daemon_factory, component, tmp_path)
    flow = backend.flow
    env.push(files("v1", **{"lib/write.py": SLOW_WRITER}))
    out = env.out()
    steps: list[dict[str, Any]] = [
        {"id": "tick", "component": "hello", "function": "ticker", "interval": "20ms"},
        {"id": "write", "component": "hello", "function": "write"},
    ]
    steps[1]["config"] = {"out": backend.out(out)}
    steps[1]["max_queue"] = 8  # the trigger is held back at 8 queued, on either side
    env.apply(flow_toml(flow, out, steps=steps, keys={"runtime": "embedded"}))
    assert env.wait_deploy(flow, 1, timeout=60)["status"] == "done"
    wait_until(lambda: len(read_out(out)) >= 5, timeout=60)
    assert not backend.deployments()
    for target, version in (("rabbitmq", 2), ("embedded", 3)):
        wait_until(lambda: env.queued("write") >= 5, timeout=60)
        have = len(read_out(out))
        res = env.daemon.cli("flow", "move", flow, "--runtime", target, "--json")
        assert json.loads(res.stdout)["status"] == "done", res.stdout
        dep = env.wait_deploy(flow, version, timeout=90)
        assert dep["trigger"] == "flow move" and dep["status"] == "done", dep
        assert dep["gap_ms"] is not None
        assert env.flow(flow)["runtime"] == target
        if target == "rabbitmq":
            names = backend.deployments()
            assert len(names) == 2 and all("-v2-" in n for n in names), names
            # Backpressure in pods: the trigger pod holds while write's queue is full; status
            # shows it, with the depth the broker counts.
            wait_until(
                lambda: any(
                    s["id"] == "tick" and s["backpressure"] for s in env.flow(flow)["steps"]
                ),
                timeout=60,
            )
            assert env.queued("write") <= 9  # its limit and one call's output
        wait_until(lambda h=have: len(read_out(out)) >= h + 10, timeout=90)
    # Back on this machine: the pods go (no rollback window for a move's old side).
    wait_until(lambda: not backend.deployments(), timeout=60, interval=0.2)
    wait_until(lambda: env.queued("write") == 0 or len(read_out(out)) >= 60, timeout=60)
    assert_contiguous(read_out(out))


SLOW_WRITER = writer("v1", "time.sleep(0.03)  # slower than the trigger: the queue builds up")
