"""The runtime interface: everything the deployer needs from what runs a flow's steps.

A runtime starts a flow version's step processes and reports when all are warm (or which one
failed, with its log), switches a flow from a running version to a warmed one at a trigger
call boundary and reports the gap, stops a version after its in-flight work, streams
unexpected step exits (for the rollback watcher) and reports per-step state and queue depth.
How it does that — processes, queues, the switch choreography — is its own business: the
deployer imports this module only, and `runtime.factory` picks the implementation from
config. `tests/runtime/test_contract.py` runs one suite of behaviour tests against every
implementation (the embedded runtime today; RabbitMQ next).

    warm_up(flow version) ──▶ FlowRun (every step ready, none handling work yet)
        ├── run(new)            no version was running: start handling work
        └── switch(old, new)    old trigger ends after a call, new one starts (gap_ms);
                                old actions finish their message; new ones take the queues
    FlowRun.next_exit()        unexpected exits while it runs (the runtime restarts them)
    FlowRun.stop()             finish in-flight work, then stop every process
    run_once(run, timeout)     an ordinary flow's run: the trigger called once, every queue
                               drained (or past `timeout`: stopped, the rest dead letters)
    canary(old, new, steps, share)   issue 16: `new`'s changed action `steps` take `share` of
                               their messages beside `old` (which keeps running whole) →
        ├── CanaryRun.promote()   the split ends, then the switch as above (gap_ms)
        └── CanaryRun.rollback()  the split ends, `new` stops, `old` handles what it left
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..config import DaemonConfig
from ..errors import FlowError
from ..types import CanaryTally, FlowVersionToRun, RetryResult, StepExit, StepStatus


class StepFailed(FlowError):
    """A step process did not come up (import error, init error, crash, warm-up timeout)."""

    def __init__(self, step: str, reason: str, log_tail: str = "") -> None:
        self.step = step
        self.reason = reason
        self.log_tail = log_tail  # the end of the step's log, when it explains the failure
        super().__init__(f"step {step}: {reason}")


@dataclass(frozen=True)
class MethodCall:
    """A one-off call of a function's service verb (the platform's `getMetaModel`, a select
    model method) or of a component's `verifyCredentials`: which code, which method, and the
    cfg it gets (secrets expanded)."""

    component: str
    version: int
    function: str
    kind: str  # "trigger" | "action" (ELASTICIO_ACTION_OR_TRIGGER); "credentials": verify
    method: str  # the module's method: getMetaModel, or a field's "model"
    artifact_dir: str
    main: str
    runtime: str  # "python" | "node"
    cfg: dict[str, Any] = field(default_factory=dict, repr=False)
    # The credential merged into `cfg` (its emit('updateKeys') is stored for it); None: none.
    credential: str | None = None


VERIFY = "verifyCredentials"  # the method (and `kind` "credentials") of a credential check


class MethodFailed(FlowError):
    """A service verb could not answer: it threw (its first line), it did not answer within
    the timeout, or its module did not load. `timed_out` tells the last case apart."""

    def __init__(self, message: str, timed_out: bool = False, detail: str = "") -> None:
        self.timed_out = timed_out
        self.detail = detail  # the stack or traceback, or the log tail
        super().__init__(message)


@dataclass(frozen=True)
class RunOutcome:
    """How a run of an ordinary flow went (`Runtime.run_once`).

    `errors`: what the trigger's `process()` threw (failed messages of the actions are dead
    letters, which the caller reads from the state database). `timed_out`: the run passed its
    timeout; its steps are stopped then and `lettered` queued messages became dead letters.
    """

    errors: tuple[str, ...] = ()
    timed_out: bool = False
    lettered: int = 0


class RunNotSupported(FlowError):
    """This runtime cannot run ordinary (scheduled) flows."""


NO_RUNS = (
    "flow {flow}: ordinary (scheduled) flows are not supported on the rabbitmq runtime yet; "
    'run it on the embedded runtime (runtime = "embedded" in the flow file)'
)


class InputClosed(FlowError):
    """An HTTP-fed flow takes no request now: it is not running (stopped, failed, starting)."""


class InputFull(FlowError):
    """An HTTP-fed flow's first queue is at its `max_queue` (backpressure): retry later."""

    def __init__(self, message: str, retry_after: int = 1) -> None:
        self.retry_after = retry_after
        super().__init__(message)


@dataclass
class Accepted:
    """A request of an HTTP-fed flow, committed to its first action's queue as `msg_id`.

    `reply` (sync flows): resolves with the first `httpReply` a step of the flow emits while
    handling the message or what it led to; `forget()` once the answer is sent or given up
    (a step's later reply is then dropped)."""

    msg_id: str
    reply: asyncio.Future[Any] | None = None
    forget: Callable[[], None] = lambda: None


class CanaryRun(Protocol):
    """A canary in progress (`Runtime.canary`): two versions of a flow's changed action steps
    consuming the same input, each message handled by exactly one of them."""

    @property
    def steps(self) -> tuple[str, ...]:
        """The changed action steps whose messages are split."""
        ...

    def tally(self) -> CanaryTally:
        """Messages and errors of each version on those steps since the canary started."""
        ...

    async def promote(self) -> float | None:
        """End the split and switch the flow to the new version (as `Runtime.switch`: the
        trigger at a call boundary, what the new version's share left is handled by it); the
        trigger gap in ms (None: not measured)."""
        ...

    async def rollback(self, *, failing: bool = False) -> None:
        """End the split and stop the new version after its in-flight messages; what its
        share left queued goes back to the old version, which ran all along. `failing`: the
        new version crash-loops (its steps are not restarted meanwhile)."""
        ...


