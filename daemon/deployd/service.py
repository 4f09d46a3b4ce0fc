"""`deployd serve`: wires sources, pipeline, deployer, runtime and HTTP onto one event loop.

Start-up order is crash-only: take the state dir's lock, open (and migrate) the database,
finish whatever a killed daemon left mid-way, then start the sources and reconcile every
component's branch head with what was built. Signal handlers only record; the main
coroutine acts.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import json
import logging
import os
import shutil
import signal
import socket
import sys
from collections.abc import Iterable, Iterator
from typing import Any

from . import config as cfgmod
from .auth import ensure_token
from .config import ComponentConfig, Config, local_path, split_listen
from .errors import ConfigError, DeploydError, StateError
from .flows.deploy import Deployer
from .health import LagMonitor
from .metrics import Metrics
from .notify import Notifier, watchdog_pinger
from .ops import Operator
from .paths import Paths
from .pipeline import git as gitops
from .pipeline.mirror import MirrorResolver
from .pipeline.queue import Pipeline
from .sources.inbox import Inbox
from .sources.poll import Poller
from .sources.watch import Watcher, is_ref_change
from .sources.webhook import WebhookIntake
from .store import Store
from .types import PushNotice

log = logging.getLogger("deployd")

# Secret values (webhook secrets, the API token) that must never reach a log line.
_redactions: list[str] = []


def set_redactions(values: Iterable[str | None]) -> None:
    """Replace the set of strings masked as ``***`` in every log line (longest first)."""
    found: set[str] = set()
    for value in values:
        if value and len(value) >= 4:
            found.add(value)
            found.add(json.dumps(value)[1:-1])  # as it appears inside a JSON-quoted msg
    _redactions[:] = sorted(found, key=len, reverse=True)


def config_secrets(config: Config) -> list[str]:
    """Every secret value `config` holds or points at (files read now; unreadable skipped)."""
    out: list[str | None] = []
    if config.daemon.api_token is not None:
        out.append(config.daemon.api_token.get_secret_value())
    with contextlib.suppress(OSError):
        out.append(Paths(config.state_dir).token_file.read_text().strip())
    for comp in config.components:
        with contextlib.suppress(OSError):
            out.append(comp.secret())
    return [s for s in out if s]


def _redact(line: str) -> str:
    for secret in _redactions:
        if secret in line:
            line = line.replace(secret, "***")
    return line


class _KeyValueFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        line = f"level={record.levelname.lower()} logger={record.name} msg={json.dumps(msg)}"
        if record.exc_info:
            line += " exc=" + json.dumps(self.formatException(record.exc_info))
        return _redact(line)


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {"level": record.levelname.lower(), "logger": record.name, "msg": record.getMessage()}
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return _redact(json.dumps(out))


def setup_logging(fmt: str, debug: bool = False) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JsonFormatter() if fmt == "json" else _KeyValueFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    for noisy in ("uvicorn.access", "apscheduler", "watchdog", "git"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


@contextlib.contextmanager
def state_lock(paths: Paths) -> Iterator[None]:
    """Hold the state dir's lock for the daemon's lifetime (one daemon per state dir)."""
    try:
        for folder in paths.dirs():
            folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(paths.lockfile, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        raise StateError(
            f"state_dir {paths.root} is not usable: {exc.strerror} "
            "(check daemon.state_dir and the permissions of its folder)"
        ) from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as exc:
        os.close(fd)
        pid = "?"
        with contextlib.suppress(Exception):
            pid = str(json.loads(paths.pidfile.read_text())["pid"])
        raise StateError(
            f"another deployd (pid {pid}) is already running on state_dir {paths.root}"
        ) from exc
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            paths.pidfile.unlink()
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def bind(listen: str) -> socket.socket:
    host, port = split_listen(listen)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY on accepted sockets only when their proto
    # says TCP; without it every keep-alive response waits ~40 ms for a delayed ACK (Nagle).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise StateError(
            f"cannot listen on {listen}: {exc.strerror} (change daemon.listen or stop what "
            "uses that port)"
        ) from exc
    sock.listen(2048)
    sock.setblocking(False)
    return sock


class Daemon:
    """Everything `serve` runs, owned by one event loop."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.paths = Paths(config.state_dir)
        self.store: Store
        self.pipeline: Pipeline
        self.watcher: Watcher
        self.inbox: Inbox
        self.stopping = asyncio.Event()
        self.ready = asyncio.Event()
        self.deployer: Deployer
        self.operator: Operator
        self.api_token = ""
        self.poller: Poller | None = None
        self.services: list[Any] = []  # later parts: objects with async start()/stop()
        # systemd: READY/RELOADING/STOPPING/STATUS and the watchdog (no-ops outside systemd).
        self.notifier = Notifier.from_env()
        self.metrics = Metrics()
        self.lag = LagMonitor()
        self._reload_requested = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def accepting_webhooks(self) -> bool:
        """False once a stop began: webhook routes answer 503 so the sender retries later."""
        return not self.stopping.is_set()

    def _setup_remote_sources(self) -> None:
        """Webhook commits and remote urls: the resolver fetches mirrors (waiting for a pushed
        commit to show up) before each build; the poller is the safety net under webhooks."""
        self.pipeline.resolver = MirrorResolver(self.pipeline, self.store, self.paths)
        self.poller = Poller(self.config, self.store, self.pipeline, self.notify)
        self.poller.metrics = self.metrics
        self.services.append(self.poller)

    def status_line(self) -> str:
        """One line for systemd's STATUS= (`systemctl status deployd`); later parts extend it."""
        parts = [f"{len(self.config.components)} component(s)"]
        pipeline = getattr(self, "pipeline", None)
        if pipeline is not None:
            parts.append(f"build queue {pipeline.queue_depth}")
        store = getattr(self, "store", None)
        if store is not None:
            last = store.one("SELECT component, sha, status FROM builds ORDER BY id DESC LIMIT 1")
            if last:
                parts.append(f"last build {last['component']} {last['sha'][:8]} {last['status']}")
        deployer = getattr(self, "deployer", None)
        if deployer is not None:
            parts.insert(0, f"{len(deployer.runners)} flow(s) running")
            if store is not None:
                dep = store.one(
                    "SELECT flow, to_version, status FROM deployments ORDER BY id DESC LIMIT 1"
                )
                if dep:
                    parts.append(f"last deploy {dep['flow']} v{dep['to_version']} {dep['status']}")
                depth = store.one("SELECT COUNT(*) AS n FROM messages")
                parts.append(f"{depth['n'] if depth else 0} message(s) queued")
        return ", ".join(parts)

    # -- start-up --------------------------------------------------------------------------

    def _recover(self) -> None:
        """Finish what a killed daemon left mid-way, before any source runs."""
        interrupted = self.store.interrupt_unfinished_builds()
        if interrupted:
            log.info("marked %d interrupted build(s) for retry", len(interrupted))
        shutil.rmtree(self.paths.builds, ignore_errors=True)
        self.paths.builds.mkdir(parents=True, exist_ok=True)
        # Artifact folders renamed into place whose registration never committed.
        known = self.store.artifact_dirs()
        if self.paths.versions.is_dir():
            for comp_dir in self.paths.versions.iterdir():
                for ver_dir in comp_dir.iterdir() if comp_dir.is_dir() else ():
                    if str(ver_dir) not in known:
                        shutil.rmtree(ver_dir, ignore_errors=True)

    def _setup_component_sources(self, components: Iterable[ComponentConfig] | None = None) -> None:
        for comp in self.config.components if components is None else components:
            try:
                self._setup_source(comp)
            except (DeploydError, OSError) as exc:  # one broken component stops no other
                log.error("component %s: its repository cannot be used: %s", comp.name, exc)
                self.store.event(
                    "push.failed",
                    f"{comp.name}: its repository cannot be used: {exc}",
                    component=comp.name,
                )

    def _setup_source(self, comp: ComponentConfig) -> None:
        if comp.hosted:
            created = gitops.ensure_hosted(
                self.paths.hosted_repo(comp.name), comp.branch, comp.name, self.paths.inbox
            )
            if created:
                self.store.event(
                    "repo.created",
                    f"hosted repository for {comp.name} created at "
                    f"{self.paths.hosted_repo(comp.name)}",
                    component=comp.name,
                )
        elif comp.local and comp.watch and comp.url is not None:
            repo = local_path(comp.url)
            self.watcher.add(
                f"repo:{comp.name}",
                [(repo / "refs" / "heads", True), (repo, False)],
                functools.partial(self.notify, PushNotice(comp.name, None, None, "watch")),
                accept=is_ref_change,
            )

    def reconcile(self) -> int:
        """Queue every component whose branch head has no build yet (pushes while stopped)."""
        queued = 0
        for comp in self.config.components:
            if comp.name in self.pipeline.paused:
                continue
            repo = self.pipeline.repo_path(comp)
            if not comp.local:
                # Remote components are reconciled by their first poll.
                continue
            try:
                head = gitops.head(repo, comp.branch)
            except Exception as exc:
                log.warning("cannot read %s: %s", repo, exc)
                continue
            if (
                head
                and not self.store.has_final_build(comp.name, head)
                and self.pipeline.notify(PushNotice(comp.name, None, head, "reconcile"))
            ):
                queued += 1
        return queued

    def notify(self, notice: PushNotice) -> bool:
        return self.pipeline.notify(notice)

    # -- reload (SIGHUP) -------------------------------------------------------------------

    async def reload(self) -> bool:
        """Re-read and re-validate the config file; apply it, or keep the old one and say why.

        Added components get their hosted repository (and hook) or their watch, and are
        reconciled; removed ones stop being watched (their versions stay in the state);
        secrets apply at once, because webhook routes read `daemon.config` per request.
        Services with an async `reload(config)` (flows, poller) are told; running flows are
        not restarted. Keys bound at start (state_dir, listen, max_parallel_builds) need a
        restart: they keep their old value, with a warning.
        """
        old = self.config
        if old.path is None:
            log.error("reload: the daemon was not started from a config file; nothing to reload")
            return False
        self.notifier.reloading()
        try:
            new = cfgmod.load(old.path)
        except ConfigError as exc:
            log.error(
                "reload rejected, the old config keeps running: %s",
                " ".join([str(exc), *exc.problems]),
            )
            self.store.event("config.rejected", f"reload of {old.path} rejected: {exc}")
            self.notifier.ready(self.status_line())
            return False
        fixed = {"state_dir", "listen", "max_parallel_builds"}
        changed = [k for k in sorted(fixed) if getattr(new.daemon, k) != getattr(old.daemon, k)]
        if changed:
            log.warning("reload: %s change(s) need a restart; kept as before", ", ".join(changed))
            keep = {k: getattr(old.daemon, k) for k in fixed}
            new = new.model_copy(update={"daemon": new.daemon.model_copy(update=keep)})
        before = {c.name: c for c in old.components}
        after = {c.name: c for c in new.components}
        removed = [n for n in before if n not in after]
        moved = [n for n in after if n in before and _source_of(after[n]) != _source_of(before[n])]
        added = [n for n in after if n not in before]
        for name in removed + moved:
            self.watcher.remove(f"repo:{name}")
        self.config = new
        self.pipeline.config = new
        set_redactions(config_secrets(new))
        self._setup_component_sources([after[n] for n in added + moved])
        for svc in self.services:
            hook = getattr(svc, "reload", None)
            if hook is not None:
                try:
                    await hook(new)
                except Exception:
                    log.exception("reload: %s failed to apply the new config", svc)
        queued = self.reconcile()
        summary = (
            f"config reloaded from {new.path}: {len(added)} added, {len(removed)} removed, "
            f"{len(moved)} moved, {queued} queued"
        )
        self.store.event(
            "config.reloaded",
            summary,
            detail={"added": added, "removed": removed, "moved": moved},
        )
        log.info("%s", summary)
        self.notifier.ready(self.status_line())
        return True

    async def _reload_loop(self) -> None:
        # The SIGHUP handler only sets the event; reloads run here, one at a time.
        while True:
            await self._reload_requested.wait()
            self._reload_requested.clear()
            try:
                await self.reload()
            except Exception:
                log.exception("reload failed; the old config keeps running")
                self.notifier.ready(self.status_line())

    async def _status_loop(self, every: float = 5.0) -> None:
        last = ""
        while True:
            await asyncio.sleep(every)
            line = self.status_line()
            if line != last:
                self.notifier.status(line)
                last = line

    async def run(self, sock: socket.socket | None = None) -> None:
        loop = asyncio.get_running_loop()
        with state_lock(self.paths):
            self.paths.pidfile.write_text(
                json.dumps({"pid": os.getpid(), "listen": self.config.daemon.listen})
            )
            self.store = Store.open(self.paths.db)
            try:
                await self._run(loop, sock)
            finally:
                self.store.close()

    async def _run(self, loop: asyncio.AbstractEventLoop, sock: socket.socket | None) -> None:
        self._recover()
        self.pipeline = Pipeline(self.config, self.store, self.paths)
        self.api_token = ensure_token(self.config)
        self.deployer = Deployer(self.config, self.store, self.paths)
        self.pipeline.listeners.append(self.deployer.on_version_registered)
        self.deployer.metrics = self.deployer.router.metrics = self.metrics
        self.services.insert(0, self.deployer)
        self.operator = Operator(self)
        self.services.insert(1, self.operator)
        self._setup_remote_sources()
        self.pipeline.metrics = self.metrics
        self.metrics.track_build_queue(lambda: self.pipeline.queue_depth)
        self.metrics.track_loop_lag(self.lag.current)
        self._tasks.append(loop.create_task(self.lag.run(), name="loop-lag"))
        self._tasks.append(loop.create_task(watchdog_pinger(self.notifier), name="watchdog"))
        self.watcher = Watcher(loop)
        self.inbox = Inbox(self.paths.inbox, self.notify)
        self._setup_component_sources()
        self.watcher.add("inbox", [(self.paths.inbox, False)], self.inbox.drain)
        self.watcher.start()
        for sig in (signal.SIGTERM, signal.SIGINT):
            # Unix signals 15 (`kill`, systemd stop) and 2 (Ctrl+C): only record; run() acts.
            loop.add_signal_handler(sig, self.stopping.set)
        # Unix signal 1 (`systemctl reload`, `kill -HUP`): re-read the config.
        loop.add_signal_handler(signal.SIGHUP, self._reload_requested.set)

        # TODO(layers): api is above service; the service wiring will hand these parts up to
        # whoever starts HTTP instead of importing deployd.api here.
        from .api.app import ApiParts, Server, create_app

        def accepting() -> bool:
            return self.accepting_webhooks

        intake = WebhookIntake(
            lambda: self.config, self.store, self.notify, self.metrics, accepting
        )
        parts = ApiParts(
            config=lambda: self.config,
            token=lambda: self.api_token,
            accepting=accepting,
            store=self.store,
            paths=self.paths,
            lag=self.lag,
            metrics=self.metrics,
            deployer=self.deployer,
            operator=self.operator,
            poller=self.poller,
            intake=intake,
        )
        sock = sock or bind(self.config.daemon.listen)
        server = Server(create_app(parts), sock)
        server_task = loop.create_task(server.serve_forever(), name="http")
        try:
            for svc in self.services:
                await svc.start()
            self.inbox.drain()
            queued = self.reconcile()
            await server.ready.wait()
            self.ready.set()
            set_redactions(config_secrets(self.config))  # now including a generated token
            # READY=1 only now: HTTP is bound, sources run and the services (flows) are up.
            self.notifier.ready(self.status_line())
            self._tasks.append(loop.create_task(self._reload_loop(), name="reload"))
            self._tasks.append(loop.create_task(self._status_loop(), name="status"))
            log.info(
                "deployd ready on %s (state %s, %d component(s), %d queued at start)",
                self.config.daemon.listen,
                self.paths.root,
                len(self.config.components),
                queued,
            )
            stop_wait = loop.create_task(self.stopping.wait())
            await asyncio.wait({stop_wait, server_task}, return_when=asyncio.FIRST_COMPLETED)
            stop_wait.cancel()
        finally:
            log.info("deployd stopping")
            # The whole stop fits in stop_timeout; a part that hangs is abandoned (crash-only:
            # the next start finishes what it left), so systemd never has to SIGKILL us.
            deadline = loop.time() + self.config.daemon.stop_timeout
            self.stopping.set()  # also when the HTTP server died: webhooks get 503 from here on
            self.notifier.stopping()
            loop.remove_signal_handler(signal.SIGHUP)
            self.watcher.stop()
            await self.pipeline.stop(grace=min(5.0, self.config.daemon.stop_timeout / 2))
            for svc in reversed(self.services):
                try:
                    await asyncio.wait_for(svc.stop(), max(0.5, deadline - loop.time() - 1.5))
                except TimeoutError:
                    log.error("%s did not stop within stop_timeout; abandoned", svc)
                except Exception:
                    log.exception("error while stopping %s", svc)
            server.should_exit = True
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(server_task, max(0.5, min(5, deadline - loop.time())))
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
            for task in self._tasks:
                task.cancel()
            for task in self._tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            self.notifier.close()
        log.info("deployd stopped")


def serve(config: Config, debug: bool = False) -> None:
    """Run the daemon in the foreground until SIGTERM/SIGINT."""
    setup_logging(config.daemon.log_format, debug)
    set_redactions(config_secrets(config))
    daemon = Daemon(config)
    asyncio.run(daemon.run())


def _source_of(comp: ComponentConfig) -> tuple[str | None, str, bool]:
    """What decides how a component is watched; a change re-creates its watch."""
    return (comp.url, comp.branch, comp.watch)
