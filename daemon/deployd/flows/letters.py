"""Dead letters as people see them: the listing, one letter whole, and which ones a retry or
discard means.

It only reads, so `deployd flow errors` runs it on the read-only database (it works with the
daemon down) and `GET /api/v1/flows/{name}/errors` on the daemon's own connection. Retrying
and discarding are the deployer's (`Deployer.retry_errors`, `discard_errors`); they first ask
`choose` here, which refuses an unknown flow, step or letter id before anything is changed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..errors import FlowError, UnknownFlow
from ..store import FlowStore, Row, Store
from ..store.letters import DeadLetterStore

MAX_IDS = 1000  # letter ids one retry or discard may name (--all has no limit)
MAPPER = ":mapper"


def first_line(error: str) -> str:
    """The error's first line (the rest is the traceback or stack)."""
    return error.split("\n", 1)[0]


class Letters:
    """Reads the dead letters of flows, checking every name and id it is given."""

    def __init__(self, store: Store) -> None:
        self.fs = FlowStore(store)
        self.dl = DeadLetterStore(store)

    def known_flow(self, name: str) -> Row:
        flow = self.fs.flow(name)
        if flow is None:
            raise UnknownFlow(name)
        return flow

    def steps(self, flow: Row) -> list[str]:
        """The step ids a `--step` may name: every step of the active version (mapper steps
        included) and any step that still has letters (a step a later version removed)."""
        out: list[str] = []
        fv = self.fs.flow_version(flow["name"], flow["active_version"] or 0)
        for s in fv["steps"] if fv else ():
            if s.get("mapping"):
                out.append(s["id"] + MAPPER)
            out.append(s["id"])
        for _flow, step in self.dl.counts(flow["name"]):
            if step not in out:
                out.append(step)
        return out

    def check_step(self, flow: Row, step: str | None) -> None:
        if step is None:
            return
        known = self.steps(flow)
        if step not in known:
            raise FlowError(
                f"unknown step {step!r} in flow {flow['name']} (its steps: "
                + (", ".join(known) or "none")
                + ")"
            )

    def listing(self, name: str, step: str | None = None) -> list[dict[str, Any]]:
        """The letters of flow `name` (of `step`; "ID" also means "ID:mapper"), newest first:
        what `flow errors` lists (the error's first line, no body)."""
        self.check_step(self.known_flow(name), step)
        return [
            {
                "id": r["id"],
                "step": r["step"],
                "created_at": r["created_at"],
                "error": first_line(r["error"]),
                "attempts": r["attempts"],
                "msg_id": r["msg_id"],
                "flow_version": r["flow_version"],
                "component": r["component"],
                "component_version": r["component_version"],
            }
            for r in self.dl.letters(name, step)
        ]

    def one(self, name: str, letter_id: int, step: str | None = None) -> dict[str, Any]:
        """One letter whole: its input (body, headers, passthrough), the versions that failed
        it, the whole error (with the traceback or stack), attempts and what the step emitted
        first."""
        flow = self.known_flow(name)
        self.check_step(flow, step)
        row = self.dl.letter(name, letter_id)
        if row is None or (step is not None and row["step"] not in (step, step + MAPPER)):
            where = f" step {step}" if step is not None else ""
            raise FlowError(
                f"unknown dead letter {letter_id} of flow {name}{where} "
                f"(see `deployd flow errors {name}`)"
            )
        return {
            "id": row["id"],
            "flow": row["flow"],
            "step": row["step"],
            "msg_id": row["msg_id"],
            "created_at": row["created_at"],
            "attempts": row["attempts"],
            "flow_version": row["flow_version"],
            "component": row["component"],
            "component_version": row["component_version"],
            "error": row["error"],
            "body": row["body"],
            "headers": row["headers"],
            "passthrough": row["passthrough"],
            "attachments": row["attachments"],
            "emitted": row["emitted"],
        }

    def choose(self, name: str, step: str | None, ids: Sequence[int] | None) -> list[Row]:
        """The whole letters a retry or discard of flow `name` means, oldest first: those with
        `ids` (all of them must exist, of `step` when given), or every letter (of `step`) when
        `ids` is None. Raises FlowError, changing nothing, for anything unknown."""
        flow = self.known_flow(name)
        self.check_step(flow, step)
        if ids is not None:
            if not ids:
                raise FlowError("no letter ids given: name at least one (--id N), or use --all")
            if len(ids) > MAX_IDS:
                raise FlowError(f"{len(ids)} letter ids given; at most {MAX_IDS}, or use --all")
        rows = self.dl.select(name, step, list(dict.fromkeys(ids)) if ids is not None else None)
        if ids is not None:
            found = {int(r["id"]) for r in rows}
            missing = [i for i in dict.fromkeys(ids) if i not in found]
            if missing:
                where = f" step {step}" if step is not None else ""
                raise FlowError(
                    f"unknown dead letter(s) {', '.join(map(str, missing))} of flow {name}{where}; "
                    f"nothing was changed (see `deployd flow errors {name}`)"
                )
        return rows
