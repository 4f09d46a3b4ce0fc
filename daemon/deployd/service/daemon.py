"""The daemon's lifecycle: start-up order, signals, reload, stop — on one event loop.

Start-up order is crash-only: take the state dir's lock, open (and migrate) the database,
finish whatever a killed daemon left mid-way, then start the parts and reconcile every
component's branch head with what was built. Signal handlers only record; the main
coroutine acts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
from collections.abc import Callable
from typing import Protocol

from .. import config as cfgmod
from ..config import Config
from ..errors import ConfigError
from ..notify import watchdog_pinger
from ..paths import Paths
from ..store import FlowStore, QueueStore, Store
from .host import bind, state_lock
from .logs import config_secrets, set_redactions
from .parts import Parts, assemble

log = logging.getLogger("deployd")
RESTART_KEYS = ("listen", "max_parallel_builds", "state_dir", "timezone")  # bound at start


class HttpServer(Protocol):
    """What the daemon needs of its HTTP server (uvicorn on the daemon's loop, `api/app.py`)."""

    ready: asyncio.Event
    should_exit: bool

    async def serve_forever(self) -> None: ...


class Service(Protocol):
    """A part with a lifetime: started after the HTTP server binds, stopped in reverse."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


# The HTTP layer sits above the service: whoever starts the daemon (the CLI's `serve`) passes
# the factory in, so the service never imports the web framework.
HttpFactory = Callable[[Parts, socket.socket], HttpServer]


class Daemon:
    """Everything `serve` runs, owned by one event loop."""

    def __init__(self, config: Config, http: HttpFactory) -> None:
        self.config = config
        self.http = http
        self.paths = Paths(config.state_dir)
        self.parts: Parts | None = None
        self.ready = asyncio.Event()
        self._reload_requested = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    def status_line(self) -> str:
        """One line for systemd's STATUS= (`systemctl status deployd`)."""
        parts = self.parts
        if parts is None:
            return f"{len(self.config.components)} component(s)"
        out = [
            f"{parts.deployer.running_count()} flow(s) running",
            f"{len(self.config.components)} component(s)",
            f"build queue {parts.pipeline.queue_depth}",
        ]
        last = parts.store.last_build()
        if last:
            out.append(f"last build {last['component']} {last['sha'][:8]} {last['status']}")
        dep = FlowStore(parts.store).last_deployment()
        if dep:
            out.append(f"last deploy {dep['flow']} v{dep['to_version']} {dep['status']}")
        out.append(f"{QueueStore(parts.store).message_count()} message(s) queued")
        return ", ".join(out)

    # -- start-up --------------------------------------------------------------------------

    def _recover(self, store: Store) -> None:
        """Finish what a killed daemon left mid-way, before any source runs."""
        interrupted = store.interrupt_unfinished_builds()
        if interrupted:
            log.info("marked %d interrupted build(s) for retry", len(interrupted))
        shutil.rmtree(self.paths.builds, ignore_errors=True)
        self.paths.builds.mkdir(parents=True, exist_ok=True)
        # Artifact folders renamed into place whose registration never committed.
        known = store.artifact_dirs()
        if self.paths.versions.is_dir():
            for comp_dir in self.paths.versions.iterdir():
                for ver_dir in comp_dir.iterdir() if comp_dir.is_dir() else ():
                    if str(ver_dir) not in known:
                        shutil.rmtree(ver_dir, ignore_errors=True)

    # -- reload (SIGHUP) -------------------------------------------------------------------

    async def reload(self) -> bool:
        """Re-read and re-validate the config file; apply it, or keep the old one and say why.

        Added components get their hosted repository (and hook) or their watch, and are
        reconciled; removed ones stop being watched (their versions stay in the state);
        secrets apply at once, because webhook routes read the config per request. Each part
        gets the new config through its own `reload`; running flows are not restarted. Keys
        bound at start (state_dir, listen, max_parallel_builds) need a restart: they keep
        their old value, with a warning.
        """
        parts = self.parts
        assert parts is not None
        old = self.config
        if old.path is None:
            log.error("reload: the daemon was not started from a config file; nothing to reload")
            return False
        parts.notifier.reloading()
        try:
            new = cfgmod.load(old.path, secrets=True)
        except ConfigError as exc:
            log.error(
                "reload rejected, the old config keeps running: %s",
                " ".join([str(exc), *exc.problems]),
            )
            parts.store.event("config.rejected", f"reload of {old.path} rejected: {exc}")
            parts.notifier.ready(self.status_line())
            return False
        changed = [k for k in RESTART_KEYS if getattr(new.daemon, k) != getattr(old.daemon, k)]
        if changed:
            log.warning("reload: %s change(s) need a restart; kept as before", ", ".join(changed))
            keep = {k: getattr(old.daemon, k) for k in RESTART_KEYS}
            new = new.model_copy(update={"daemon": new.daemon.model_copy(update=keep)})
        self.config = parts.config = new
        parts.pipeline.config = new
        set_redactions(config_secrets(new))
        added, removed, moved = parts.repos.reload(new)
        for name, apply in (
            ("flows", parts.deployer.reload),
            ("operator", parts.operator.reload),
            ("poller", parts.poller.reload),
        ):
            try:
                await apply(new)
            except Exception:
                log.exception("reload: %s failed to apply the new config", name)
        queued = parts.repos.reconcile()
        summary = (
            f"config reloaded from {new.path}: {len(added)} added, {len(removed)} removed, "
            f"{len(moved)} moved, {queued} queued"
        )
        parts.store.event(
            "config.reloaded",
            summary,
            detail={"added": added, "removed": removed, "moved": moved},
        )
        log.info("%s", summary)
        parts.notifier.ready(self.status_line())
        return True

    async def _reload_loop(self, parts: Parts) -> None:
        # The SIGHUP handler only sets the event; reloads run here, one at a time.
        while True:
            await self._reload_requested.wait()
            self._reload_requested.clear()
            try:
                await self.reload()
            except Exception:
                log.exception("reload failed; the old config keeps running")
                parts.notifier.ready(self.status_line())

    async def _status_loop(self, parts: Parts, every: float = 5.0) -> None:
        last = ""
        while True:
            await asyncio.sleep(every)
            line = self.status_line()
            if line != last:
                parts.notifier.status(line)
                last = line

    async def run(self, sock: socket.socket | None = None) -> None:
        loop = asyncio.get_running_loop()
        with state_lock(self.paths):
            # Only the pid, so that `kill -HUP $(cat deployd.pid)` works.
            self.paths.pidfile.write_text(f"{os.getpid()}\n")
            store = Store.open(self.paths.db)
            try:
                self._recover(store)
                self.parts = assemble(self.config, store, self.paths, loop)
                await self._run(loop, self.parts, sock)
            finally:
                store.close()

    async def _run(
        self, loop: asyncio.AbstractEventLoop, parts: Parts, sock: socket.socket | None
    ) -> None:
        # Started in this order, stopped in the reverse one (the pipeline first of all).
        # The outbox first: it only sends what the others record, and it is stopped last.
        services: list[Service] = [parts.outbox, parts.deployer, parts.operator, parts.poller]
        self._tasks.append(loop.create_task(parts.lag.run(), name="loop-lag"))
        self._tasks.append(loop.create_task(watchdog_pinger(parts.notifier), name="watchdog"))
        parts.repos.setup()
        parts.watcher.add("inbox", [(self.paths.inbox, False)], parts.inbox.drain)
        parts.watcher.start()
        for sig in (signal.SIGTERM, signal.SIGINT):
            # Unix signals 15 (`kill`, systemd stop) and 2 (Ctrl+C): only record; run() acts.
            loop.add_signal_handler(sig, parts.stopping.set)
        # Unix signal 1 (`systemctl reload`, `kill -HUP`): re-read the config.
        loop.add_signal_handler(signal.SIGHUP, self._reload_requested.set)

        server = self.http(parts, sock or bind(self.config.daemon.listen))
        server_task = loop.create_task(server.serve_forever(), name="http")
        try:
            for svc in services:
                await svc.start()
            parts.inbox.drain()
            queued = parts.repos.reconcile()
            await server.ready.wait()
            self.ready.set()
            set_redactions(config_secrets(self.config))  # now including a generated token
            # READY=1 only now: HTTP is bound, sources run and the services (flows) are up.
            parts.notifier.ready(self.status_line())
            self._tasks.append(loop.create_task(self._reload_loop(parts), name="reload"))
            self._tasks.append(loop.create_task(self._status_loop(parts), name="status"))
            log.info(
                "deployd ready on %s (state %s, %d component(s), %d queued at start)",
                self.config.daemon.listen,
                self.paths.root,
                len(self.config.components),
                queued,
            )
            stop_wait = loop.create_task(parts.stopping.wait())
            await asyncio.wait({stop_wait, server_task}, return_when=asyncio.FIRST_COMPLETED)
            stop_wait.cancel()
        finally:
            log.info("deployd stopping")
            # The whole stop fits in stop_timeout; a part that hangs is abandoned (crash-only:
            # the next start finishes what it left), so systemd never has to SIGKILL us.
            deadline = loop.time() + self.config.daemon.stop_timeout
            parts.stopping.set()  # also when the HTTP server died: webhooks get 503 from here on
            parts.notifier.stopping()
            loop.remove_signal_handler(signal.SIGHUP)
            parts.watcher.stop()
            await parts.pipeline.stop(grace=min(5.0, self.config.daemon.stop_timeout / 2))
            for svc in reversed(services):
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
            parts.notifier.close()
        log.info("deployd stopped")
