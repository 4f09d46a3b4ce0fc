"""Fixtures that build real things: git repositories, component trees, a running daemon."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.broker import DEFAULT_VHOSTS, VHOSTS_ENV, Broker, broker_unavailable, start_broker
from tests.warm_cli import deployd_cli

DEPLOYD = [sys.executable, "-m", "deployd"]
GIT_ENV = {
    "GIT_AUTHOR_NAME": "Test",
    "GIT_AUTHOR_EMAIL": "test@example.com",
    "GIT_COMMITTER_NAME": "Test",
    "GIT_COMMITTER_EMAIL": "test@example.com",
    "GIT_CONFIG_NOSYSTEM": "1",
}


# One HTTP client for the whole run. `httpx.get()` makes a new client per call, and with it an
# SSL context that loads the CA bundle: ~30 ms of CPU each time, so a 20 ms poll of a daemon's
# status kept a core busy beside the daemon under test. No keep-alive: every request opens a
# fresh loopback connection, so a daemon restarted on the same port never meets a stale one.
HTTP = httpx.Client(limits=httpx.Limits(max_keepalive_connections=0))


def wait_until(cond: Callable[[], Any], timeout: float = 30.0, interval: float = 0.02) -> Any:
    """Poll `cond` until it returns something truthy; fail the test after `timeout` seconds.

    `timeout` is a bound for a hung daemon, not a performance figure: on a loaded machine
    (another test suite on the same cores) a start, build or deploy can take many times
    longer than on an idle one, so keep it generous.
    """
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = cond()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s (last value: {last!r})")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def git(*args: str, cwd: Path | None = None, check: bool = True) -> str:
    env = {**os.environ, **GIT_ENV}
    proc = subprocess.run(
        ["git", *args], cwd=cwd, env=env, capture_output=True, text=True, check=False
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"git {' '.join(args)} failed: {proc.stderr}")
    return proc.stdout.strip()


PY_TICKER = """\
def process(msg, cfg, snapshot, ctx):
    return {"text": "hello"}
"""
PY_UPPER = """\
def process(msg, cfg):
    return {"text": str(msg["body"].get("text", "")).upper()}
