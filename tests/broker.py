"""A private, real RabbitMQ for the tests (and the bench scripts).

`Broker` runs the `rabbitmq-server` of the Debian package (3.10 here) as the current user,
root included, with nothing of the system's installation: its own temp dir holds the config,
the definitions, the mnesia and log dirs, the pid file and a `HOME` with its own Erlang cookie
(so neither `/var/lib/rabbitmq/.erlang.cookie` nor `~/.erlang.cookie` is read, written or
needed, and an inherited `RABBITMQ_ERLANG_COOKIE` is dropped with every other `RABBITMQ_*` /
`ERL_*` variable). `/etc/rabbitmq` is ignored too (`RABBITMQ_CONF_ENV_FILE`,
`RABBITMQ_CONFIG_FILES` and `RABBITMQ_ADVANCED_CONFIG_FILE` point into the temp dir). The
Debian wrapper `/usr/sbin/rabbitmq-server` is not used: as root it would `su rabbitmq`.

Everything listens on loopback only, on ports of its own: AMQP (`listeners.tcp.1`), the Erlang
distribution port (`RABBITMQ_DIST_PORT`, bound to 127.0.0.1) and an epmd that the broker
starts itself on a free port (`ERL_EPMD_PORT`); so two test runs at once never collide, and a
system broker or epmd on 5672/25672/4369 (Debian's postinst may start one) is neither used nor
disturbed. `close()` ends that epmd too: no process is left behind. Its CLI calls (`ctl`) use
the same epmd and cookie and let the OS pick their distribution port (the default range
35672-35682 is an ordinary port range that anything may hold).

One user (`deployd`, a random password; there is no `guest`) and a pool of vhosts `t001`,
`t002`, ... with full permissions are created at the first boot from a definitions file
(`definitions.import_backend = local_filesystem`; `definitions.skip_if_unchanged`, so a
restart does not import them again). `vhost_url()` hands out a never-used one per call.

Costs, measured on the 2-CPU dev machine while other suites loaded it (load average 3-4):
ready (an AMQP connection to the last pool vhost works) 5.4 s after `start()` with 1 vhost,
5.5 s with 20, 8 s with 50, 13 s with 100; 200 took 42 s (load 6.5) and 73 s to restart — a
restart recovers every vhost before it opens its listener, at the same cost as the first
boot, and each vhost costs more the more there are. Hence `Broker(vhosts=N)`, default
`DEFAULT_VHOSTS` (50; `DEPLOYD_TEST_RABBITMQ_VHOSTS` sets the session broker's), and a test
that stops, kills or restarts a broker uses a small one of its own, never the session's.
`stop()` (SIGTERM, which RabbitMQ handles as a clean shutdown) takes 1-2 s, `kill()` ~0.2 s.

Quorum queues after a restart, found with tests/test_broker.py (RabbitMQ 3.10.8, Ra 2.2.0):

- After any restart (stop or kill), a quorum queue has no leader for about a second: wait
  for one with `wait_quorum_leader` (a bounded poll of `rabbitmq-queues quorum_status`)
  before relying on it. A passive declare is no test: it answers at once, from the queue
  record, even when there is no leader, and after a kill its message count reads 0 until
  the member has replayed its log. Once there is a leader, persistent messages published
  with confirms are all there, after `stop()` and after `kill()` alike (the Ra WAL is
  fsynced before a confirm).
- But a quorum queue declared less than ~1 s before a `kill()` (SIGKILL) comes back broken
  (every time, 8 tries; never when the kill came 1 s or more after): the queue record
  survives (it is in mnesia), but Ra's registry of its members (`quorum/<node>/names.dets`,
  a dets table saved ~1 s after a change) lost the new member, so the boot starts it as a
  new one — new id, empty log, Term 0 — which never elects itself (still "follower", Term 0,
  after 120 s): a get or consume on it hangs, and its messages, though confirmed, are gone
  (forcing an election with `ra:trigger_election` gives an empty, usable queue). A clean
  `stop()` right after a declare is fine, and so is a kill once the registration is on
  disk. So a test that kills the broker calls `wait_quorum_durable` (a bounded poll of that
  file) between its declares and the kill; a test that means to crash at a random moment
  must expect this. Upstream reports of the same mechanism (a member "not found on this
  node" started as a new one): rabbitmq/rabbitmq-server#10007 and #15725.
  `test_a_quorum_queue_declared_just_before_a_kill_comes_back_as_an_empty_member` pins it.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import contextlib
import glob
import hashlib
import json
import os
import secrets
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

SERVER_ENV = "DEPLOYD_TEST_RABBITMQ_SERVER"
"""Path of the `rabbitmq-server` script to use (the real one, not Debian's `su` wrapper).
Set it to a path that does not exist to make the broker unavailable (tests of the skip path)."""

SERVER_LOCATIONS = (
    "/usr/lib/rabbitmq/bin/rabbitmq-server",  # Debian / Ubuntu package
    "/usr/local/opt/rabbitmq/sbin/rabbitmq-server",  # Homebrew
    "/opt/homebrew/opt/rabbitmq/sbin/rabbitmq-server",
)
DEFAULT_VHOSTS = 50
VHOSTS_ENV = "DEPLOYD_TEST_RABBITMQ_VHOSTS"  # the session broker's pool size (tests/conftest.py)
USER = "deployd"
DIST_LOOPBACK = "-kernel inet_dist_use_interface {127,0,0,1}"  # distribution port on loopback
T = TypeVar("T")


# --------------------------------------------------------------------------- finding it


def _server_script() -> tuple[Path | None, str]:
    """The real `rabbitmq-server` script, or None and why not."""
    override = os.environ.get(SERVER_ENV)
    if override:
        path = Path(override)
        if path.is_file() and os.access(path, os.X_OK):
            return path, ""
        return None, f"{SERVER_ENV}={override} is not an executable file"
    candidates = [Path(p) for p in SERVER_LOCATIONS]
    found = shutil.which("rabbitmq-server", path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
    if found:
        real = Path(found).resolve()
        # Debian's /usr/sbin/rabbitmq-server is a symlink to a wrapper that `su`s to rabbitmq;
        # the real script sits next to the wrapper.
        candidates.append(
            real.parent / "rabbitmq-server" if real.name != "rabbitmq-server" else real
        )
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            return path, ""
    return None, f"no {SERVER_LOCATIONS[0]} and none on PATH"


def _epmd() -> str | None:
    found = shutil.which("epmd")
    if found:
        return found
    hits = sorted(glob.glob("/usr/lib/erlang/erts-*/bin/epmd"))
    return hits[-1] if hits else None


def broker_unavailable() -> str | None:
    """Why a private broker cannot be had on this machine, or None when it can."""
    script, why = _server_script()
    if script is None:
        return (
            f"rabbitmq-server is not installed ({why}; "
            "`make test` installs the Debian package when run as root, "
            "or: apt-get install rabbitmq-server)"
        )
    if _epmd() is None:
        return "Erlang's epmd is not installed (apt-get install erlang-base)"
    return None


# --------------------------------------------------------------------------- helpers


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def _password_hash(password: str) -> str:
    """RabbitMQ's `rabbit_password_hashing_sha256`: base64(salt + sha256(salt + password))."""
    salt = secrets.token_bytes(4)
    return base64.b64encode(salt + hashlib.sha256(salt + password.encode()).digest()).decode()


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def epmd_names(port: int) -> list[str] | None:
    """The node names registered with the epmd on `port` (NAMES_REQ), None if it is not up."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
            s.sendall(struct.pack(">HB", 1, 110))
            data = b""
            while chunk := s.recv(4096):
                data += chunk
    except OSError:
        return None
    return [line.split()[1] for line in data[4:].decode(errors="replace").splitlines() if line]


def proc_stat(pid: int) -> tuple[int, str] | None:
    """(parent pid, start time) of a live process, None when it is gone or a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    if fields[0] == "Z":
        return None
    return int(fields[1]), fields[19]


def descendants(pid: int) -> dict[int, str]:
    """Every live descendant of `pid`: pid → start time (to not mistake a reused pid)."""
    children: dict[int, list[int]] = {}
    starts: dict[int, str] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (st := proc_stat(int(entry))) is not None:
            children.setdefault(st[0], []).append(int(entry))
            starts[int(entry)] = st[1]
    found: dict[int, str] = {}
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found[child] = starts[child]
            todo.append(child)
    return found


def alive(procs: dict[int, str]) -> dict[int, str]:
    return {p: s for p, s in procs.items() if (st := proc_stat(p)) is not None and st[1] == s}


def _wait(cond: Callable[[], object], timeout: float, what: str, interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout}s")
        time.sleep(interval)


def run_async(factory: Callable[[], Awaitable[T]]) -> T:
    """Run a coroutine to completion from sync code, even inside a running event loop."""

    async def main() -> T:
        return await factory()

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(main())
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, main()).result()


