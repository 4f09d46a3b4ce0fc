"""The pod's side for real (issue 13): the step image's entrypoint run as a local process with
the command and environment its Deployment gives it (values the Deployment takes from its
Secret read from the rendered Secret), against a real deployd and the session's real RabbitMQ.

Two things differ from a cluster, and only these: the artifact volume is a temporary folder
(the Deployment mounts an emptyDir at DEPLOYD_ARTIFACT_DIR) and the probe port is a free one
(every pod has its own 8080; tests share one machine)."""

from __future__ import annotations

import base64
import json
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from deployd import config as config_mod
from deployd.flows.manifests import manifests
from deployd.objects import flow_token
from deployd.runtime.kubernetes.artifacts import artifact_token
from deployd.runtime.kubernetes.hooks import HookFailed, HookUnanswered, ask
from deployd.runtime.kubernetes.manifests import ARTIFACT_DIR, PodSecrets, gate_queue, hooks_queue
from deployd.runtime.rabbitmq.router import envelope
from deployd.store import Store
from tests.broker import Broker, connections, run_async, vhost_of
from tests.conftest import HTTP, Daemon, Work, free_port, wait_until
from tests.flows.conftest import HOLDING_WRITER, TICKER, counter_files, flow_toml, read_out
from tests.node.conftest import COUNTER_JS, platform_files


class Cluster:
    """A real daemon whose flow `orders` (tick → write) is stopped there, so only pods run it."""

    def __init__(self, daemon: Daemon, amqp_url: str, tmp: Path) -> None:
        self.daemon = daemon
        self.amqp_url = amqp_url
        self.tmp = tmp
        self.out = tmp / "out.jsonl"
        self.procs: list[subprocess.Popen[bytes]] = []

    @property
    def key(self) -> bytes:
        return bytes.fromhex((self.daemon.state_dir / "object-storage-key").read_text().strip())

    def docs(self, version: int = 1) -> list[dict[str, Any]]:
        cfg = config_mod.load(self.daemon.config_path)
        store = Store.readonly(self.daemon.state_dir / "deployd.db")
        secrets = PodSecrets(
            self.amqp_url,
            artifact_token(self.key, "orders", version),
            flow_token(self.key, "orders"),
        )
        return manifests(cfg, store, "orders", version, secrets)

    def pod_env(self, step: str, volume: Path, port: int) -> tuple[list[str], dict[str, str]]:
        """The command and environment of `step`'s container, as the kubelet would give them."""
        docs = self.docs()
        secret = next(d for d in docs if d["kind"] == "Secret" and _step(d) == step)
        deploy = next(d for d in docs if d["kind"] == "Deployment" and _step(d) == step)
        return container_env(deploy, secret, volume, port)

    def pod(self, step: str) -> Pod:
        volume = self.tmp / f"volume-{step}-{len(self.procs)}"
        volume.mkdir()
        port = free_port()
        command, env = self.pod_env(step, volume, port)
        log = self.tmp / f"pod-{step}-{len(self.procs)}.log"
        with log.open("wb") as fh:
            proc = subprocess.Popen(command, env=env, stdout=fh, stderr=subprocess.STDOUT)
        self.procs.append(proc)
        return Pod(proc, port, log, volume)

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)


def container_env(
    deploy: dict[str, Any], secret: dict[str, Any], volume: Path, port: int
) -> tuple[list[str], dict[str, str]]:
    """The command and environment a kubelet gives `deploy`'s container (secretKeyRefs read
    from `secret`), with the artifact volume at `volume` and the probe on `port`."""
    (container,) = deploy["spec"]["template"]["spec"]["containers"]
    data = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(volume.parent)}
    for var in container["env"]:
        if "value" in var:
            env[var["name"]] = var["value"]
        else:
            ref = var["valueFrom"]["secretKeyRef"]
            assert ref["name"] == secret["metadata"]["name"]
            env[var["name"]] = data[ref["key"]]
    assert env["DEPLOYD_ARTIFACT_DIR"] == ARTIFACT_DIR
    assert container["volumeMounts"][0]["mountPath"] == ARTIFACT_DIR
    env["DEPLOYD_ARTIFACT_DIR"] = str(volume)  # the emptyDir
    env["DEPLOYD_PROBE_PORT"] = str(port)
    command = list(container["command"])
    assert command[0] == "python3"
    command[0] = sys.executable  # the image's python3, here the venv's
    return command, env


