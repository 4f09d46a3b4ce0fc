"""The router: commits what steps produced and moves messages along the flow's queues.

Every call or message is committed atomically: its output messages (through the next step's
mapper) go into the next step's durable queue, the step's snapshot is saved, and the message
that was handled leaves its queue — or, when its handling failed (an error in `process()`, a
failed mapping of an output for the next step, the rebound limit), becomes a **dead letter**
in that same transaction. A step process that dies before it says "done" commits nothing, so
its message is delivered again and nothing is lost or doubled.

**Group commit.** `commit` only adds a result to the pending batch; the batch is written in
one transaction at the end of the event-loop tick (`call_soon`), so every result that arrived
in one read of every step's socket shares one transaction. Nothing reads a queue before its
batch is written: consumers are woken, snapshots cached and queue depths counted only after
the commit; `flush()` writes at once where order matters (a switch, a snapshot read, stop).

**Passthrough.** Every output carries what each step of the same flow execution emitted so
far, by step id — its input's passthrough with the output itself added under the emitting
step's id (`{"<step>": {"id", "body", "headers", "attachments"?}}`), as the seed platform's
sailor builds it.
It is put together here as JSON text from the texts the sailor sent and the input's stored
column (never decoded, unless a mapping calls `$getPassthrough()`), and bounded by
`daemon.max_passthrough_bytes`: over it, the oldest steps' entries are left out (a warning in
the emitting step's log says which), never the message.

**Attachments** (`{"<name>": {"url", "size", "content-type"}}`) travel with each message as
the JSON text the sailor sent, into the next step's queue and into dead letters; the objects of
deployd's object store an output references are recorded (`object_refs`) for retention.

**Queue depths** are counted here (the router is the queues' only writer while flows run),
so backpressure (`runner.py`) costs no query per message; code that changes queues in other
ways calls `forget_depths`.

**Canary splits** (issue 16). While a canary of a changed action step runs, the outputs
queued for it are split by count: of every message n = 1, 2, … queued for the step since the
canary started, message n goes to the step's canary queue (`<step>:canary`, read by the new
version) exactly when ⌊n·share⌋ > ⌊(n-1)·share⌋ (share as a fraction), else to its own queue
(read by the old version) — deterministic, every 1/share-th message for share 1/k. Each is
mapped with the mapping of the version that will handle it. Both versions' results commit
here as always; the split counts each version's messages and errors (a dead letter, or a
failed mapping into the step). A step's depth includes its canary queue, for backpressure.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import secrets
import time
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from fractions import Fraction
from pathlib import Path
from typing import Any

from ...errors import FlowError
from ...metrics import Metrics
from ...objects import OBJECT_URL
from ...store import FlowStore, Store
from ...store.letters import DeadLetterStore
from ...store.queues import CANARY, QueueBatch, Queued, canary_queue
from ...types import CanaryCount, FlowVersionToRun, RunStep
from .. import mapper
from .process import Output, Result
from .replies import Replies

log = logging.getLogger("deployd.router")
dumps = json.JSONEncoder(separators=(",", ":")).encode
REBOUND_LIMIT = 10
# A rebound is delivered again after REBOUND_DELAY seconds, doubling with each one, at most
# REBOUND_DELAY_MAX.
REBOUND_DELAY = 1.0
REBOUND_DELAY_MAX = 60.0
MAX_EMITTED_KEPT = 100  # outputs of a failed message recorded with its dead letter
MAX_PASSTHROUGH = 1024 * 1024  # bytes of an output's passthrough (daemon.max_passthrough_bytes)
PASSTHROUGH_WARN_EVERY = 60.0  # seconds between two warnings of one step's cut passthrough


@dataclass
class Split:
    """The canary of one action step: which version gets each message queued for it, and
    what each version handled (see the module docstring)."""

    flow: str
    step: str
    old: RunStep  # the step as the old version runs it (its mapping)
    new: RunStep  # and as the new one does
    old_version: int  # flow versions
    new_version: int
    share: Fraction
    # the flow variables a mapping sees (the same in both versions: a canary needs that)
    variables: Mapping[str, str] = field(default_factory=dict, repr=False)
    routing: bool = True  # False once the canary ends: every output goes to the step's queue
    sent: int = 0  # messages queued for the step since the canary started
    counts: dict[bool, list[int]] = field(default_factory=lambda: {True: [0, 0], False: [0, 0]})

    @property
    def queue(self) -> str:
        return canary_queue(self.step)

    def take(self) -> bool:
        """Whether the next message queued for the step is the new version's."""
        n = self.sent = self.sent + 1
        p, q = self.share.numerator, self.share.denominator
        return (n * p) // q > ((n - 1) * p) // q

    def count(self, new: bool, failed: bool) -> None:
        tally = self.counts[new]
        tally[0] += 1
        if failed:
            tally[1] += 1

    def tally(self, new: bool) -> CanaryCount:
        messages, errors = self.counts[new]
        return CanaryCount(messages, errors)