"""


def default_descriptor(**extra: Any) -> dict[str, Any]:
    desc: dict[str, Any] = {
        "title": "Hello",
        "triggers": {"ticker": {"main": "./lib/ticker.py", "title": "Ticker"}},
        "actions": {"upper": {"main": "./lib/upper.py", "title": "Upper"}},
    }
    desc.update(extra)
    return desc


@dataclass
class Work:
    """A working clone of a component repository, with helpers to change and push it."""

    path: Path
    remote: Path | None = None
    branch: str = "main"

    def write(self, files: dict[str, str | dict[str, Any]]) -> None:
        for rel, content in files.items():
            target = self.path / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, dict):
                target.write_text(json.dumps(content, indent=2))
            else:
                target.write_text(textwrap.dedent(content))

    def commit(self, message: str = "change", files: dict[str, Any] | None = None) -> str:
        if files:
            self.write(files)
        git("add", "-A", cwd=self.path)
        git("commit", "-q", "--allow-empty", "-m", message, cwd=self.path)
        return git("rev-parse", "HEAD", cwd=self.path)

    def push(self, remote: Path | str | None = None, ref: str | None = None, *flags: str) -> str:
        target = str(remote or self.remote)
        git("push", "-q", *flags, target, ref or f"HEAD:refs/heads/{self.branch}", cwd=self.path)
        return git("rev-parse", "HEAD", cwd=self.path)

    def commit_push(self, message: str = "change", files: dict[str, Any] | None = None) -> str:
        self.commit(message, files)
        return self.push()


def make_component(path: Path, descriptor: dict[str, Any] | None = None, **files: str) -> Work:
    """A working clone holding a minimal valid Python component (one commit)."""
    path.mkdir(parents=True, exist_ok=True)
    git("init", "-q", "-b", "main", cwd=path)
    work = Work(path)
    contents: dict[str, Any] = {
        "component.json": descriptor or default_descriptor(),
        "lib/ticker.py": PY_TICKER,
        "lib/upper.py": PY_UPPER,
    }
    contents.update({k.replace("__", "/"): v for k, v in files.items()})
    work.commit("initial", contents)
    return work


@pytest.fixture
def component(tmp_path: Path) -> Callable[..., Work]:
    """component(name="hello", descriptor=None, **files) → a Work clone with one commit."""

    def make(name: str = "hello", descriptor: dict[str, Any] | None = None, **files: str) -> Work:
        return make_component(tmp_path / "work" / name, descriptor, **files)

    return make


@pytest.fixture
def bare_repo(tmp_path: Path) -> Callable[[str], Path]:
    """bare_repo(name) → path of a new empty bare repository (a local `url`)."""

    def make(name: str) -> Path:
        path = tmp_path / "remotes" / f"{name}.git"
        path.parent.mkdir(parents=True, exist_ok=True)
        git("init", "-q", "--bare", "-b", "main", str(path))
        return path

    return make


# The fields of one build in `deployd builds --json` (cli/components.py).
BUILD_FIELDS = "id, component, sha, status, version, source, error, started_at, finished_at"


@dataclass
class Daemon:
    """A real `deployd serve` subprocess with its own config and state dir."""

    root: Path
    port: int
    components: list[dict[str, Any]] = field(default_factory=list)
    daemon_extra: dict[str, Any] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None
    extra_toml: str = ""  # more tables for the config file (e.g. [runtime.rabbitmq])
    listen: str = ""  # HOST:PORT to listen on instead of 127.0.0.1:port (port: its port)

    @property
    def config_path(self) -> Path:
        return self.root / "config.toml"

    @property
    def state_dir(self) -> Path:
        return self.root / "var"

    @property
    def url(self) -> str:
        host = self.listen.rpartition(":")[0].strip("[]") if self.listen else "127.0.0.1"
        if host in ("0.0.0.0", "::"):
            host = "127.0.0.1"  # every address: the tests speak to it on loopback
        return f"http://[{host}]:{self.port}" if ":" in host else f"http://{host}:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.root / "daemon.log"

    def hosted(self, name: str) -> Path:
        return self.state_dir / "repos" / f"{name}.git"

    def write_config(self) -> None:
        listen = self.listen or f"127.0.0.1:{self.port}"
        lines = ["[daemon]", f'state_dir = "{self.state_dir}"', f'listen = "{listen}"']
        # A `git push` to a hosted repository waits for the deploy to report back (issue 15):
        # off here, or tests pushing twice in a row (latest wins) would build each push.
        extra = {"push_feedback_wait": "0", **self.daemon_extra}
        for key, value in extra.items():
            lines.append(f"{key} = {json.dumps(value)}")
        lines.append(self.extra_toml)
        for comp in self.components:
            lines.append("[[components]]")
            for key, value in comp.items():
                lines.append(f"{key} = {json.dumps(value)}")
        self.config_path.write_text("\n".join(lines) + "\n")

    def start(self, wait: bool = True) -> Daemon:
        self.write_config()
        logf = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [*DEPLOYD, "serve", "-c", str(self.config_path)],
            stdout=logf,
            stderr=subprocess.STDOUT,
            env={**os.environ, **self.env},
        )
        logf.close()
        if wait:
            wait_until(self._healthy, timeout=60)  # a cold start on a loaded machine
        return self

    def wait_ready(self, timeout: float = 60) -> None:
        """Until the daemon finished its start (services up, pushes made while it was stopped
        queued): /healthz answers before that, while the services start."""
        wait_until(lambda: "deployd ready on" in self.log(), timeout=timeout)

    def _healthy(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"daemon exited {self.proc.returncode}:\n{self.log()}")
        try:
            return HTTP.get(self.url + "/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 25) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
                raise AssertionError(
                    f"daemon did not stop within {timeout}s:\n{self.log()}"
                ) from None
        code = self.proc.returncode
        self.proc = None
        return code

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        # `component call` takes the step's config as --config (the contract, as on
        # the platform); deployd's own is --daemon-config there.
        flag = "--daemon-config" if args[:2] == ("component", "call") else "-c"
        proc = deployd_cli(
            [*args, flag, str(self.config_path)], env={**os.environ, **self.env}, timeout=60
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"deployd {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
            )
        return proc

    def status(self) -> dict[str, Any]:
        if self.proc is not None:
            return dict(HTTP.get(self.url + "/api/v1/status", timeout=5).json())
        return dict(json.loads(self.cli("status", "--json").stdout))

    def component_status(self, name: str) -> dict[str, Any]:
        for comp in self.status()["components"]:
            if comp["name"] == name:
                return dict(comp)
        raise AssertionError(f"component {name} not in status")

    def recent_sha(self, name: str) -> str | None:
        recent = self.component_status(name)["recent"]
        return recent["sha"] if recent else None

    def wait_recent(self, name: str, sha: str, timeout: float = 60) -> dict[str, Any]:
        wait_until(lambda: self.recent_sha(name) == sha, timeout=timeout)
        return self.component_status(name)

    def builds(self, name: str | None = None) -> list[dict[str, Any]]:
        args = ["builds", "--json"] + ([name] if name else [])
        return list(json.loads(self.cli(*args).stdout))

    def wait_build(self, name: str, sha: str, timeout: float = 60) -> dict[str, Any]:
        """Wait until `sha` has a finished build; return it (the fields of `builds --json`).

        Polled on the state database, read-only: a poll through the CLI is a Python start
        (~0.5 s of CPU) every round, which starves the daemon under test on a small machine.
        `builds()` and the tests of the `builds` command still go through the CLI.
        """

        def done() -> dict[str, Any] | None:
            for b in self.build_rows(name):
                if b["sha"] == sha and b["status"] in ("succeeded", "failed"):
                    return b
            return None

        return dict(wait_until(done, timeout=timeout))

    def build_rows(self, name: str) -> list[dict[str, Any]]:
        """What `builds(name)` shows, newest first, read from the state database: for polls."""
        sql = f"SELECT {BUILD_FIELDS} FROM builds WHERE component = ? ORDER BY id DESC LIMIT 50"
        return db_rows(self.state_dir, sql, name)


@pytest.fixture
def daemon_factory(tmp_path: Path) -> Iterator[Callable[..., Daemon]]:
    """daemon_factory(components=[{"name": "hello"}], **daemon_keys) → a Daemon, not started."""
    made: list[Daemon] = []

    def make(
        components: list[dict[str, Any]] | None = None, extra_toml: str = "", **daemon_extra: Any
    ) -> Daemon:
        root = tmp_path / f"deployd{len(made)}"
        root.mkdir()
        d = Daemon(
            root=root,
            port=free_port(),
            components=components if components is not None else [{"name": "hello"}],
            daemon_extra=daemon_extra,
            extra_toml=extra_toml,
        )
        made.append(d)
        return d

    yield make
    for d in made:
        if d.proc is not None and d.proc.poll() is None:
            d.proc.kill()
            d.proc.wait(10)


@pytest.fixture
def daemon(daemon_factory: Callable[..., Daemon]) -> Daemon:
    """A started daemon hosting one component, `hello`."""
    return daemon_factory().start()


class SharedDaemons:
    """A test module's daemons, for its tests that leave a daemon's process and config alone.

    A daemon start (and stop) is ~2 s of a test that then takes a few more: the tests of a
    module that neither stop, restart or kill the daemon nor change its config share one
    (per set of daemon keys and environment), started at first use and stopped after the
    module. Each test still passes alone and in any order: it stops the flows it started at
    its end (`shared_daemon`), its flows have names of their own, and a component it pushes
    to is one of its own (`component(name=...)`); a shared component (one registered from
    the same files at v1) is never pushed to — asking for one that was is an error.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.daemons: dict[str, Daemon] = {}
        self.made = 0
        # (daemon root, component) → its working clone, its files (as JSON), its v1 sha
        self.components: dict[tuple[Path, str], tuple[Work, str, str]] = {}

    def daemon(self, env: dict[str, str] | None = None, **daemon_extra: Any) -> Daemon:
        """The module's daemon with these keys and extra environment, started at first use."""
        key = json.dumps([env or {}, daemon_extra], sort_keys=True)
        d = self.daemons.get(key)
        if d is not None and d.proc is not None and d.proc.poll() is None:
            return d
        # none yet, or it died (a test before failed badly): a fresh one, not a broken one
        root = self.root / f"deployd{self.made}"
        self.made += 1
        (root / "home").mkdir(parents=True)
        d = Daemon(root=root, port=free_port(), components=[], daemon_extra=daemon_extra)
        # its own HOME and git identity, whichever test started it (as _isolated_env does)
        d.env.update({"HOME": str(root / "home"), **GIT_ENV, **(env or {})})
        self.daemons[key] = d.start()
        return d

    def component(self, d: Daemon, name: str, files: dict[str, Any]) -> Work:
        """Component `name` of `d` at v1, built from `files`: registered (a config reload)
        and pushed at first use, the same clone after."""
        shown = json.dumps(files, sort_keys=True)
        known = self.components.get((d.root, name))
        if known is not None:
            work, had, sha = known
            assert had == shown, f"shared component {name} has other files: name yours apart"
            assert d.recent_sha(name) == sha, (
                f"shared component {name} was pushed to by another test: a test that pushes "
                "takes a component of its own"
            )
            return work
        path = d.root / "work" / name
        path.mkdir(parents=True)
        git("init", "-q", "-b", "main", cwd=path)
        work = Work(path)
        work.commit("initial", files)
        d.components.append({"name": name})
        d.write_config()
        assert d.proc is not None
        d.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: any(c["name"] == name for c in d.status()["components"]), timeout=30)
        sha = work.push(d.hosted(name))
        d.wait_recent(name, sha, timeout=60)
        self.components[(d.root, name)] = (work, shown, sha)
        return work

    def stop_flows(self) -> None:
        """Stop every flow not stopped on the module's running daemons (a test's end)."""
        for d in self.daemons.values():
            if d.proc is None or d.proc.poll() is not None:
                continue
            token = (d.state_dir / "api-token").read_text().strip()
            for flow in d.status()["flows"]:
                if flow["state"] == "stopped":
                    continue
                resp = HTTP.post(
                    f"{d.url}/api/v1/flows/{flow['name']}/stop",
                    headers={"Authorization": f"Bearer {token}"},
                    timeout=60,
                )
                assert resp.status_code == 200, (flow["name"], resp.status_code, resp.text)

    def close(self) -> None:
        for d in self.daemons.values():  # as daemon_factory leaves a daemon still running
            if d.proc is not None and d.proc.poll() is None:
                d.proc.kill()
                d.proc.wait(10)


