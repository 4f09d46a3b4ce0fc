"""Publishes through the cluster, end to end on this machine: a real deployd with placement =
"kubernetes" and a real RabbitMQ; the Kubernetes API is the loopback emulator, and a "kubelet"
thread of the test runs each Deployment's pods as local processes with the Deployment's
command and environment (`test_pod.container_env`), reports them available once their
readiness probe passes, and stops them (SIGTERM) when a Deployment is scaled to 0 or deleted.
"""

from __future__ import annotations

import base64
import contextlib
import json
import signal
import subprocess
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from deployd.runtime.kubernetes.manifests import gate_queue, hooks_queue
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
from tests.kubernetes.test_cluster import kubeconfig
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
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        with contextlib.suppress(KeyError):
            self.emu.set_status(name, {"replicas": 0, "availableReplicas": 0})

    def close(self) -> None:
        self.stop.set()
        with self.lock:
            procs = list(self.pods.values())
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)


@pytest.fixture
def emu() -> Iterator[Emulator]:
    e = Emulator().start()
    yield e
    e.close()


def cluster_env(
    daemon_factory: Callable[..., Daemon],
    component: Callable[..., Work],
    emu: Emulator,
    amqp_url: str,
    tmp_path: Path,
    files: dict[str, Any] | None = None,
    **daemon_keys: Any,
) -> FlowEnv:
    work = component("hello")
    work.commit("counter component", files or counter_files())
    d = daemon_factory(**{"rollback_window": "2s", "warmup_timeout": "60s", **daemon_keys})
    d.extra_toml = (
        f'[runtime]\ndefault = "rabbitmq"\n[runtime.rabbitmq]\nurl = "{amqp_url}"\n'
        'placement = "kubernetes"\n[runtime.kubernetes]\n'
        f'kubeconfig = "{kubeconfig(tmp_path, emu.url)}"\n'
        'image = "registry.example.com/deployd-step:1"\n'
        f'public_url = "{d.url}"\n'
    )
    d.start()
    d.wait_recent("hello", work.push(d.hosted("hello")), timeout=30)
    return FlowEnv(d, work, tmp_path)


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


def hooked_flow(out: Path, hooks: Path) -> str:
    tick = {"id": "tick", "component": "hello", "function": "ticker", "interval": "100ms"}
    write = {"id": "write", "component": "hello", "function": "write", "config": {"out": out}}
    return flow_toml("orders", out, steps=[{**tick, "config": {"hooks": hooks}}, write])


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
def test_publish_switch_and_cleanup_through_the_cluster(
    daemon_factory: Callable[..., Daemon],
    component: Callable[..., Work],
    emu: Emulator,
    amqp_url: str,
    tmp_path: Path,
) -> None:
    ticker = {"lib/ticker.py": hooked_ticker()}
    env = cluster_env(
        daemon_factory, component, emu, amqp_url, tmp_path, files=counter_files(**ticker)
    )
    kubelet = Kubelet(emu, tmp_path)
    try:
        out, hooks = env.out(), tmp_path / "hooks.jsonl"
        env.apply(hooked_flow(out, hooks))
        first = env.wait_deploy("orders", 1, timeout=90)
        assert first["status"] == "done", first
        names = emu.names("deployments")
        assert len(names) == 2 and all("-v1-" in n for n in names)
        secret = emu.get("secrets", names[0])
        assert secret is not None and amqp_url not in str(secret)  # base64 in data only
        assert base64.b64decode(secret["data"]["amqp-url"]).decode() == amqp_url
        wait_until(lambda: len(by(read_out(out), "v1")) >= 3, timeout=60)
        status = env.flow("orders")
        assert any("kubernetes:deployd-flows/" in str(s.get("location")) for s in status["steps"])
        # The flow's first start ran startup() in the trigger pod, before its first call.
        assert read_out(hooks) == [{"hook": "startup"}]
        assert {r["token"] for r in read_out(out)} == {"from-startup"}

        # v2's action fails on every fourth n: those messages are dead letters, kept by deployd.
        env.push(counter_files("v2", **{"lib/write.py": FAILING_WRITER, **ticker}))
        second = env.wait_deploy("orders", 2, timeout=90)
        assert second["status"] == "done", second
        assert second["gap_ms"] is not None
        wait_until(lambda: len(by(read_out(out), "v2")) >= 6, timeout=60)
        # The old version goes once the rollback window (2 s) has passed.
        wait_until(lambda: all("-v2-" in n for n in emu.names("deployments")), timeout=30)
        wait_until(lambda: all("-v2-" in n for n in emu.names("secrets")), timeout=30)
        wait_until(lambda: not queue_exists(amqp_url, hooks_queue("orders", "tick", 1)))
        # A publish is no flow start (as on one machine): no startup() in v2's trigger pod.
        assert read_out(hooks) == [{"hook": "startup"}]
        assert {r["token"] for r in read_out(out) if r["by"] == "v2"} == {None}
        letters = wait_until(lambda: errors(env, "orders") or None, timeout=30)
        assert all(x["step"] == "write" and "n is a multiple of 4" in x["error"] for x in letters)
        # Nothing lost, nothing twice, the snapshot kept across the switch: the v2 trigger went
        # on counting from the v1 trigger's last call, so every n up to the highest was either
        # written once or is a dead letter once (a multiple of 4, failed in v2).
        counts = Counter(r["n"] for r in read_out(out))
        top = max(counts)
        failed = {int(errors(env, "orders", x["id"])["body"]["n"]) for x in errors(env, "orders")}
        assert all(n % 4 == 0 for n in failed), failed
        assert all(c == 1 for c in counts.values()), counts
        assert not set(counts) & failed
        assert set(range(1, top + 1)) <= set(counts) | failed, (counts, failed)

        # The cluster refuses the next version: a failed deployment with its reason; v2 runs on.
        emu.fail("PATCH", "deployments", 403, "Forbidden", "deployments.apps is forbidden: quota")
        env.push(counter_files("v3", **ticker))
        third = env.wait_deploy("orders", 3, timeout=90)
        assert third["status"] == "failed"
        assert "Forbidden (403): deployments.apps is forbidden: quota" in third["reason"]
        have = len(by(read_out(out), "v2"))
        wait_until(lambda: len(by(read_out(out), "v2")) >= have + 3, timeout=60)
        assert all("-v2-" in n for n in emu.names("deployments"))
        assert queue_exists(amqp_url, hooks_queue("orders", "tick", 2))

        # `flow stop`: shutdown() runs in the running trigger pod with what startup() returned
        # at the flow's start; then the version's objects and queues go.
        env.daemon.cli("flow", "stop", "orders")
        assert read_out(hooks)[-1] == {"hook": "shutdown", "data": {"token": "from-startup"}}
        wait_until(lambda: not emu.names("deployments"), timeout=30)
        for name in (hooks_queue("orders", "tick", 2), gate_queue("orders", "tick", 2)):
            assert not queue_exists(amqp_url, name), name
    finally:
        kubelet.close()


