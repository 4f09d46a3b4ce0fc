"""watchdog glue: file-system events become calls on the event loop, and nothing more.

The observer thread only hands events to the loop with `call_soon_threadsafe`. Used for the
hook inbox and for the refs of local bare repositories (a push that no hook reports is still
noticed within a second).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from pathlib import Path

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver, ObservedWatch

log = logging.getLogger("deployd.watch")
DEBOUNCE = 0.03


class _Handler(FileSystemEventHandler):
    def __init__(self, fire: Callable[[str], None], accept: Callable[[str], bool]) -> None:
        self._fire = fire
        self._accept = accept

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type in ("opened", "closed_no_write"):
            return
        path = event.dest_path if getattr(event, "dest_path", "") else event.src_path
        path = path.decode() if isinstance(path, bytes) else path
        if self._accept(path):
            self._fire(path)


class Watcher:
    """Owns one watchdog observer; `add` watches a folder and calls back on the loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.observer: BaseObserver = Observer()
        self._watches: dict[str, list[ObservedWatch]] = {}
        self._scheduled: set[str] = set()

    def start(self) -> None:
        self.observer.daemon = True
        self.observer.start()

    def stop(self) -> None:
        self.observer.stop()
        self.observer.join(timeout=5)

    def add(
        self,
        key: str,
        folders: list[tuple[Path, bool]],
        callback: Callable[[], object],
        accept: Callable[[str], bool] = lambda _p: True,
    ) -> None:
        """Watch `folders` ((path, recursive) pairs); call `callback()` on the loop, debounced."""

        def run() -> None:
            self._scheduled.discard(key)
            try:
                callback()
            except Exception:
                log.exception("watch callback %s failed", key)

        def schedule() -> None:
            if key not in self._scheduled:
                self._scheduled.add(key)
                self.loop.call_later(DEBOUNCE, run)

        def fire(_path: str) -> None:
            self.loop.call_soon_threadsafe(schedule)

        handler = _Handler(fire, accept)
        watches = []
        for folder, recursive in folders:
            folder.mkdir(parents=True, exist_ok=True)
            watches.append(self.observer.schedule(handler, str(folder), recursive=recursive))
        self._watches.setdefault(key, []).extend(watches)

    def remove(self, key: str) -> None:
        for watch in self._watches.pop(key, []):
            with contextlib.suppress(KeyError):
                self.observer.unschedule(watch)


def is_ref_change(path: str) -> bool:
    """Events in a bare repository that can mean a branch moved."""
    if path.endswith(".lock"):
        return False
    return "/refs/heads" in path or path.endswith("/packed-refs")