@pytest.fixture(scope="module")
def shared_daemons(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SharedDaemons]:
    """The test module's SharedDaemons; stopped after its last test."""
    shared = SharedDaemons(tmp_path_factory.mktemp("shared"))
    yield shared
    shared.close()


@pytest.fixture
def shared_daemon(shared_daemons: SharedDaemons) -> Iterator[SharedDaemons]:
    """The test module's SharedDaemons, for one test: the flows it started are stopped at its
    end, so the next test finds the daemon as idle as a fresh one."""
    yield shared_daemons
    shared_daemons.stop_flows()


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("DEPLOYD_CONFIG", raising=False)
    for key, value in GIT_ENV.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir(exist_ok=True)


def have(program: str) -> bool:
    return shutil.which(program) is not None


def db_rows(state_dir: Path, sql: str, *params: Any) -> list[dict[str, Any]]:
    """Rows of a read-only query on a daemon's state database (for assertions only)."""
    import sqlite3

    conn = sqlite3.connect(f"file:{state_dir / 'deployd.db'}?mode=ro", uri=True)
    try:
        cur = conn.execute(sql, params)
        cols = [c[0] for c in cur.description or ()]
        return [dict(zip(cols, row, strict=True)) for row in cur.fetchall()]
    finally:
        conn.close()


