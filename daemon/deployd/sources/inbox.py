"""The hook inbox: push records written by `hooks/post-receive`, turned into push notices.

The hook writes one file per push (renamed into place, so a file is always complete):
a first line ``component NAME`` then ``<old> <new> <ref>`` lines as git gives them. The
daemon reads the folder at start (pushes made while it was stopped) and whenever watchdog
sees a new file, then deletes each file it has handed on.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from ..types import PushNotice

log = logging.getLogger("deployd.inbox")
MAX_RECORD_BYTES = 1024 * 1024


def parse_record(text: str, push_id: str | None = None) -> list[PushNotice]:
    """Parse one inbox file; malformed lines are skipped (and logged), never fatal. The
    notices carry `push_id` (the file's name), which the hook's follower asks about."""
    lines = text.splitlines()
    if not lines or not lines[0].startswith("component "):
        return []
    component = lines[0][len("component ") :].strip()
    notices = []
    for line in lines[1:]:
        parts = line.split(" ", 2)
        if len(parts) != 3:
            log.warning("inbox: malformed line %r skipped", line[:200])
            continue
        _old, new, ref = parts
        notices.append(
            PushNotice(component=component, ref=ref, sha=new, source="hook", push_id=push_id)
        )
    return notices


class Inbox:
    """Reads push records from `path` and hands them to `notify`."""

    def __init__(self, path: Path, notify: Callable[[PushNotice], object]) -> None:
        self.path = path
        self.notify = notify

    def drain(self) -> int:
        """Hand on every complete record in the folder; returns how many notices were sent."""
        count = 0
        try:
            files = sorted(self.path.glob("push.*"))
        except OSError as exc:
            log.error("inbox %s unreadable: %s", self.path, exc)
            return 0
        for file in files:
            try:
                data = file.read_bytes()[:MAX_RECORD_BYTES]
            except FileNotFoundError:
                continue
            except OSError as exc:
                log.error("inbox record %s unreadable: %s", file.name, exc)
                continue
            for notice in parse_record(data.decode("utf-8", "replace"), file.name):
                self.notify(notice)
                count += 1
            file.unlink(missing_ok=True)
        return count
