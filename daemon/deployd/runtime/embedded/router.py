"""The router: commits what a step produced and moves messages along the flow's queues.

Each call or message is committed in one transaction: its output messages (through the
next step's mapper) go into the next step's durable queue, the step's snapshot is saved,
and the message that was handled leaves its queue. A step process that dies before it says
"done" commits nothing, so its message is delivered again and nothing is lost or doubled.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from typing import Any

from ...errors import FlowError
from ...metrics import Metrics
from ...store import FlowStore, Store
from ...types import RunStep
from .. import mapper
from .process import Result

log = logging.getLogger("deployd.router")
REBOUND_LIMIT = 10


class Router:
    """Commits results; wakes the consumer of a queue when a message arrives in it."""

    def __init__(self, store: Store, metrics: Metrics) -> None:
        self.store = store
        self.flows = FlowStore(store)
        self._wake: dict[tuple[str, str], asyncio.Event] = defaultdict(asyncio.Event)
        self.metrics = metrics
        # Step snapshots as last committed: the router is their only writer, so a call or
        # message need not read (and decode) the snapshot from the database each time.
        self._snapshots: dict[tuple[str, str], dict[str, Any]] = {}

    def snapshot(self, flow: str, step: str) -> dict[str, Any]:
        key = (flow, step)
        if key not in self._snapshots:
            self._snapshots[key] = self.flows.snapshot(flow, step)
        return self._snapshots[key]

    def waker(self, flow: str, step: str) -> asyncio.Event:
        return self._wake[(flow, step)]

    def commit(
        self,
        flow: str,
        steps: tuple[RunStep, ...],
        index: int,
        res: Result,
        row: dict[str, Any] | None = None,
    ) -> None:
        step = steps[index]
        nxt = steps[index + 1] if index + 1 < len(steps) else None
        woke = False
        if row is None and not res.outputs and res.snapshot is None and not res.errors:
            # A trigger call that produced nothing: there is nothing to make durable, and an
            # idle flow should not write to the database several times a second.
            self.metrics.message_processed(flow, step.id)
            return
        saved: dict[str, Any] | None = None
        with self.store.tx():
            if row is not None and res.rebound is not None and not res.outputs:
                attempts = self.flows.defer_message(row["id"], min(60.0, 2.0 ** row["attempts"]))
                if attempts < REBOUND_LIMIT:
                    return
                res.errors.append(f"gave up after {attempts} rebounds: {res.rebound}")
            mapping_errors = 0
            for body, headers in res.outputs:
                if nxt is None:
                    continue
                if nxt.mapping:
                    try:
                        body = mapper.apply(nxt.mapping, body)
                    except FlowError as exc:
                        mapping_errors += 1
                        self.flows.count(flow, f"{nxt.id}:mapper", failed=1, error=str(exc))
                        continue
                self.flows.enqueue(flow, nxt.id, body, headers)
                woke = True
            if res.snapshot is not None:
                self.flows.save_snapshot(flow, step.id, res.snapshot)
                saved = res.snapshot
            if row is not None:
                self.flows.delete_message(row["id"])
            error = res.errors[-1] if res.errors else None
            self.flows.count(flow, step.id, processed=1, failed=1 if error else 0, error=error)
        if saved is not None:  # only once the transaction has committed
            self._snapshots[(flow, step.id)] = saved
        self.metrics.message_processed(flow, step.id)
        if error:
            self.metrics.message_failed(flow, step.id)
            log.warning("flow %s step %s: %s", flow, step.id, error[:500])
        if mapping_errors:
            log.warning("flow %s: %d message(s) failed their mapping", flow, mapping_errors)
        if woke and nxt is not None:
            self._wake[(flow, nxt.id)].set()