def dead_letter_rows(state_dir: Path, flow: str) -> list[dict[str, Any]]:
    """A flow's dead letters, oldest first, their JSON columns decoded (read-only)."""
    import json

    rows = db_rows(state_dir, "SELECT * FROM dead_letters WHERE flow = ? ORDER BY id", flow)
    for row in rows:
        for column in ("body", "headers", "emitted"):
            row[column] = json.loads(row[column])
    return rows


# --------------------------------------------------------------------------- RabbitMQ

BROKER_FIXTURES = {"broker", "amqp_url", "broker_factory"}


def under_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def require_broker() -> None:
    """Skip the calling test when no RabbitMQ can be had here; under CI=true, fail it."""
    reason = broker_unavailable()
    if reason is None:
        return
    if under_ci():
        pytest.fail(f"CI=true and no RabbitMQ: {reason}", pytrace=False)
    pytest.skip(reason)


def pytest_configure(config: pytest.Config) -> None:
    """Compile deployd to bytecode once, before any daemon or CLI process starts.

    Where PYTHONDONTWRITEBYTECODE is set (the sandbox the suite was timed in sets it; so does
    the step processes' clean environment), no import writes `__pycache__`, so every `deployd
    serve`, CLI call and fork server compiled the whole package from source: ~0.5 s of CPU per
    process start, thousands of starts per run. compileall writes the files whatever that
    variable says; an import then reads them (and recompiles a module whose source is newer).
    """
    if hasattr(config, "workerinput"):
        return  # an xdist worker: the controller has done it
    import compileall

    import deployd

    compileall.compile_dir(Path(deployd.__file__).parent, quiet=2)


