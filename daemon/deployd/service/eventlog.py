"""The daemon's log says what happened (issue 15): one line per event worth a person's eye.

An event listener of the store (`Store.add_event_listener`): build succeeded or failed (with
the reason), a push ignored (which ref, which branch deploys), a deploy published (with the
gap), needs attention. Failures and rollbacks of a deploy are logged where they happen
(flows/publish.py), so they are not repeated here.
"""

from __future__ import annotations

import json
import logging

from ..store import Row

log = logging.getLogger("deployd.events")

_INFO = {
    "build.started": "build started: %s",
    "version.registered": "build succeeded: %s",
    "push.ignored": "push ignored: %s",
    "deploy.done": "deploy done: %s",
    "deploy.paused": "deploy held: %s",
    "deploy.frozen": "deploy held: %s",
    "deploy.skipped": "deploy skipped: %s",
}
_WARNING = {
    "build.failed": "build failed: %s",
    "push.failed": "push failed: %s",
    "version.quarantined": "version quarantined: %s",
}


def log_event(row: Row) -> None:
    """Log `row` when it is one of the kinds above (called inside the event's transaction)."""
    kind, message = row["kind"], row["message"]
    if kind in _INFO:
        log.info(_INFO[kind], message)
    elif kind in _WARNING:
        log.warning(_WARNING[kind], message)
    elif kind == "draft.created" and row.get("detail"):
        detail = json.loads(row["detail"]) if isinstance(row["detail"], str) else row["detail"]
        if detail.get("problems"):
            log.warning("needs attention: %s", message)