class Pod:
    def __init__(self, proc: subprocess.Popen[bytes], port: int, log: Path, volume: Path):
        self.proc, self.port, self.log_path, self.volume = proc, port, log, volume

    def probe(self, path: str) -> int:
        try:
            return HTTP.get(f"http://127.0.0.1:{self.port}{path}", timeout=2).status_code
        except httpx.HTTPError:
            return 0

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self) -> None:
        def ready() -> bool:
            assert self.proc.poll() is None, f"pod exited {self.proc.returncode}: {self.log()}"
            return self.probe("/readyz") == 200

        wait_until(ready, timeout=90)


def _step(doc: dict[str, Any]) -> str:
    return str(doc["metadata"]["annotations"]["deployd.io/step-id"])


def make_cluster(
    daemon_factory: Callable[..., Daemon],
    component: Callable[..., Work],
    amqp_url: str,
    tmp_path: Path,
    name: str = "hello",
    files: dict[str, Any] | None = None,
    steps: list[dict[str, Any]] | None = None,
    image: str = "registry.example.com/deployd-step:1",
) -> Cluster:
    work = component(name)
    work.commit("counter component", files or counter_files())
    d = daemon_factory(components=[{"name": name}])
    d.extra_toml = f'[runtime.kubernetes]\nimage = "{image}"\npublic_url = "{d.url}"\n'
    d.start()
    d.wait_recent(name, work.push(d.hosted(name)), timeout=60)
    cluster = Cluster(d, amqp_url, tmp_path)
    flow = flow_toml("orders", cluster.out, interval="100ms", steps=steps)
    path = tmp_path / "orders.toml"
    path.write_text(flow)
    d.cli("flow", "apply", str(path))
    d.cli("flow", "stop", "orders")  # only the pods run it from now on
    return cluster


# The counter's ticker with hooks: startup() sets module state that its calls put in their
# output; shutdown() fails, naming what it was given.
HOOKED_TICKER = (
    "TOKEN = None\n\n\n"
    + TICKER.replace('"n": n}\n', '"n": n, "token": TOKEN}\n')
    + """

def startup(cfg):
    global TOKEN
    TOKEN = "from-startup"
    return {"token": TOKEN}


def shutdown(cfg, data):
    raise ValueError(f"shutdown refused {data}")
"""
)