DURATIONS = Path(__file__).with_name("durations.txt")


def file_durations(path: Path = DURATIONS) -> dict[str, float]:
    """tests/durations.txt: seconds per test file ("SECONDS PATH" lines; scripts/file-durations
    writes it from a run's report)."""
    if not path.is_file():
        return {}
    durations: dict[str, float] = {}
    for line in path.read_text().splitlines():
        fields = line.split()
        if len(fields) == 2 and not line.lstrip().startswith("#"):
            durations[fields[1]] = float(fields[0])
    return durations


def longest_files_first(items: list[pytest.Item], durations: dict[str, float]) -> None:
    """Order the files longest first, a file's tests kept together and in their order.

    `make test`'s xdist workers take a whole file at a time, in this order (with
    `--no-loadscope-reorder`; by default xdist orders files by their number of tests, which
    left the long end-to-end files, with few tests each, for last): a long file handed out
    last kept one worker busy long after the other had run out. A file not in the list
    (new) goes first, in collection order: a short one costs nothing there."""
    if not durations:
        return
    files: dict[str, int] = {}
    for item in items:
        files.setdefault(item.nodeid.split("::", 1)[0], len(files))

    def key(item: pytest.Item) -> tuple[float, int]:
        file = item.nodeid.split("::", 1)[0]
        return (-durations.get(file, float("inf")), files[file])

    items.sort(key=key)  # stable: the tests of a file stay in their order


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # A test using a broker fixture is a `rabbitmq` test: `-m "not rabbitmq"` leaves it out.
    for item in items:
        if BROKER_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.rabbitmq)
    if hasattr(config, "workerinput"):  # an xdist worker (a run in one process: as collected)
        longest_files_first(items, file_durations())


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("rabbitmq") is not None:
        require_broker()


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    """One private RabbitMQ for the whole session (tests/broker.py); closed at the end.

    Don't stop, kill or restart it (a restart recovers every pooled vhost: slow); a test
    that does takes its own from `broker_factory`."""
    require_broker()
    vhosts = int(os.environ.get(VHOSTS_ENV) or DEFAULT_VHOSTS)
    b = start_broker(tmp_path_factory.mktemp("rabbitmq"), vhosts=vhosts)
    yield b
    b.close()


@pytest.fixture
def amqp_url(broker: Broker) -> str:
    """amqp://…/tNNN: a vhost of the session broker no other test has had."""
    return broker.vhost_url()


@pytest.fixture
def broker_factory(tmp_path: Path) -> Iterator[Callable[..., Broker]]:
    """broker_factory(vhosts=2) → a started private Broker, closed after the test: for tests
    that stop, kill or restart a broker."""
    require_broker()
    made: list[Broker] = []

    def make(vhosts: int = 2) -> Broker:
        b = start_broker(tmp_path / f"rabbitmq{len(made)}", vhosts=vhosts)
        made.append(b)
        return b

    yield make
    for b in made:
        b.close()