@SLOW
def test_a_daemon_killed_mid_publish_leaves_nothing_twice(
    daemon_factory: Callable[..., Daemon],
    component: Callable[..., Work],
    emu: Emulator,
    amqp_url: str,
    tmp_path: Path,
) -> None:
    """kill -9 of deployd while v2 is warming up (its Deployments applied, not yet available):
    at start the unfinished deployment is failed and the active version warmed up again (the
    same objects applied again: nothing twice); the catch-up publishes the new code anew as
    the daemon's crash-only rules say, and v2's objects, which no flow runs, are deleted by
    the reconciliation: in the end the cluster holds exactly the active version's. The
    trigger's startup() returned nothing and is not run again at the daemon's start."""
    ticker = {"lib/ticker.py": hooked_ticker("None")}
    env = cluster_env(
        daemon_factory, component, emu, amqp_url, tmp_path, files=counter_files(**ticker)
    )
    kubelet = Kubelet(emu, tmp_path)
    try:
        out, hooks = env.out(), tmp_path / "hooks.jsonl"
        env.apply(hooked_flow(out, hooks))
        assert env.wait_deploy("orders", 1, timeout=90)["status"] == "done"
        v1 = emu.names("deployments")
        wait_until(lambda: len(by(read_out(out), "v1")) >= 3, timeout=60)
        kubelet.paused.set()  # no pod of v2 comes up: the publish stays in its warm-up
        env.work.commit("v2", counter_files("v2", **ticker))
        env.work.push(env.daemon.hosted("hello"))
        wait_until(lambda: len(emu.names("deployments")) == 4, timeout=60)
        env.daemon.kill()
        env.daemon.start()
        dep = env.wait_deploy("orders", 2, timeout=90)
        assert dep["status"] == "failed"  # the crash-only rule: starting_new becomes failed
        kubelet.resume()  # the pods of v1 went on meanwhile (cluster side)
        have = len(read_out(out))
        wait_until(lambda: len(read_out(out)) >= have + 3, timeout=60)

        def converged() -> bool:
            # A version's Deployments and Secrets are deleted concurrently: wait for both.
            active = env.flow("orders")["version"]
            names = emu.names("deployments")
            secrets = emu.names("secrets")
            return (
                len(names) == 2
                and all(f"-v{active}-" in n for n in names)
                and not any("-v2-" in n for n in secrets)
            )

        wait_until(converged, timeout=90)
        assert v1
        assert read_out(hooks) == [{"hook": "startup"}]  # it ran (returning None): not again
    finally:
        kubelet.close()