def test_pods_download_verify_connect_handle_and_stop_at_a_call_boundary(
    daemon_factory: Callable[..., Daemon],
    component: Callable[..., Work],
    amqp_url: str,
    tmp_path: Path,
) -> None:
    out = tmp_path / "out.jsonl"  # the Cluster's out
    steps = [
        {"id": "tick", "component": "hello", "function": "ticker", "interval": "100ms"},
        {"id": "write", "component": "hello", "function": "write", "config": {"out": out}},
    ]
    steps[1]["max_queue"] = 3
    cluster = make_cluster(
        daemon_factory,
        component,
        amqp_url,
        tmp_path,
        files=counter_files(**{"lib/ticker.py": HOOKED_TICKER}),
        steps=steps,
    )
    before = len(read_out(cluster.out))  # what the daemon wrote before the flow was stopped
    # The step's snapshot is deployd's: the trigger pod goes on from the daemon's last call.
    n0 = max((r["n"] for r in read_out(cluster.out)), default=0)
    try:
        write = cluster.pod("write")
        tick = cluster.pod("tick")
        assert write.probe("/healthz") in (0, 200)
        write.wait_ready()
        tick.wait_ready()
        assert not read_out(cluster.out)[before:]  # the trigger waits at its start gate
        # Ready means hooks are served (deployd asks startup() before the gate opens): the
        # hook runs in the pod's sailor, whose calls then see what it set.
        hooks = hooks_queue("orders", "tick", 1)
        assert hook(cluster.amqp_url, hooks, "startup") == {"token": "from-startup"}
        open_gate(cluster.amqp_url, gate_queue("orders", "tick", 1))
        # So does the action, consuming nothing meanwhile (at a switch, deployd opens it once
        # the old version's pods of the step are gone: one consumer at a time).
        # Backpressure: at write's max_queue (3) the trigger pod holds, nothing dropped.
        wait_until(lambda: "held: the queue of step write is full (3 >= 3)" in tick.log())
        assert _queue_count(cluster.amqp_url, "deployd.orders.write") == 3
        assert not read_out(cluster.out)[before:]
        open_gate(cluster.amqp_url, gate_queue("orders", "write", 1))
        wait_until(lambda: "deployd pod: resumed" in tick.log())
        assert (write.volume / "code" / "component.json").exists()
        # The trigger pod's outputs went through the broker to the action pod, which wrote them.
        rows = wait_until(
            lambda: len(read_out(cluster.out)) >= before + 3 and read_out(cluster.out)
        )
        assert all(r["by"] == "v1" for r in rows)
        texts = [r["text"] for r in rows[before:]]
        assert texts[:3] == [f"hi {n0 + i}" for i in (1, 2, 3)]  # one trigger: in order
        assert {r["token"] for r in rows[before:]} == {"from-startup"}
        # A failing hook: its error is the answer (between two calls of the running trigger).
        with pytest.raises(HookFailed, match=r"shutdown\(\): ValueError: shutdown refused"):
            hook(cluster.amqp_url, hooks, "shutdown", {"token": "t"})
        assert "{'token': 't'}" in tick.log() and "shutdown() failed" in tick.log()
        with pytest.raises(HookUnanswered, match="no trigger pod declared"):
            hook(cluster.amqp_url, hooks_queue("orders", "tick", 9), "startup")

        # A message delivered again to the pod that handled it (its upstream pod died after
        # publishing it and published it anew) is acked, not processed a second time.
        again_msg = envelope("orders.tick.x.1.0", json.dumps({"n": -1, "text": "again"}), "{}")
        put(cluster.amqp_url, "deployd.orders.write", again_msg, again_msg)
        wait_until(lambda: "message orders.tick.x.1.0 was handled before" in write.log())
        assert [r["n"] for r in read_out(cluster.out)].count(-1) == 1

        tick.proc.send_signal(signal.SIGTERM)
        assert tick.proc.wait(25) == 0  # within terminationGracePeriodSeconds (25)
        assert "stopped at a call boundary" in tick.log()
        # A trigger pod of the same version started again (a restart, a rescheduling) finds
        # its gate still open: it works at once.
        # Its hooks queue has no consumer meanwhile: a request waits a short bound only.
        with pytest.raises(HookUnanswered, match="no trigger pod consumes"):
            hook(cluster.amqp_url, hooks, "startup", idle_wait=0.3)
        again = cluster.pod("tick")
        again.wait_ready()
        have = len(read_out(cluster.out))
        wait_until(lambda: len(read_out(cluster.out)) >= have + 2)
        # A restarted pod does not run startup() by itself (deployd asks once per flow start).
        assert {r["token"] for r in read_out(cluster.out)[have:]} == {None}
        again.proc.send_signal(signal.SIGTERM)
        assert again.proc.wait(25) == 0
        written = len(read_out(cluster.out))

        def settled() -> bool:
            return bool(_queue_empty(cluster.amqp_url))

        wait_until(settled, timeout=30)  # everything the trigger published was handled
        assert len(read_out(cluster.out)) >= written
        write.proc.send_signal(signal.SIGTERM)
        assert write.proc.wait(25) == 0
        assert "stopped at a call boundary" in write.log()
        # Each call's snapshot went to the flow's records queue (no daemon follows it here:
        # this daemon runs the embedded runtime; tests/kubernetes/test_e2e.py covers the loop),
        # so the restarted pod read the same stored snapshot again and counted from n0 + 1
        # anew; within each pod, nothing lost, nothing twice.
        assert _queue_count(cluster.amqp_url, "deployd.orders.records") >= 5
        numbers = [r["n"] for r in read_out(cluster.out)[before:] if r["n"] != -1]
        runs: list[list[int]] = []
        for n in numbers:
            if n == n0 + 1:
                runs.append([])
            runs[-1].append(n)
        assert len(runs) == 2
        assert all(run == list(range(n0 + 1, n0 + 1 + len(run))) for run in runs)
    finally:
        cluster.close()