class FlowRun(Protocol):
    """One version of one flow, warmed up by a runtime."""

    @property
    def spec(self) -> FlowVersionToRun:
        """The flow version this runs."""
        ...

    @property
    def last_error(self) -> str | None:
        """Why a step last exited or failed to restart (None: no trouble seen)."""
        ...

    def last_error_log(self) -> str:
        """The end of the log of the step that last exited ("" when none did)."""
        ...

    def status(self) -> list[StepStatus]:
        """Every real step, mapper steps included, in flow order."""
        ...

    async def next_exit(self) -> StepExit | None:
        """Wait for the next unexpected step exit; None once this run is stopping."""
        ...

    async def trigger_hook(self, name: str, data: Any = None) -> Any:
        """Run the trigger's `startup()` or `shutdown(data)`; what it returned."""
        ...

    async def stop(self) -> None:
        """Let current work finish (within the drain timeout), then stop every process."""
        ...


class Runtime(Protocol):
    """Runs flow versions; one per daemon, shared by all flows."""

    name: str

    async def start(self) -> None:
        """Bring up what every flow shares (sockets, fork server, pools, connections)."""
        ...

    async def resumed(self) -> None:
        """Every enabled flow was started again after a daemon start (the crash-only
        convergence): a runtime that owns things outside this machine (Kubernetes objects)
        reconciles them now, not at its next periodic look."""
        ...

    def shutting_down(self) -> None:
        """The daemon stops (not a person's `flow stop`): runs stopped from now on are stopped
        for the daemon only, so what runs outside this machine (pods on Kubernetes) keeps
        running and handling messages, and the next start adopts it."""
        ...

    async def close(self) -> None:
        """Stop what `start` brought up (flows are stopped by the deployer first); versions
        replaced by a switch get `stop_timeout` to finish their work before that."""
        ...

    def reload(self, settings: DaemonConfig) -> None:
        """Apply new daemon settings to the next warm-up (running steps keep theirs)."""
        ...

    async def warm_up(self, spec: FlowVersionToRun, timeout: float) -> FlowRun:
        """Start every step of `spec` and wait until all are ready; none handles work yet.

        Raises `StepFailed` (the new processes are already stopped then).
        """
        ...

    async def run(self, new: FlowRun) -> None:
        """Start handling work with a warmed run when no other version of its flow runs."""
        ...

    async def switch(
        self, old: FlowRun, new: FlowRun, *, old_failing: bool = False
    ) -> float | None:
        """Hand the flow from `old` to `new` with nothing lost; the trigger gap in ms.

        `old_failing`: `old` crash-loops (a rollback); do not restart its steps meanwhile.
        None when no gap could be measured (the new trigger made no call in time). `old` is
        stopped in the background.
        """
        ...

    async def accept(
        self, flow: str, body: str, headers: dict[str, str], reply: bool = False
    ) -> Accepted:
        """A request to HTTP-fed `flow` (its trigger is `builtin = "http"`): `body` (compact
        JSON text of an object) and `headers` become a message committed to the first action's
        queue (through its mapping) of the version that runs, or is being switched to — the
        intake belongs to the flow, not to a version. Durable when this returns. Raises
        `InputClosed` (not running), `InputFull` (backpressure); `reply`: wait for httpReply."""
        ...

    def queue_depths(self) -> dict[tuple[str, str], int]:
        """Messages queued, by (flow, step id), the one being handled included (it leaves its
        queue when its result commits); an empty queue may be missing."""
        ...

    def canary_refusal(self, spec: FlowVersionToRun) -> str | None:
        """Why `spec` cannot be published as a canary here (None: it can). A runtime that
        cannot run two versions of a step on one queue says so, and the publish fails with
        that reason rather than switching at once."""
        ...

    async def canary(
        self, old: FlowRun, new: FlowRun, steps: tuple[str, ...], share: float
    ) -> CanaryRun:
        """Start a canary: `old` runs on (all of it, its trigger included) while `new`'s
        `steps` (changed action steps; `new` warmed up) take about `share` of each one's
        messages — a deterministic split by message count, each message handled once.
        Raises FlowError when this runtime cannot (see `canary_refusal`)."""
        ...

    async def run_once(self, run: FlowRun, timeout: float) -> RunOutcome:
        """One run of an ordinary flow on a warmed `run` (its trigger's startup() already
        called by the caller): the actions take their queues (messages an interrupted run
        left first), the trigger's process() is called once, and it returns once every queue
        of the flow is empty with nothing in flight. Past `timeout` the steps are stopped at
        once and what is still queued becomes dead letters (`timed_out`). Otherwise `run` is
        left running for the caller's shutdown() and `stop()`. Raises `RunNotSupported`."""
        ...

    async def call_method(self, call: MethodCall, timeout: float) -> Any:
        """Start a sandboxed step process of `call`'s version, run its service verb once
        and stop the process; what the method returned. Raises `MethodFailed`."""
        ...

    # Dead letters: a message whose handling failed (an error in process(), a failed mapping
    # for the next step, the rebound limit) leaves its queue and becomes a dead letter in the
    # same commit. Every runtime keeps them in the state database (`store/letters.py`), so
    # listing and discarding them is the same everywhere; putting them back is the runtime's.

    def dead_letter_counts(self) -> dict[tuple[str, str], int]:
        """Dead letters by (flow, step id; "ID:mapper" for failed mappings)."""
        ...

    async def retry_dead_letters(
        self, spec: FlowVersionToRun, step: str | None, ids: list[int] | None
    ) -> RetryResult:
        """Put letters of `spec`'s flow (of `step`; those with `ids`, or all) back at the end of
        their step's input queue, to be handled by the version `spec` (a mapper letter is
        mapped by `spec`'s mapping). A letter that fails again comes back with one attempt
        more. Letters of steps `spec` does not have stay (`skipped`)."""
        ...
