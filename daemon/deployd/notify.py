"""The systemd notify protocol, by hand: datagrams to ``$NOTIFY_SOCKET`` and a watchdog pinger.

`Notifier.from_env()` reads (and removes, so children never inherit them) ``NOTIFY_SOCKET``,
``WATCHDOG_USEC`` and ``WATCHDOG_PID``. Without ``NOTIFY_SOCKET`` every call is a no-op, so
`serve` behaves the same outside systemd. `watchdog_pinger` is an asyncio task: it pings from
the event loop itself, so a loop that stops turning stops the pings and systemd restarts us.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import MutableMapping

log = logging.getLogger("deployd.notify")

_ENV_KEYS = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


def monotonic_usec() -> int:
    """CLOCK_MONOTONIC in microseconds, as systemd wants it in ``MONOTONIC_USEC=``."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def _address(value: str) -> str | bytes | None:
    """``/run/…`` stays a path; ``@name`` is an abstract socket (leading NUL byte)."""
    if value.startswith("@"):
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    return None  # vsock:… and other forms are not supported by this small sender


class Notifier:
    """Sends ``KEY=value`` lines to the service manager; never raises, never blocks."""

    def __init__(self, socket_path: str | None, watchdog_usec: int | None = None) -> None:
        self.address = _address(socket_path) if socket_path else None
        if socket_path and self.address is None:
            log.warning("NOTIFY_SOCKET=%r is not a path or @abstract name; ignored", socket_path)
        self.watchdog_usec = watchdog_usec
        self._sock: socket.socket | None = None
        self._warned = False

    @classmethod
    def from_env(
        cls, environ: MutableMapping[str, str] | None = None, unset: bool = True
    ) -> Notifier:
        """The notifier systemd asked for; `unset` drops the variables so children lack them."""
        env = os.environ if environ is None else environ
        sock = env.get("NOTIFY_SOCKET") or None
        usec: int | None = None
        raw = env.get("WATCHDOG_USEC")
        pid = env.get("WATCHDOG_PID")
        if raw and (not pid or pid == str(os.getpid())):
            try:
                usec = int(raw) if int(raw) > 0 else None
            except ValueError:
                log.warning("WATCHDOG_USEC=%r is not a number; watchdog pings disabled", raw)
        if unset:
            for key in _ENV_KEYS:
                env.pop(key, None)
        return cls(sock, usec)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    @property
    def watchdog_interval(self) -> float | None:
        """Seconds between pings: half of what systemd allows, or None without a watchdog."""
        if not self.enabled or not self.watchdog_usec:
            return None
        return self.watchdog_usec / 2 / 1_000_000

    def send(self, *lines: str) -> bool:
        """Send one datagram of ``KEY=value`` lines; False when it could not be sent."""
        if self.address is None:
            return False
        data = "\n".join(line.replace("\n", " ") for line in lines).encode()
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.setblocking(False)
            self._sock.sendto(data, self.address)
        except OSError as exc:
            if not self._warned:  # once: a gone manager must not flood the log
                log.warning("cannot notify the service manager: %s", exc)
                self._warned = True
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        return self.send("READY=1", *([f"STATUS={status}"] if status else []))

    def reloading(self) -> bool:
        return self.send("RELOADING=1", f"MONOTONIC_USEC={monotonic_usec()}")

    def stopping(self) -> bool:
        return self.send("STOPPING=1")

    def status(self, line: str) -> bool:
        return self.send(f"STATUS={line}")

    def watchdog(self) -> bool:
        return self.send("WATCHDOG=1")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


async def watchdog_pinger(notifier: Notifier, interval: float | None = None) -> None:
    """Send ``WATCHDOG=1`` every `interval` seconds (default: half of WATCHDOG_USEC), forever.

    It runs on the daemon's event loop on purpose: if the loop blocks, the pings stop.
    """
    interval = interval if interval is not None else notifier.watchdog_interval
    if interval is None:
        return
    while True:
        notifier.watchdog()
        await asyncio.sleep(interval)