def hook(url: str, queue: str, name: str, data: Any = None, idle_wait: float = 5.0) -> Any:
    """What deployd does to run a trigger pod's hook (`hooks.ask`)."""

    async def go() -> Any:
        import aio_pika

        conn = await aio_pika.connect(url)
        try:
            return await ask(conn, queue, name, data, 20, idle_wait=idle_wait)
        finally:
            await conn.close()

    return run_async(go)


def open_gate(url: str, name: str) -> None:
    """What deployd does when a version starts: one message into a step's gate."""
    put(url, name, b'"go"')


def put(url: str, name: str, *bodies: bytes) -> None:
    """Each of `bodies` into queue `name` (declared a quorum queue when missing)."""

    async def main() -> None:
        import aio_pika

        conn = await aio_pika.connect(url)
        try:
            channel = await conn.channel()
            await channel.declare_queue(name, durable=True, arguments={"x-queue-type": "quorum"})
            for body in bodies:
                await channel.default_exchange.publish(aio_pika.Message(body), routing_key=name)
        finally:
            await conn.close()

    run_async(main)


def _queue_empty(url: str) -> bool:
    return _queue_count(url, "deployd.orders.write") == 0


def _queue_count(url: str, name: str) -> int:
    return _queue_state(url, name)[0]


def _queue_state(url: str, name: str) -> tuple[int, int]:
    """Queue `name`'s messages and consumers ((0, 0) when it is not there yet)."""

    async def check() -> tuple[int, int]:
        import aio_pika

        conn = await aio_pika.connect(url)
        try:
            channel = await conn.channel()
            queue = await channel.declare_queue(name, durable=True, passive=True)
            result = queue.declaration_result
            return int(result.message_count or 0), int(result.consumer_count or 0)
        except aio_pika.exceptions.ChannelNotFoundEntity:
            return 0, 0
        finally:
            await conn.close()

    return run_async(check)


