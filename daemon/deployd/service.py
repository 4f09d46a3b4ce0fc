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
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .config import Config, local_path, split_listen
from .errors import StateError
from .paths import Paths
from .pipeline import git as gitops
from .pipeline.queue import Pipeline, PushNotice
from .sources.inbox import Inbox
from .sources.watch import Watcher, is_ref_change
from .store import Store

log = logging.getLogger("deployd")


class _KeyValueFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        line = f"level={record.levelname.lower()} logger={record.name} msg={json.dumps(msg)}"
        if record.exc_info:
            line += " exc=" + json.dumps(self.formatException(record.exc_info))
        return line


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {"level": record.levelname.lower(), "logger": record.name, "msg": record.getMessage()}
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out)


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
    sock = socket.socket(family, socket.SOCK_STREAM)
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
        self.services: list[Any] = []  # later parts: objects with async start()/stop()

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

    def _setup_component_sources(self) -> None:
        for comp in self.config.components:
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
        if notice.component in self.pipeline.paused:
            return False
        return self.pipeline.notify(notice)

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
        self.watcher = Watcher(loop)
        self.inbox = Inbox(self.paths.inbox, self.notify)
        self._setup_component_sources()
        self.watcher.add("inbox", [(self.paths.inbox, False)], self.inbox.drain)
        self.watcher.start()
        for sig in (signal.SIGTERM, signal.SIGINT):
            # Unix signals 15 (`kill`, systemd stop) and 2 (Ctrl+C): only record; run() acts.
            loop.add_signal_handler(sig, self.stopping.set)

        from .api import Server, create_app

        sock = sock or bind(self.config.daemon.listen)
        server = Server(create_app(self), sock)
        server_task = loop.create_task(server.serve_forever(), name="http")
        try:
            for svc in self.services:
                await svc.start()
            self.inbox.drain()
            queued = self.reconcile()
            await server.ready.wait()
            self.ready.set()
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
            self.watcher.stop()
            await self.pipeline.stop(grace=min(5.0, self.config.daemon.stop_timeout / 2))
            for svc in reversed(self.services):
                try:
                    await svc.stop()
                except Exception:
                    log.exception("error while stopping %s", svc)
            server.should_exit = True
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(server_task, 5)
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
        log.info("deployd stopped")


def serve(config: Config, debug: bool = False) -> None:
    """Run the daemon in the foreground until SIGTERM/SIGINT."""
    setup_logging(config.daemon.log_format, debug)
    daemon = Daemon(config)
    asyncio.run(daemon.run())


def inbox_path(state_dir: Path) -> Path:
    return Paths(state_dir).inbox