async def _amqp_works(url: str, timeout: float) -> bool:
    import aio_pika

    try:
        connection = await aio_pika.connect(url, timeout=timeout)
    except (OSError, TimeoutError, aio_pika.exceptions.AMQPError):
        return False
    try:
        channel = await connection.channel()
        await channel.close()
    finally:
        await connection.close()
    return True


# --------------------------------------------------------------------------- the broker


class Broker:
    """A private rabbitmq-server in its own temp dir (under `root`, default the system's)."""

    url: str
    port: int

    def __init__(self, root: Path | None = None, vhosts: int = DEFAULT_VHOSTS) -> None:
        script, why = _server_script()
        epmd = _epmd()
        if script is None or epmd is None:
            raise RuntimeError(broker_unavailable() or why)
        self.server_script = script
        self.ctl_script = script.parent / "rabbitmqctl"
        self.queues_script = script.parent / "rabbitmq-queues"
        self.epmd_program = epmd
        if root is not None:
            root.mkdir(parents=True, exist_ok=True)
        self.dir = Path(tempfile.mkdtemp(prefix="deployd-rabbitmq-", dir=root))
        self.node = f"deployd-test-{secrets.token_hex(4)}@localhost"
        self.port, self.dist_port, self.epmd_port = _free_ports(3)
        self.user = USER
        self.password = secrets.token_hex(12)
        self.url = f"amqp://{self.user}:{self.password}@127.0.0.1:{self.port}/"
        self.vhosts = [f"t{i:03d}" for i in range(1, vhosts + 1)]
        self._next_vhost = 0
        self.last_start_seconds: float | None = None
        self._server: subprocess.Popen[bytes] | None = None
        self._epmd: subprocess.Popen[bytes] | None = None
        self._write_files()

    # -- files and environment

    @property
    def log_path(self) -> Path:
        return self.dir / "log" / f"{self.node}.log"

    def _write_files(self) -> None:
        d = self.dir
        (d / "home").mkdir()
        cookie = d / "home" / ".erlang.cookie"
        cookie.write_text(secrets.token_hex(16).upper())
        cookie.chmod(0o400)  # Erlang refuses a cookie file others can read
        (d / "conf.d").mkdir()
        (d / "rabbitmq-env.conf").write_text("")
        (d / "enabled_plugins").write_text("[].\n")
        names = ["/", *self.vhosts]
        definitions = {
            "users": [
                {
                    "name": self.user,
                    "password_hash": _password_hash(self.password),
                    "hashing_algorithm": "rabbit_password_hashing_sha256",
                    "tags": ["administrator"],
                }
            ],
            "vhosts": [{"name": name} for name in names],
            "permissions": [
                {"user": self.user, "vhost": name, "configure": ".*", "write": ".*", "read": ".*"}
                for name in names
            ],
        }
        (d / "definitions.json").write_text(json.dumps(definitions, indent=1))
        (d / "rabbitmq.conf").write_text(
            "\n".join(
                [
                    f"listeners.tcp.1 = 127.0.0.1:{self.port}",
                    "definitions.import_backend = local_filesystem",
                    f"definitions.local.path = {d / 'definitions.json'}",
                    "definitions.skip_if_unchanged = true",
                    "log.console = false",
                    "log.file.level = info",
                    "",
                ]
            )
        )

    def _env(self) -> dict[str, str]:
        d = self.dir
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("RABBITMQ_", "ERL_")) and k != "NOTIFY_SOCKET"
        }
        env.update(
            {
                "HOME": str(d / "home"),
                "RABBITMQ_NODENAME": self.node,
                "RABBITMQ_DIST_PORT": str(self.dist_port),
                "ERL_EPMD_PORT": str(self.epmd_port),
                "ERL_EPMD_ADDRESS": "127.0.0.1",
                "RABBITMQ_MNESIA_BASE": str(d / "mnesia"),
                "RABBITMQ_LOG_BASE": str(d / "log"),
                "RABBITMQ_CONFIG_FILE": str(d / "rabbitmq.conf"),
                "RABBITMQ_CONFIG_FILES": str(d / "conf.d"),
                "RABBITMQ_ADVANCED_CONFIG_FILE": str(d / "advanced.config"),
                "RABBITMQ_CONF_ENV_FILE": str(d / "rabbitmq-env.conf"),
                "RABBITMQ_ENABLED_PLUGINS_FILE": str(d / "enabled_plugins"),
                "RABBITMQ_PID_FILE": str(d / "rabbitmq.pid"),
                "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": DIST_LOOPBACK,
                "RABBITMQ_CTL_DIST_PORT_MIN": "0",
                "RABBITMQ_CTL_DIST_PORT_MAX": "0",
            }
        )
        return env

    def log_tail(self, lines: int = 40) -> str:
        parts = []
        for path in (self.dir / "server.out", self.log_path, self.dir / "epmd.out"):
            if path.exists():
                text = path.read_text(errors="replace").splitlines()[-lines:]
                parts.append(f"--- {path}\n" + "\n".join(text))
        return "\n".join(parts)

    # -- processes

    def _start_epmd(self) -> None:
        if self._epmd is not None and self._epmd.poll() is None:
            return
        with (self.dir / "epmd.out").open("ab") as out:
            self._epmd = subprocess.Popen(
                [self.epmd_program, "-port", str(self.epmd_port), "-address", "127.0.0.1"],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=self._env(),
                start_new_session=True,
            )
        epmd = self._epmd

        def up() -> bool:
            if epmd.poll() is not None:
                raise RuntimeError(f"epmd exited {epmd.returncode}:\n{self.log_tail()}")
            return epmd_names(self.epmd_port) is not None

        _wait(up, 10, f"epmd on port {self.epmd_port}")

    def running(self) -> bool:
        return self._server is not None and self._server.poll() is None

    def beam_pid(self) -> int | None:
        """The pid of the Erlang VM: the script's child (it `exec`s erl, erl `exec`s beam)."""
        if self._server is None:
            return None
        for pid in descendants(self._server.pid):
            with contextlib.suppress(OSError):
                if Path(f"/proc/{pid}/comm").read_text().strip().startswith("beam"):
                    return pid
        return None

    def start(self, timeout: float = 60) -> None:
        """Start the broker; return once an AMQP connection (to the last pool vhost) works."""
        if self.running():
            raise RuntimeError("broker already running")
        t0 = time.monotonic()
        self._start_epmd()
        with (self.dir / "server.out").open("ab") as out:
            self._server = subprocess.Popen(
                [str(self.server_script)],
                cwd=self.dir,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=self._env(),
                start_new_session=True,
            )
        server = self._server
        probe = self.url + (self.vhosts[-1] if self.vhosts else "")

        def ready() -> bool:
            if server.poll() is not None:
                raise RuntimeError(
                    f"rabbitmq-server exited {server.returncode} during start:\n{self.log_tail()}"
                )
            return _port_open(self.port) and run_async(lambda: _amqp_works(probe, 5))

        try:
            _wait(ready, timeout, f"RabbitMQ {self.node} accepting AMQP connections", 0.1)
        except TimeoutError as exc:
            self._terminate(signal.SIGKILL, 30)
            raise TimeoutError(f"{exc}\n{self.log_tail()}") from None
        except BaseException:
            self._terminate(signal.SIGKILL, 30)
            raise
        self.last_start_seconds = time.monotonic() - t0

    def _terminate(self, sig: int, timeout: float) -> None:
        """Send `sig` to the Erlang VM; wait until it, the script and every child are gone and
        the node name is off epmd (so the next start can take it again)."""
        server = self._server
        if server is None:
            return
        procs = descendants(server.pid)
        beam = self.beam_pid()
        if server.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                if beam is not None:
                    os.kill(beam, sig)
                elif sig == signal.SIGTERM:
                    os.kill(server.pid, sig)  # the script forwards it to the VM
                else:
                    os.killpg(server.pid, sig)
        try:
            server.wait(timeout)
            _wait(lambda: not alive(procs), 10, "the broker's child processes to exit")
        except (subprocess.TimeoutExpired, TimeoutError):
            for pid in alive(procs):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(server.pid, signal.SIGKILL)
            server.wait(10)
            raise TimeoutError(
                f"RabbitMQ did not exit within {timeout}s of signal {sig} (killed):\n"
                + self.log_tail()
            ) from None
        finally:
            self._server = None
        _wait(
            lambda: self.node.split("@")[0] not in (epmd_names(self.epmd_port) or []),
            10,
            "the node to leave epmd",
        )

    def stop(self) -> None:
        """Stop cleanly (SIGTERM to the Erlang VM, which RabbitMQ handles as `rabbitmqctl stop`)."""
        self._terminate(signal.SIGTERM, 60)

    def kill(self) -> None:
        """SIGKILL the Erlang VM (beam.smp): a crash."""
        if not self.running() or self.beam_pid() is None:
            raise RuntimeError("broker not running")
        self._terminate(signal.SIGKILL, 30)

    def restart(self, timeout: float = 60) -> None:
        """Start again on the same data dir and port (stopping it cleanly first if running)."""
        if self.running():
            self.stop()
        self.start(timeout)

    def vhost_url(self) -> str:
        """A url on a vhost of the pool no one has had yet."""
        if self._next_vhost >= len(self.vhosts):
            raise RuntimeError(
                f"all {len(self.vhosts)} vhosts of the test broker are used; "
                f"make the pool bigger: Broker(vhosts=N), {VHOSTS_ENV}=N for the session's"
            )
        vhost = self.vhosts[self._next_vhost]
        self._next_vhost += 1
        return self.url + vhost

    def ctl(self, *args: str, timeout: float = 60) -> str:
        """Run `rabbitmqctl -n NODE ARGS...` (e.g. `list_queues name leader`); its stdout."""
        proc = subprocess.run(
            [str(self.ctl_script), "-q", "-n", self.node, *args],
            cwd=self.dir,
            env=self._env(),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"rabbitmqctl {' '.join(args)}: {proc.stdout}{proc.stderr}")
        return proc.stdout

    def quorum_status(self, vhost: str, queue: str) -> list[dict[str, Any]]:
        """`rabbitmq-queues quorum_status`: one dict per member ("Raft State", "Term", ...)."""
        args = ["quorum_status", queue, "-p", vhost, "--formatter", "json"]
        proc = subprocess.run(
            [str(self.queues_script), "-q", "-n", self.node, *args],
            cwd=self.dir,
            env=self._env(),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"quorum_status {vhost}/{queue}: {proc.stdout}{proc.stderr}")
        return list(json.loads(proc.stdout))

    def wait_quorum_leader(self, vhost: str, queue: str, timeout: float = 60) -> None:
        """Wait (bounded poll) until the quorum queue has a leader: needed after every start.

        A passive declare is no test (it answers from the queue record, leader or not, with a
        message count that may still be 0), hence the CLI."""
        last: object = None

        def has_leader() -> bool:
            nonlocal last
            try:
                last = self.quorum_status(vhost, queue)
            except (RuntimeError, subprocess.TimeoutExpired, ValueError) as exc:
                last = exc
                return False
            return any(m.get("Raft State") == "leader" for m in last)

        try:
            _wait(has_leader, timeout, f"a leader for quorum queue {vhost}/{queue}", 0.5)
        except TimeoutError as exc:
            raise TimeoutError(
                f"{exc}; last status: {last!r} (a member at Term 0 / Log Index 0 was re-created "
                "empty: the queue was declared too shortly before a kill, see tests/broker.py)"
            ) from None

    def wait_quorum_durable(self, vhost: str, queue: str, timeout: float = 30) -> None:
        """Wait (bounded poll) until the quorum queue's Ra member would survive a `kill()`.

        RabbitMQ 3.10 (Ra 2.2) keeps the name → id registry of its Ra members in a dets file
        (`quorum/<node>/names.dets`) that reaches the disk ~1 s after a declare; a SIGKILL before
        that leaves the queue record without its member (see the module docstring)."""
        name = f"{vhost.replace('/', '%2F')}_{queue}".encode()
        names = self.dir / "mnesia" / self.node / "quorum" / self.node / "names.dets"
        _wait(
            lambda: names.exists() and name in names.read_bytes(),
            timeout,
            f"quorum queue {vhost}/{queue} registered on disk ({names})",
        )

    def close(self) -> None:
        """Stop (or, failing that, kill) the broker, end its epmd, remove the temp dir."""
        try:
            if self.running():
                try:
                    self.stop()
                except TimeoutError:
                    self._terminate(signal.SIGKILL, 30)
        finally:
            epmd, self._epmd = self._epmd, None
            if epmd is not None:
                if epmd.poll() is None:
                    epmd.terminate()
                try:
                    epmd.wait(10)
                except subprocess.TimeoutExpired:
                    epmd.kill()
                    epmd.wait(10)
            if not os.environ.get("DEPLOYD_KEEP_BROKER_DIR"):
                shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Broker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def vhost_of(url: str) -> str:
    """The vhost of a `vhost_url()` (the default vhost "/" for `Broker.url`)."""
    return url.rsplit("/", 1)[1] or "/"