def test_a_tampered_archive_is_refused_and_tokens_are_scoped(
    daemon_factory: Callable[..., Daemon],
    component: Callable[..., Work],
    amqp_url: str,
    tmp_path: Path,
) -> None:
    cluster = make_cluster(daemon_factory, component, amqp_url, tmp_path)
    try:
        url = f"{cluster.daemon.url}/api/v1/artifacts/hello/1"
        assert HTTP.get(url, timeout=10).status_code == 401
        wrong = {"Authorization": "Bearer " + artifact_token(b"k" * 32, "orders", 1)}
        assert HTTP.get(url, headers=wrong, timeout=10).status_code == 401
        other = {"Authorization": "Bearer " + artifact_token(cluster.key, "orders", 2)}
        assert HTTP.get(url, headers=other, timeout=10).status_code == 403
        objects = {"Authorization": "Bearer " + flow_token(cluster.key, "orders")}
        assert HTTP.get(url, headers=objects, timeout=10).status_code == 401  # another scope
        good = {"Authorization": "Bearer " + artifact_token(cluster.key, "orders", 1)}
        answer = HTTP.get(url, headers=good, timeout=10)
        assert answer.status_code == 200
        sha = answer.headers["x-deployd-sha256"]
        deploy = next(d for d in cluster.docs() if d["kind"] == "Deployment")
        env = {
            e["name"]: e.get("value")
            for e in deploy["spec"]["template"]["spec"]["containers"][0]["env"]
        }
        assert env["DEPLOYD_ARTIFACT_SHA256"] == sha
        unknown = HTTP.get(
            f"{cluster.daemon.url}/api/v1/artifacts/hello/99", headers=good, timeout=10
        )
        assert unknown.status_code == 403

        # A step's snapshot, with the same token: its own flow version's steps only.
        snap = f"{cluster.daemon.url}/api/v1/snapshots/orders/tick"
        assert HTTP.get(snap, timeout=10).status_code == 401
        assert HTTP.get(snap, headers=objects, timeout=10).status_code == 401
        got = HTTP.get(snap, headers=good, timeout=10)
        assert got.status_code == 200 and isinstance(got.json()["snapshot"], dict), got.text
        for path in ("orders/nosuch", "other/tick"):
            far = HTTP.get(f"{cluster.daemon.url}/api/v1/snapshots/{path}", headers=good)
            assert far.status_code == 403, far.text

        archive = cluster.daemon.state_dir / "artifacts" / "hello-1.tar.gz"
        archive.write_bytes(archive.read_bytes() + b"tampered")  # the bytes served change
        pod = cluster.pod("write")
        assert pod.proc.wait(60) == 3
        assert "artifact refused: its sha256 is" in pod.log()
        assert not (pod.volume / "code").exists()  # nothing of it was used
        assert json.dumps(cluster.amqp_url) not in pod.log()
    finally:
        cluster.close()


STARTUP_JS = """
exports.startup = async function startup(cfg) {
  return { by: 'node', flow: process.env.ELASTICIO_FLOW_ID };
};
"""


@pytest.mark.timeout(300)  # a daemon, an npm build and two pods: ~30 s on a quiet machine
def test_a_node_component_runs_in_pods_with_nothing_of_the_pod_in_its_environment(
    daemon_factory: Callable[..., Daemon],
    component: Callable[..., Work],
    amqp_url: str,
    tmp_path: Path,
) -> None:
    """runtime = "node" steps run in pods through the same Node sailor as on one machine; the
    component sees its ELASTICIO_* environment, not the pod's broker url or tokens."""
    out = tmp_path / "out.jsonl"
    env_js = """\
'use strict';
const fs = require('fs');
const { messages } = require('elasticio-node');

exports.process = async function processAction(msg, cfg) {
  const leaked = Object.keys(process.env).filter((k) => k.startsWith('DEPLOYD_'));
  const flow = process.env.ELASTICIO_FLOW_ID;
  const line = Object.assign({}, msg.body, { by: 'node', leaked, flow });
  fs.appendFileSync(cfg.out, JSON.stringify(line) + '\\n');
  return messages.newMessageWithBody(line);
};
"""
    steps = [
        {"id": "tick", "component": "platform", "function": "counter", "interval": "100ms"},
        {"id": "write", "component": "platform", "function": "write", "config": {"out": out}},
    ]
    cluster = make_cluster(
        daemon_factory,
        component,
        amqp_url,
        tmp_path,
        name="platform",
        files=platform_files(
            **{"lib/actions/write.js": env_js, "lib/triggers/counter.js": COUNTER_JS + STARTUP_JS}
        ),
        steps=steps,
    )
    cluster.out = out
    before = len(read_out(out))
    try:
        write, tick = cluster.pod("write"), cluster.pod("tick")
        write.wait_ready()
        tick.wait_ready()
        # The Node sailor runs the trigger's hooks in a pod as the Python one does.
        got = hook(cluster.amqp_url, hooks_queue("orders", "tick", 1), "startup")
        assert got == {"by": "node", "flow": "orders"}, got
        for step in ("tick", "write"):
            open_gate(cluster.amqp_url, gate_queue("orders", step, 1))
        rows = wait_until(lambda: len(read_out(out)) >= before + 3 and read_out(out))[before:]
        assert all(r["by"] == "node" and r["flow"] == "orders" for r in rows), rows
        assert all(r["leaked"] == [] for r in rows), rows  # no DEPLOYD_* (broker url, tokens)
        numbers = [r["n"] for r in rows]
        assert numbers == list(range(numbers[0], numbers[0] + len(numbers)))
        for pod in (tick, write):
            pod.proc.send_signal(signal.SIGTERM)
            assert pod.proc.wait(25) == 0, pod.log()
    finally:
        cluster.close()


