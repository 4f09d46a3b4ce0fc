"""`deployd hook feedback`: what the post-receive hook prints after it recorded a push.

It reads the daemon's state read-only (no HTTP, so no address, token or `--config` is
needed: the hook knows only the inbox folder, whose parent is the state dir) and prints the
lines the daemon noted for the push (`store/pushes.py`) until the push is finished, the
daemon stops, or `wait` seconds pass. A bounded poll (every 100 ms) of one indexed query;
SIGALRM is a backstop should a read ever hang. It never fails: every way out exits 0.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from ..paths import Paths

POLL = 0.1  # seconds between two reads of the push's lines
ALIVE_EVERY = 1.0  # seconds between two checks that the daemon still runs
NOT_RUNNING = "deployd is not running; this push will be deployed when it starts"


class _Deadline(Exception):
    """SIGALRM: the wait is over, whatever was under way."""


def follow(
    inbox: Path,
    push_id: str,
    wait: float,
    out: TextIO = sys.stdout,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], Any] = time.sleep,
) -> None:
    """Print what the daemon does with push `push_id` for at most `wait` seconds."""
    if wait <= 0 or "/" in push_id or not push_id.startswith("push."):
        return

    def say(text: str) -> None:
        for line in text.splitlines():
            out.write(f"deployd: {line}\n")
        out.flush()

    def on_alarm(_signum: int, _frame: object) -> None:
        raise _Deadline

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(max(1, int(wait) + 5))
    try:
        _follow(Paths(inbox.parent), inbox / push_id, push_id, wait, say, clock, sleep)
    except (_Deadline, KeyboardInterrupt):
        pass  # Ctrl-C or the backstop: the push is recorded; stop following quietly
    except BrokenPipeError:
        # The pusher went away; nothing more can be shown (and Python must not complain).
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, out.fileno())
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _follow(
    paths: Paths,
    record: Path,
    push_id: str,
    wait: float,
    say: Callable[[str], None],
    clock: Callable[[], float],
    sleep: Callable[[float], Any],
) -> None:
    import sqlite3

    from ..status import daemon_state
    from ..store import Store
    from ..store.pushes import PushStore

    if not daemon_state(paths)[0]:
        say(NOT_RUNNING)
        return
    start = clock()
    deadline = start + wait
    checked = start
    store: Store | None = None
    after = 0
    try:
        while True:
            if store is None:
                store = _open(paths)
            if store is not None:
                pushes = PushStore(store)
                try:
                    # The row first: once it says finished, every line was written before.
                    row = pushes.push(push_id)
                    lines = pushes.lines(push_id, after)
                except sqlite3.Error:  # busy for longer than its timeout: read again
                    lines, row = [], None
                for line in lines:
                    say(line["text"])
                    after = line["id"]
                if row is not None and row["finished_at"] is not None:
                    return
            now = clock()
            if now >= deadline:
                say(
                    f"deployd has not picked this push up within {wait:g} s; it is kept in"
                    f" {record.parent} and deployed when deployd reads it"
                    if record.exists()
                    else f"still under way after {wait:g} s; stopped following (the deploy goes"
                    " on: `deployd status` shows how it ends)"
                )
                return
            if now - checked >= ALIVE_EVERY:
                checked = now
                if not daemon_state(paths)[0]:
                    say(
                        NOT_RUNNING
                        if record.exists()
                        else "deployd stopped before it finished with this push; what is left"
                        " is done when it starts again"
                    )
                    return
            sleep(min(POLL, max(0.0, deadline - now)))
    finally:
        if store is not None:
            store.close()


def _open(paths: Paths) -> Any:
    """The state database, read-only; None while it cannot be read (not created yet, or an
    older daemon's without the push tables)."""
    import sqlite3

    from ..errors import StateError
    from ..store import Store

    try:
        store = Store.readonly(paths.db)
    except StateError:
        return None
    try:
        if store is not None and "push_lines" not in store.table_names():
            store.close()
            return None
    except sqlite3.Error:
        return None
    return store