def share_fraction(share: float) -> Fraction:
    """`share` as the fraction the split counts with (0.1 → 1/10, 0.333 → 333/1000)."""
    return Fraction(share).limit_denominator(10_000)


class Router:
    """Commits results in groups; wakes the consumer of a queue when messages arrive in it and
    its producer when the queue shrinks."""

    def __init__(self, store: Store, metrics: Metrics) -> None:
        self.store = store
        self.flows = FlowStore(store)
        self.letters = DeadLetterStore(store)
        self.metrics = metrics
        self._wake: dict[tuple[str, str], asyncio.Event] = defaultdict(asyncio.Event)
        self._room: dict[tuple[str, str], asyncio.Event] = defaultdict(asyncio.Event)
        # Step snapshots as last committed: the router is their only writer, so a call or
        # message need not read (and decode) the snapshot from the database each time.
        self._snapshots: dict[tuple[str, str], dict[str, Any]] = {}
        self._depth: dict[tuple[str, str], int] = {}
        self._batch = QueueBatch()
        self._added: dict[tuple[str, str], int] = defaultdict(int)  # queued by the batch
        self._removed: dict[tuple[str, str], int] = defaultdict(int)  # left by the batch
        self._failed: dict[tuple[str, str], int] = defaultdict(int)
        self._processed: dict[tuple[str, str], int] = defaultdict(int)
        self._errors: list[tuple[str, str, str]] = []
        self._handle: asyncio.Handle | None = None
        self.generation = 0  # bumped when a group commit failed: loops take their queue anew
        # Message ids: unique per daemon start (random prefix) and cheap (a counter).
        self._id_prefix = secrets.token_hex(8)
        self._ids = itertools.count(1)
        # Passthrough: the bound (0: none is carried) and where a step's log is, for the
        # warning when the bound cut one; (flow, step) -> (last warned, cut since then).
        self.max_passthrough = MAX_PASSTHROUGH
        self.log_dir: Path | None = None
        self._cut: dict[tuple[str, str], tuple[float, int]] = {}
        # Sync requests of HTTP-fed flows: the messages made from a request's message answer
        # it (`Replies.inherit` as each output is queued).
        self.replies = Replies()
        self._committed: list[asyncio.Future[None]] = []  # who waits for the pending group
        # Canary splits by (flow, step) (see the module docstring); empty: none runs.
        self.splits: dict[tuple[str, str], Split] = {}

    def _new_id(self) -> str:
        return f"{self._id_prefix}{next(self._ids):012x}"

    # -- reads -----------------------------------------------------------------------------

    def snapshot(self, flow: str, step: str) -> dict[str, Any]:
        key = (flow, step)
        if key in self._batch.snapshots:
            self.flush()
        if key not in self._snapshots:
            self._snapshots[key] = self.flows.snapshot(flow, step)
        return self._snapshots[key]

    def waker(self, flow: str, step: str) -> asyncio.Event:
        """Set when messages were committed into the queue of `step`."""
        return self._wake[(flow, step)]

    def room(self, flow: str, step: str) -> asyncio.Event:
        """Set when messages left the queue of `step` (its producer may be waiting)."""
        return self._room[(flow, step)]

    def depth(self, flow: str, step: str) -> int:
        """Messages in the queue of `step`, the pending group commit included (the one being
        handled counts)."""
        key = (flow, step)
        depth = self._depth.get(key)
        if depth is None:
            depth = self._depth[key] = self.flows.queue_depths(flow).get(key, 0)
        # with what the pending group commit adds and removes
        depth += self._added.get(key, 0) - self._removed.get(key, 0)
        if self.splits and key in self.splits:  # and what waits for the canary
            depth += self.depth(flow, canary_queue(step))
        return depth

    # -- canary splits ---------------------------------------------------------------------

    def split(
        self,
        old: FlowVersionToRun,
        new: FlowVersionToRun,
        step: str,
        share: float,
    ) -> Split:
        """Start splitting the messages queued for `step` of `old`'s flow between `old` and
        `new` (`share` of them for `new`, in its canary queue)."""
        self.flush()  # what is pending was meant for the step's own queue
        by_id_old = {s.id: s for s in old.steps}
        by_id_new = {s.id: s for s in new.steps}
        split = Split(
            old.flow,
            step,
            by_id_old[step],
            by_id_new[step],
            old.version,
            new.version,
            share_fraction(share),
            new.variables,
        )
        self.splits[(old.flow, step)] = split
        return split

    def stop_routing(self, flow: str) -> None:
        """Every output for the split steps of `flow` goes to their own queues from now on
        (the canary ends); results are still told apart until `end_splits`."""
        self.flush()
        for split in self.splits.values():
            if split.flow == flow:
                split.routing = False

    def end_splits(self, flow: str) -> None:
        """Forget `flow`'s splits (their canary queues have been merged back)."""
        self.flush()
        for key in [k for k in self.splits if k[0] == flow]:
            del self.splits[key]

    async def settle(self) -> bool:
        """Every result so far made durable (here: the pending group written now)."""
        self.flush()
        return True

    def forget_snapshots(self, flow: str) -> None:
        """Snapshots of `flow` were written by another runtime's router (a flow moved): read
        them from the database again."""
        for key in [k for k in self._snapshots if k[0] == flow]:
            del self._snapshots[key]

    def forget_depths(self, flow: str) -> None:
        """Queues of `flow` were changed outside the router (moved, retried, requeued)."""
        for key in [k for k in self._depth if k[0] == flow]:
            del self._depth[key]
        for key, event in self._wake.items():
            if key[0] == flow:
                event.set()
        for key, event in self._room.items():
            if key[0] == flow:
                event.set()

    # -- commits ---------------------------------------------------------------------------

    def commit(
        self, spec: FlowVersionToRun, index: int, res: Result, row: Queued | None = None
    ) -> float | None:
        """Add one call's (`row` None) or message's result to the pending group commit.

        Returns when a message that asked to be delivered again later (a rebound) is due,
        else None.
        """
        flow = spec.flow
        step = spec.steps[index]
        key = (flow, step.id)
        if row is None and not res.outputs and res.snapshot is None and not res.errors:
            # A trigger call that produced nothing: there is nothing to make durable, and an
            # idle flow should not write to the database several times a second.
            self.metrics.message_processed(flow, step.id)
            return None
        if self._handle is None:
            self._schedule()
        batch = self._batch
        if row is not None and res.rebound is not None and not res.outputs:
            attempts = row.attempts + 1
            if attempts < REBOUND_LIMIT:
                due = time.time() + min(REBOUND_DELAY_MAX, REBOUND_DELAY * 2.0**row.attempts)
                batch.defer.append((due, row.id))
                return due
            res.errors.append(f"gave up after {attempts} rebounds: {res.rebound}")
        if res.outputs and index + 1 < len(spec.steps):
            self._forward(
                spec,
                index + 1,
                res.outputs,
                row.passthrough if row else "{}",
                res.attachments,
                row.msg_id if row is not None and self.replies else None,
            )
        if res.snapshot is not None:
            batch.snapshots[key] = res.snapshot
        self._processed[key] += 1
        if row is not None:
            batch.delete.append(row.id)
            split = self.splits.get(key) if self.splits else None
            if split is None:
                self._removed[key] += 1
            else:
                new = spec.version == split.new_version
                split.count(new, bool(res.errors))
                self._removed[(flow, split.queue) if new else key] += 1
        if res.errors:
            error = res.errors[-1]
            if row is not None:
                self._dead_letter(spec, index, row, res, error)
            self._failed[key] += 1
            self._errors.append((flow, step.id, error))
        return None

    def _forward(
        self,
        spec: FlowVersionToRun,
        index: int,
        outputs: list[Output],
        passthrough: str = "{}",
        attachments: dict[int, str] | None = None,
        parent: str | None = None,
    ) -> None:
        """Queue `outputs` for step `index`, through its mapping when it has one (a body the
        daemon only forwards stays the sailor's JSON text), each with its passthrough: the
        input's (`passthrough`, JSON text) and the output itself under the emitting step; and
        its attachments (`attachments`, JSON text by output index; the objects they name are
        recorded for retention)."""
        flow, step = spec.flow, spec.steps[index]
        mapping = step.mapping
        enqueue, new_id = self._batch.enqueue.append, self._new_id
        limit = self.max_passthrough
        emitter = spec.steps[index - 1].id
        split = self.splits.get((flow, step.id)) if self.splits else None
        # `{…earlier steps…, "<emitter>": ` — what every output's passthrough starts with
        head = ("{" if passthrough == "{}" else passthrough[:-1] + ",") + dumps(emitter) + ":"
        queued = 0
        for i, (body, headers) in enumerate(outputs):
            files = attachments.get(i, "{}") if attachments else "{}"
            msg_id = new_id()
            if parent is not None:
                self.replies.inherit(parent, msg_id)
            text = body if isinstance(body, str) else dumps(body)
            headers_text = dumps(headers) if headers else "{}"
            pt = "{}"
            if limit:
                extra = "" if files == "{}" else f',"attachments":{files}'
                pt = f'{head}{{"id":"{msg_id}","body":{text},"headers":{headers_text}{extra}}}}}'
                if len(pt) > limit >> 2 and len(pt.encode()) > limit:
                    pt = self._cut_passthrough(flow, emitter, step.id, pt, limit)
            if files != "{}":
                self._refer(flow, files)
            if split is not None:  # a canary: this message's version maps and handles it
                self._forward_split(split, msg_id, body, text, headers, headers_text, pt, files)
                continue
            if mapping:
                try:
                    text = dumps(mapper.apply(mapping, _decoded(body), pt, spec.variables))
                except FlowError as exc:
                    self._mapping_failed(spec, index, msg_id, text, headers, pt, str(exc), files)
                    continue
            enqueue((flow, step.id, msg_id, text, headers_text, 0, pt, files))
            queued += 1
        if queued:
            self._added[(flow, step.id)] += queued

    def _forward_split(
        self,
        split: Split,
        msg_id: str,
        body: dict[str, Any] | str,
        text: str,
        headers: dict[str, Any],
        headers_text: str,
        passthrough: str,
        files: str,
    ) -> None:
        """Queue one output for a split step: into the canary queue when it is the new
        version's turn, else the step's own, mapped by that version's mapping."""
        new = split.routing and split.take()
        step = split.new if new else split.old
        version = split.new_version if new else split.old_version
        flow = split.flow
        if step.mapping:
            try:
                text = dumps(
                    mapper.apply(step.mapping, _decoded(body), passthrough, split.variables)
                )
            except FlowError as exc:
                self._letter_mapping(
                    flow, step, version, msg_id, text, headers, passthrough, str(exc), files
                )
                if split.routing:
                    split.count(new, True)
                return
        queue = split.queue if new else split.step
        self._batch.enqueue.append((flow, queue, msg_id, text, headers_text, 0, passthrough, files))
        self._added[(flow, queue)] += 1

    def accept(self, spec: FlowVersionToRun, body: str, headers: dict[str, Any]) -> str:
        """A request of an HTTP-fed flow as the output of its trigger (`spec.steps[0]`, the
        builtin): into the pending group, for the first action (through its mapping); the
        message's id. `committed()` says when it is durable."""
        queued, letters = len(self._batch.enqueue), len(self._batch.letters)
        self.commit(spec, 0, Result(outputs=[(body, headers)]))
        if len(self._batch.enqueue) > queued:
            return self._batch.enqueue[queued][2]
        return self._batch.letters[letters][2]  # its mapping failed: a dead letter

    def committed(self) -> asyncio.Future[None]:
        """Resolves once the pending group is written (its exception: the write failed)."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._committed.append(fut)
        self._schedule()
        return fut

    def _refer(self, flow: str, files: str) -> None:
        """Record the objects of deployd's object store that `files` (an output's attachments,
        JSON text) name, so retention keeps them (`object_refs`)."""
        now = time.time()
        self._batch.refs.extend((oid, flow, now) for oid in OBJECT_URL.findall(files))

    def _cut_passthrough(self, flow: str, emitter: str, target: str, text: str, limit: int) -> str:
        """`text` (a passthrough) is over `limit` bytes: the oldest steps' entries are left out
        until it fits, and the emitting step's log says so (once a minute at most)."""
        entries: dict[str, Any] = json.loads(text)
        sizes = {k: len(dumps({k: v}).encode()) - 1 for k, v in entries.items()}  # "k":v,
        total = 1 + sum(sizes.values())
        left_out = []
        for key in list(entries):
            if total <= limit:
                break
            total -= sizes[key]
            del entries[key]
            left_out.append(key)
        self._warn_cut(flow, emitter, target, len(text.encode()), limit, left_out)
        return dumps(entries)

    def _warn_cut(
        self, flow: str, emitter: str, target: str, size: int, limit: int, left_out: list[str]
    ) -> None:
        key = (flow, emitter)
        now = time.monotonic()
        last, count = self._cut.get(key, (-PASSTHROUGH_WARN_EVERY, 0))
        if now - last < PASSTHROUGH_WARN_EVERY:
            self._cut[key] = (last, count + 1)
            return
        self._cut[key] = (now, 0)
        steps = ", ".join(left_out)
        if emitter in left_out:
            steps += " (this step's own output too: it alone is over the bound)"
        text = (
            f"the passthrough of an output for step {target} is {size} bytes, over "
            f"daemon.max_passthrough_bytes ({limit}): the entries of step(s) {steps} were left "
            "out, oldest first; the message itself is delivered. Raise "
            "daemon.max_passthrough_bytes or emit smaller messages"
        )
        if count:
            text += f" ({count} more output(s) cut since the last warning)"
        log.warning("flow %s step %s: %s", flow, emitter, text)
        if self.log_dir is not None:
            path = self.log_dir / flow / f"{emitter}.log"
            stamp = datetime.now(UTC).isoformat(timespec="milliseconds")
            try:
                with path.open("a") as fh:
                    fh.write(f"{stamp} WARNING deployd: {text}\n")
            except OSError as exc:
                log.warning("could not write to the step log %s: %s", path, exc)

    def _dead_letter(
        self, spec: FlowVersionToRun, index: int, row: Queued, res: Result, error: str
    ) -> None:
        step = spec.steps[index]
        emitted: list[dict[str, Any]] = []
        for i, (body, headers) in enumerate(res.outputs[:MAX_EMITTED_KEPT]):
            out: dict[str, Any] = {"body": _decoded(body), "headers": headers}
            if i in res.attachments:
                out["attachments"] = json.loads(res.attachments[i])
            emitted.append(out)
        text = error if not res.detail or res.detail == error else f"{error}\n\n{res.detail}"
        self._batch.letters.append(
            (
                spec.flow,
                step.id,
                row.msg_id,
                row.body,
                row.headers,
                spec.version,
                step.component,
                step.version,
                text,
                row.failures + 1,
                json.dumps(emitted),
                row.passthrough,
                row.attachments,
            )
        )

    def _mapping_failed(
        self,
        spec: FlowVersionToRun,
        index: int,
        msg_id: str,
        body: str,
        headers: dict[str, Any],
        passthrough: str,
        error: str,
        attachments: str = "{}",
    ) -> None:
        """An output failed the mapping of the step it was for: a dead letter of that step's
        mapper, holding the output as it was before the mapping, with its passthrough and
        attachments."""
        self._letter_mapping(
            spec.flow,
            spec.steps[index],
            spec.version,
            msg_id,
            body,
            headers,
            passthrough,
            error,
            attachments,
        )

    def _letter_mapping(
        self,
        flow: str,
        step: RunStep,
        version: int,
        msg_id: str,
        body: str,
        headers: dict[str, Any],
        passthrough: str,
        error: str,
        attachments: str,
    ) -> None:
        mapper_id = f"{step.id}:mapper"
        self._batch.letters.append(
            (
                flow,
                mapper_id,
                msg_id,
                body,
                json.dumps(headers),
                version,
                step.component,
                step.version,
                error,
                1,
                "[]",
                passthrough,
                attachments,
            )
        )
        self._failed[(flow, mapper_id)] += 1
        self._errors.append((flow, mapper_id, error))

    def _schedule(self) -> None:
        if self._handle is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return  # no event loop (a script, a test): the caller flushes
            self._handle = loop.call_soon(self.flush)

    def flush(self) -> None:
        """Write the pending group commit now (one transaction), then wake who waits for it."""
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        batch, self._batch = self._batch, QueueBatch()
        added, self._added = self._added, defaultdict(int)
        removed, self._removed = self._removed, defaultdict(int)
        processed, self._processed = self._processed, defaultdict(int)
        failed, self._failed = self._failed, defaultdict(int)
        errors, self._errors = self._errors, []
        for key in processed.keys() | failed.keys():  # the step counters, a row per step
            batch.stats[key] = [processed.get(key, 0), failed.get(key, 0), None]
        for flow, step, error in errors:
            batch.stats[(flow, step)][2] = error
        waiting, self._committed = self._committed, []
        if not batch:
            _resolve_all(waiting, None)
            return
        try:
            if self.store.conn.in_transaction:  # called inside another write: join it
                self.flows.commit_batch(batch)
            else:
                with self.store.tx():
                    self.flows.commit_batch(batch)
        except Exception as exc:
            _resolve_all(waiting, exc)
            # Nothing of the batch was written: its messages are still queued. The loops that
            # sent them take their queues anew (so each is delivered again).
            self.generation += 1
            log.exception(
                "committing %d result(s) failed; their messages will be delivered again",
                len(batch.delete),
            )
            for key in set(added) | set(removed):
                self._depth.pop(key, None)
                self._wake[key].set()
            return
        _resolve_all(waiting, None)
        self._snapshots.update(batch.snapshots)
        for key, n in added.items():
            if key in self._depth:
                self._depth[key] += n
            self._wake[key].set()
        for key, n in removed.items():
            if key in self._depth:
                self._depth[key] = max(0, self._depth[key] - n)
            self._room[key].set()
            if key[1].endswith(CANARY):  # its producer waits on the step's own queue
                self._room[(key[0], key[1].removesuffix(CANARY))].set()
        for (flow, step), n in processed.items():
            self.metrics.message_processed(flow, step, n)
        for (flow, step), n in failed.items():
            self.metrics.message_failed(flow, step, n)
        for flow, step, error in errors[:5]:
            log.warning("flow %s step %s: %s", flow, step, error.splitlines()[0][:500])
        if len(errors) > 5:
            log.warning(
                "… and %d more failed message(s) (see `deployd flow errors`)", len(errors) - 5
            )


def _resolve_all(waiting: list[asyncio.Future[None]], exc: BaseException | None) -> None:
    for fut in waiting:
        if fut.done():
            continue
        if exc is None:
            fut.set_result(None)
        else:
            fut.set_exception(FlowError(f"the state database write failed: {exc}"))


def _decoded(body: dict[str, Any] | str) -> dict[str, Any]:
    """An output's body as an object (the sailor's JSON text decoded when it was kept so)."""
    if isinstance(body, str):
        value = json.loads(body)
        return value if isinstance(value, dict) else {}
    return body