def test_an_action_pod_whose_channel_went_while_it_held_a_message_goes_on(
    daemon_factory: Callable[..., Daemon],
    component: Callable[..., Work],
    broker: Broker,
    amqp_url: str,
    tmp_path: Path,
) -> None:
    """The pod's consuming connection is closed by the broker while its step handles a
    message (a lost connection, a broker restart, or RabbitMQ's `consumer_timeout` after a
    long hold: the ack then has no channel to go on). The pod does not stop. The broker gives
    the message again on the new channel, where the pod recognises it as handled and acks it
    without processing it again, and the next message is processed."""
    out, attempts, hold = tmp_path / "out.jsonl", tmp_path / "attempts", tmp_path / "hold"
    cfg = {"out": out, "attempts": attempts, "hold": hold}
    steps = [
        {"id": "tick", "component": "hello", "function": "ticker", "interval": "100ms"},
        {"id": "write", "component": "hello", "function": "write", "config": cfg},
    ]
    files = counter_files(**{"lib/write.py": HOLDING_WRITER})
    cluster = make_cluster(daemon_factory, component, amqp_url, tmp_path, files=files, steps=steps)
    url, queue = cluster.amqp_url, "deployd.orders.write"
    before = len(read_out(out))  # what the daemon wrote before the flow was stopped
    tried = attempts.read_text().split() if attempts.exists() else []
    try:
        write = cluster.pod("write")
        write.wait_ready()
        open_gate(url, gate_queue("orders", "write", 1))
        # The pod declares its queue and consumes it: a publish into a quorum queue in the
        # first milliseconds after its declaration was seen refused (nack) once.
        wait_until(lambda: _queue_state(url, queue)[1] == 1, timeout=30)
        hold.touch()
        first = envelope("orders.tick.held.1", json.dumps({"n": -1, "text": "held"}), "{}")
        put(url, queue, first)
        wait_until(lambda: attempts.exists() and "-1" in attempts.read_text().split())
        name = "deployd pod orders.write consume"
        (pid,) = [
            c["pid"] for c in connections(broker, vhost_of(url)) if c["connection_name"] == name
        ]
        broker.ctl("close_connection", pid, "closed by the test")
        hold.unlink()  # the step finishes the message; its channel is gone
        wait_until(lambda: "message orders.tick.held.1 could not be acked" in write.log())
        wait_until(lambda: "message orders.tick.held.1 was handled before" in write.log())
        second = envelope("orders.tick.next.1", json.dumps({"n": -2, "text": "next"}), "{}")
        put(url, queue, second)
        rows = wait_until(lambda: len(r := read_out(out)) >= before + 2 and r)
        assert [r["n"] for r in rows[before:]] == [-1, -2]  # each once, in order
        assert attempts.read_text().split() == [*tried, "-1", "-2"]  # processed once each
        wait_until(lambda: _queue_empty(url), timeout=30)  # the redelivery was acked
        assert write.proc.poll() is None, write.log()
        write.proc.send_signal(signal.SIGTERM)
        assert write.proc.wait(25) == 0
    finally:
        cluster.close()