FAILING_WRITER = """\
import json


def process(msg, cfg):
    body = msg["body"]
    if body["n"] % 4 == 0:
        raise ValueError(f"n is a multiple of 4: {body['n']}")
    line = {**body, "by": "v2"}
    with open(cfg["out"], "a") as fh:
        fh.write(json.dumps(line) + "\\n")
    return line
"""


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
def test_a_version_whose_pods_crash_is_rolled_back(
    daemon_factory: Callable[..., Daemon],
    component: Callable[..., Work],
    emu: Emulator,
    amqp_url: str,
    tmp_path: Path,
) -> None:
    """v2's trigger pod crashes after it came up; Kubernetes restarts it; deployd sees the
    restarts (the pods' restartCount, watched) and rolls back: v1 applied again (its replicas
    back), warmed, switched to, and v2 removed."""
    env = cluster_env(
        daemon_factory, component, emu, amqp_url, tmp_path, rollback_window="30s", rollback_exits=2
    )
    kubelet = Kubelet(emu, tmp_path)
    try:
        out = env.out()
        env.apply(flow_toml("orders", out, interval="100ms"))
        assert env.wait_deploy("orders", 1, timeout=90)["status"] == "done"
        wait_until(lambda: len(by(read_out(out), "v1")) >= 3, timeout=60)
        env.push(counter_files("v2", **{"lib/ticker.py": CRASHING_TICKER}))
        dep = env.wait_deploys(
            lambda ds: next(
                (d for d in ds if d["to_version"] == 2 and d["status"] == "rolled_back"), None
            ),
            timeout=120,
        )
        assert "restarted (exit code 1" in dep["reason"], dep
        assert env.flow("orders")["version"] == 1
        wait_until(lambda: all("-v1-" in n for n in emu.names("deployments")), timeout=60)
        have = len(by(read_out(out), "v1"))
        wait_until(lambda: len(by(read_out(out), "v1")) >= have + 3, timeout=60)
    finally:
        kubelet.close()


@SLOW
def test_flow_move_onto_kubernetes_and_back_carries_queue_and_snapshot(
    daemon_factory: Callable[..., Daemon],
    component: Callable[..., Work],
    emu: Emulator,
    amqp_url: str,
    tmp_path: Path,
) -> None:
    """The path of a user who outgrows one machine: a flow on the embedded runtime is moved
    onto Kubernetes (`flow move --runtime rabbitmq`, placement "kubernetes") and back while
    messages flow and its action is behind (a queue builds up). Each move is a deployment with
    a gap: the old version stops wholly (its trigger at a call boundary), its queued messages
    are carried to the other side, then the new version starts — from the trigger's last
    snapshot. Nothing lost, nothing handled twice, in order; the pods go once it is back."""
    env = cluster_env(daemon_factory, component, emu, amqp_url, tmp_path)
    kubelet = Kubelet(emu, tmp_path)
    slow = counter_files("v1", **{"lib/write.py": SLOW_WRITER})
    env.push(slow)
    try:
        out = env.out()
        env.apply(flow_toml("orders", out, interval="20ms", keys={"runtime": "embedded"}))
        assert env.wait_deploy("orders", 1, timeout=60)["status"] == "done"
        wait_until(lambda: len(read_out(out)) >= 5, timeout=60)
        assert not emu.names("deployments")
        for target, version in (("rabbitmq", 2), ("embedded", 3)):
            wait_until(lambda: env.queued("write") >= 5, timeout=60)
            have = len(read_out(out))
            res = env.daemon.cli("flow", "move", "orders", "--runtime", target, "--json")
            assert json.loads(res.stdout)["status"] == "done", res.stdout
            dep = env.wait_deploy("orders", version, timeout=90)
            assert dep["trigger"] == "flow move" and dep["status"] == "done", dep
            assert dep["gap_ms"] is not None
            assert env.flow("orders")["runtime"] == target
            if target == "rabbitmq":
                names = emu.names("deployments")
                assert len(names) == 2 and all("-v2-" in n for n in names), names
            wait_until(lambda h=have: len(read_out(out)) >= h + 10, timeout=90)
        # Back on this machine: the pods go (no rollback window for a move's old side).
        wait_until(lambda: not emu.names("deployments"), timeout=60)
        wait_until(lambda: env.queued("write") == 0 or len(read_out(out)) >= 60, timeout=60)
        assert_contiguous(read_out(out))
    finally:
        kubelet.close()


SLOW_WRITER = """\
import json
import time


def process(msg, cfg):
    time.sleep(0.03)  # slower than the trigger: the queue of write builds up
    line = {**msg["body"], "by": "v1"}
    with open(cfg["out"], "a") as fh:
        fh.write(json.dumps(line) + "\\n")
    return line
"""
