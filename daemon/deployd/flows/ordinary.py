"""Ordinary (scheduled) flows as people change them: apply, pause and resume the schedule.

No draft and no publish: `flow apply` stores a flow version with the file's steps (resolved
as a run would resolve them, so a flow no version can run is refused) and (re)schedules it;
`flow stop`/`start` pause and resume its schedule. The runs themselves are `runs.py`'s.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from ..config import Config
from ..errors import FlowError, UnknownFlow
from ..runtime.base import NO_RUNS
from ..store import FlowStore, Row, Store
from .drafts import Drafts
from .model import FlowSpec
from .runs import Runs


class Ordinary:
    """The operations on ordinary flows behind `flow apply`, `flow start` and `flow stop`."""

    def __init__(
        self,
        config: Config,
        store: Store,
        drafts: Drafts,
        runs: Runs,
        lock: Callable[[str], asyncio.Lock],
    ) -> None:
        self.config = config
        self.store = store
        self.fs = FlowStore(store)
        self.drafts = drafts
        self.runs = runs
        self.lock = lock  # the flow's lock, shared with the publisher

    async def apply(self, spec: FlowSpec, draft_only: bool) -> dict[str, Any]:
        """`flow apply` of an ordinary flow: create or update it, no draft and no publish
        (every run resolves its versions itself); scheduled unless it is stopped."""
        name = spec.name
        if draft_only:
            raise FlowError(
                f"flow {name} is an ordinary (scheduled) flow: it has no drafts, each run takes "
                "the newest valid component versions; apply it without --draft"
            )
        if (spec.runtime or self.config.runtime.default) == "rabbitmq":
            raise FlowError(NO_RUNS.format(flow=name))
        async with self.lock(name):
            existing = self.fs.flow(name)
            same_type(name, existing, spec.type)
            steps = [s.model_dump() for s in self.drafts.resolve(spec)]
            resolved, attention, problems = await self.runs.resolve(steps)
            if problems:
                raise FlowError(
                    f"flow {name} is not valid, nothing was changed: " + "; ".join(problems)
                )
            spec_json = spec.model_dump(mode="json")
            with self.store.tx():
                if existing is None:
                    self.fs.create_flow(name, spec.type, spec.update)
                    self.fs.set_flow(name, enabled=1)
                version = self.fs.add_flow_version(
                    name, spec_json, [s.model_dump() for s in resolved], "flow apply"
                )
                self.fs.set_flow(
                    name, active_version=version, update=spec.update, needs_attention=attention
                )
                self.store.event(
                    "flow.applied",
                    f"ordinary flow {name} v{version} applied"
                    + (f": needs attention: {attention}" if attention else ""),
                    flow=name,
                )
            enabled = bool((self.fs.flow(name) or {}).get("enabled"))
            next_run = self.runs.scheduled(name, spec_json) if enabled else None
        return {
            "flow": name,
            "type": "ordinary",
            "version": version,
            "status": "scheduled" if enabled else "stopped",
            "next_run_at": next_run,
            "needs_attention": attention,
        }

    async def resume(self, name: str) -> dict[str, Any]:
        """`flow start` of an ordinary flow: its schedule goes on (from now)."""
        async with self.lock(name):
            flow = self._known(name)
            fv = self.fs.flow_version(name, flow["active_version"] or 0)
            if fv is None:
                raise FlowError(f"flow {name} has no version (`deployd flow apply FILE`)")
            with self.store.tx():
                self.fs.set_flow(name, enabled=1)
                self.store.event("flow.started", f"flow {name}: schedule resumed", flow=name)
            next_run = self.runs.scheduled(name, fv["spec"])
        return {
            "flow": name,
            "state": "scheduled",
            "version": flow["active_version"],
            "next_run_at": next_run,
        }

    async def pause(self, name: str) -> dict[str, Any]:
        """`flow stop` of an ordinary flow: no more runs on its schedule; a run going
        finishes (`flow run` still runs it)."""
        async with self.lock(name):
            self.runs.paused(name)
            with self.store.tx():
                self.fs.set_flow(name, enabled=0)
                self.store.event("flow.stopped", f"flow {name}: schedule paused", flow=name)
        return {"flow": name, "state": "stopped", "run_going": self.runs.running(name)}

    def _known(self, name: str) -> Row:
        flow = self.fs.flow(name)
        if flow is None:
            raise UnknownFlow(name)
        return flow


def same_type(name: str, existing: Row | None, type_: str) -> None:
    """A flow keeps its type: a real-time flow and a scheduled one are different things."""
    if existing is not None and existing["type"] != type_:
        raise FlowError(
            f"flow {name} exists as a {existing['type']} flow; a flow's type cannot change "
            f"(to {type_}): give the {type_} flow another name"
        )
