"""The systemd notify protocol, checked on a real datagram socket that the test binds.

The daemon tests run the real `deployd serve` with NOTIFY_SOCKET/WATCHDOG_USEC in its
environment, as systemd would set them, and read what it sends.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator

import pytest

from deployd.notify import Notifier, monotonic_usec, watchdog_pinger
from tests.conftest import HTTP, Daemon, wait_until


class NotifySocket:
    """A bound AF_UNIX datagram socket collecting every message sent to it, with arrival time."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(b"\0" + address[1:].encode() if address.startswith("@") else address)
        self.sock.setblocking(False)
        self.messages: list[tuple[float, dict[str, str]]] = []

    def drain(self) -> list[dict[str, str]]:
        while True:
            try:
                data = self.sock.recv(4096)
            except BlockingIOError:
                break
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            self.messages.append((time.monotonic(), fields))
        return [m for _t, m in self.messages]

    def wait_for(self, key: str, value: str | None = None, after: int = 0) -> dict[str, str]:
        """The first message at index ≥ `after` that has `key` (= `value`)."""

        def find() -> dict[str, str] | None:
            for msg in self.drain()[after:]:
                if key in msg and (value is None or msg[key] == value):
                    return msg
            return None

        return dict(wait_until(find, timeout=30))

    def index(self, key: str, value: str) -> int:
        for i, msg in enumerate(self.drain()):
            if msg.get(key) == value:
                return i
        return -1

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def notify_socket() -> Iterator[NotifySocket]:
    sock = NotifySocket(f"@deployd-test-{uuid.uuid4().hex}")
    yield sock
    sock.close()


# -- the sender on its own ------------------------------------------------------------------


def test_sends_to_abstract_and_path_sockets(notify_socket: NotifySocket, tmp_path_factory) -> None:
    n = Notifier(notify_socket.address)
    assert n.ready("2 component(s)")
    assert notify_socket.wait_for("READY") == {"READY": "1", "STATUS": "2 component(s)"}
    n.close()

    folder = tmp_path_factory.mktemp("n")  # the default tmp path may exceed sun_path's 108 bytes
    path = str(folder / "s") if len(str(folder)) < 90 else f"/tmp/deployd-{uuid.uuid4().hex}"
    on_disk = NotifySocket(path)
    try:
        n = Notifier(path)
        before = monotonic_usec()
        assert n.reloading()
        msg = on_disk.wait_for("RELOADING")
        assert before <= int(msg["MONOTONIC_USEC"]) <= monotonic_usec()
        n.close()
    finally:
        on_disk.close()
        if path.startswith("/tmp/deployd-"):
            os.unlink(path)


def test_from_env_reads_and_unsets_the_variables() -> None:
    env = {"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "3000000", "PATH": "/bin"}
    n = Notifier.from_env(env)
    assert n.enabled and n.watchdog_interval == 1.5
    assert env == {"PATH": "/bin"}  # children (builds, steps) never see them

    other_pid = {"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "3000000", "WATCHDOG_PID": "1"}
    assert Notifier.from_env(other_pid).watchdog_interval is None  # meant for another process
    assert not Notifier.from_env({}).enabled
    assert not Notifier(None).send("READY=1")


def test_send_to_a_missing_socket_is_harmless() -> None:
    n = Notifier(f"@deployd-nobody-{uuid.uuid4().hex}")
    assert n.send("READY=1") is False
    assert n.watchdog() is False
    n.close()


def test_watchdog_pings_stop_while_the_loop_is_blocked(notify_socket: NotifySocket) -> None:
    """The pinger runs on the loop: a loop stuck for 0.6 s sends nothing for 0.6 s."""
    n = Notifier(notify_socket.address)
    interval = 0.05
    arrivals: list[float] = []
    notify_socket.sock.setblocking(True)
    notify_socket.sock.settimeout(5)

    def receive() -> None:  # stamps each ping as it arrives, while the loop is blocked
        while (data := notify_socket.sock.recv(64)) != b"END":
            if data == b"WATCHDOG=1":
                arrivals.append(time.monotonic())

    receiver = threading.Thread(target=receive, daemon=True)
    receiver.start()

    async def scenario() -> None:
        task = asyncio.get_running_loop().create_task(watchdog_pinger(n, interval))
        await asyncio.sleep(interval * 4)
        threading.Event().wait(0.6)  # blocks the event loop itself, like a stuck handler
        await asyncio.sleep(interval * 4)
        task.cancel()

    asyncio.run(scenario())
    n.send("END")
    n.close()
    receiver.join(5)
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    assert max(gaps) >= 0.55  # the stuck loop stopped the pings
    assert sorted(gaps)[len(gaps) // 2] < 0.3  # otherwise they keep coming


# -- the real daemon ------------------------------------------------------------------------


def _started(
    daemon_factory: Callable[..., Daemon], sock: NotifySocket, watchdog_usec: int = 300_000
) -> Daemon:
    d = daemon_factory()
    d.env.update({"NOTIFY_SOCKET": sock.address, "WATCHDOG_USEC": str(watchdog_usec)})
    d.start(wait=False)
    return d


def test_daemon_speaks_the_protocol(
    daemon_factory: Callable[..., Daemon], notify_socket: NotifySocket
) -> None:
    d = _started(daemon_factory, notify_socket)
    ready = notify_socket.wait_for("READY", "1")
    # READY=1 means the listener is bound: the very next request is answered.
    assert HTTP.get(d.url + "/healthz", timeout=5).status_code == 200
    assert "1 component(s)" in ready["STATUS"]

    # WATCHDOG=1 keeps coming, about every WATCHDOG_USEC / 2 (0.15 s here).
    first = len(notify_socket.drain())
    wait_until(
        lambda: sum(1 for m in notify_socket.drain()[first:] if m.get("WATCHDOG") == "1") >= 4
    )

    # SIGHUP: RELOADING=1 with a monotonic timestamp, then READY=1 again.
    mark = len(notify_socket.drain())
    before = monotonic_usec()
    assert d.proc is not None
    d.proc.send_signal(signal.SIGHUP)
    reloading = notify_socket.wait_for("RELOADING", "1", after=mark)
    assert before <= int(reloading["MONOTONIC_USEC"]) <= monotonic_usec()
    at = notify_socket.index("RELOADING", "1")
    notify_socket.wait_for("READY", "1", after=at + 1)

    # SIGTERM: STOPPING=1, exit 0.
    mark = len(notify_socket.drain())
    assert d.stop(signal.SIGTERM) == 0
    notify_socket.wait_for("STOPPING", "1", after=mark)