def start_broker(root: Path, vhosts: int = DEFAULT_VHOSTS, timeout: float = 60) -> Broker:
    """A started Broker with its temp dir under `root` (the caller closes it)."""
    broker = Broker(root, vhosts=vhosts)
    try:
        broker.start(timeout)
    except BaseException:
        broker.close()
        raise
    return broker


def connections(broker: Broker, vhost: str) -> list[dict[str, Any]]:
    """The broker's client connections in `vhost`: name, connection_name (what the client
    calls it), and pid (what `rabbitmqctl close_connection` takes)."""
    out = broker.ctl(
        "list_connections", "name", "vhost", "client_properties", "--formatter", "json"
    )
    rows = [r for r in json.loads(out or "[]") if r["vhost"] == vhost]
    for row in rows:
        props = row["client_properties"]
        # rabbitmqctl renders the table as [name, type, value] triples (or as a map)
        if isinstance(props, list):
            props = {p[0]: p[2] for p in props if isinstance(p, list) and len(p) == 3}
        row["connection_name"] = props.get("connection_name")
    # the pid as close_connection takes it (the JSON formatter writes it another way)
    pids = dict(
        reversed(line.split("\t", 1))  # type: ignore[misc]
        for line in broker.ctl("list_connections", "pid", "name").splitlines()
        if "\t" in line
    )
    for row in rows:
        row["pid"] = pids.get(row["name"])
    return rows
