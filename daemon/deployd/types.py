"""Frozen data that crosses layers: push notices, registered versions, states.

The enums are `StrEnum`s, so they serialise (JSON, SQLite) to the same strings as before.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


@dataclass(frozen=True)
class PushNotice:
    """ "Something may have changed" for one component; `sha` None means: use the branch head."""

    component: str
    ref: str | None
    sha: str | None
    source: str
    delivery_id: str | None = None
    force: bool = False  # `deployd redeploy`: build again even if the commit already failed
    # The post-receive hook's record (its inbox file's name): what happens to this notice is
    # noted for the hook to print (`store/pushes.py`). None: nobody follows it.
    push_id: str | None = None


@dataclass(frozen=True)
class VersionRegistered:
    """The pipeline registered a new component version (the deployer's cue to redeploy)."""

    component: str
    version: int
    sha: str
    semver: str | None
    push_id: str | None = None  # the hook's push that brought it (see PushNotice)


class BuildState(StrEnum):
    QUEUED = "queued"
    BUILDING = "building"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


class DeploymentState(StrEnum):
    """A publish, crash-only: starting_new → switching → done | failed | rolled_back; a
    canary publish (issue 16): starting_new → canary → promoted | rolled_back."""

    STARTING_NEW = "starting_new"
    SWITCHING = "switching"
    DONE = "done"
    FAILED = "failed"
    ROLLED_BACK = "rolled_back"
    CANARY = "canary"  # the new version handles a share of its changed steps' messages
    PROMOTED = "promoted"  # a canary that ended with the switch to the new version


class FlowState(StrEnum):
    RUNNING = "running"
    PUBLISHING = "publishing"
    FAILED = "failed"
    STOPPED = "stopped"
    SCHEDULED = "scheduled"  # an ordinary flow between runs, its schedule on


class StepState(StrEnum):
    """A step as `status` shows it (mapper steps: running or stopped)."""

    STARTING = "starting"
    READY = "ready"  # warmed up, not yet handling work (before the switch)
    RUNNING = "running"
    RESTARTING = "restarting"
    STOPPING = "stopping"
    STOPPED = "stopped"
    EXITED = "exited"
    FAILED = "failed"


class StepKind(StrEnum):
    TRIGGER = "trigger"
    ACTION = "action"
    MAPPER = "mapper"


# Messages a step process may be handed ahead of the one it handles (the step key `prefetch`).
# Chosen by measurement (docs/benchmarks.md, issue 11): 16 → 5-7k msg/s, 128 → 8-11k,
# 256 → 11-14k through trigger → pass → sink. The in-flight *work* stays bounded whatever the
# value: a step is handed at most what it does in 5 ms at its pace (runner.AHEAD_BUDGET).
DEFAULT_PREFETCH = 256


@dataclass(frozen=True)
class RunStep:
    """One step of a flow version, resolved to the code it runs: what a runtime starts.

    `artifact_dir` is the registered component version's folder, `main` its function's
    module (relative to it), `runtime` the language ("python" | "node").
    """

    id: str
    kind: StepKind
    component: str
    version: int
    function: str
    artifact_dir: str
    main: str
    runtime: str = "python"
    config: Mapping[str, Any] = field(default_factory=dict)
    mapping: str | None = None
    interval: float = 1.0
    prefetch: int = DEFAULT_PREFETCH  # messages a step process may be handed ahead
    max_queue: int | None = None  # its input queue's limit (None: daemon.max_queue)
    # The flow file's `env` of the step, `${VAR}` secrets expanded: never in a repr or a log.
    env: Mapping[str, str] = field(default_factory=dict, repr=False)
    # The [[credentials]] (by name) merged into its cfg at every start of its process.
    credential: str | None = None
    # `validate_input = true`: its function's metadata.in; each message is checked against
    # it before process() (a mismatch is a dead letter). None: messages go in unchecked.
    input_schema: Mapping[str, Any] | None = field(default=None, repr=False)
    # "http": deployd's own trigger, fed by `POST /flows/<flow>/in` (no process); `http` is
    # its {"auth", "secret" (expanded: never in a repr or a log), "reply", "reply_timeout"}.
    builtin: str | None = None
    http: Mapping[str, Any] = field(default_factory=dict, repr=False)
    # On Kubernetes: pods of the step, and cpu/memory as {"request": …, "limit": …} (None:
    # the default); the flow file's `replicas`, `cpu`, `memory`.
    replicas: int = 1
    cpu: Mapping[str, str] | None = None
    memory: Mapping[str, str] | None = None


RUNTIME_NAMES = ("embedded", "rabbitmq")  # what `runtime =` and `flow move --runtime` take


@dataclass(frozen=True)
class FlowVersionToRun:
    """A flow version as the deployer hands it to a runtime."""

    flow: str
    version: int
    steps: tuple[RunStep, ...]
    runtime: str | None = None  # "embedded" | "rabbitmq"; None: [runtime] default
    # The flow file's [variables], `${VAR}` secrets expanded: never in a repr or a log.
    variables: Mapping[str, str] = field(default_factory=dict, repr=False)

    @property
    def trigger(self) -> RunStep:
        return self.steps[0]

    @property
    def actions(self) -> tuple[RunStep, ...]:
        return self.steps[1:]

    @property
    def http_fed(self) -> bool:
        """Whether its trigger is deployd's HTTP intake (`builtin = "http"`)."""
        return self.steps[0].builtin == "http"


@dataclass(frozen=True)
class StepStatus:
    """One real step (mapper steps included) as status reports it."""

    id: str
    kind: StepKind
    component: str | None
    function: str | None
    version: int | None
    state: StepState
    pid: int | None = None
    location: str | None = None  # where it runs, for runtimes that place steps elsewhere
    backpressure: bool = False  # held back: the next step's queue is full
    dead_letters: int = 0

    def as_json(self) -> dict[str, Any]:
        """The shape of a step in `status --json` (no location while it is local)."""
        out: dict[str, Any] = {
            "id": self.id,
            "kind": str(self.kind),
            "component": self.component,
            "function": self.function,
            "version": self.version,
            "state": str(self.state),
            "pid": self.pid,
            "backpressure": self.backpressure,
            "dead_letters": self.dead_letters,
        }
        if self.location is not None:
            out["location"] = self.location
        return out


@dataclass(frozen=True)
class RetryResult:
    """What a retry of dead letters did: re-queued, failed their mapping again (back among
    the dead letters with one attempt more), or left (their step is not in the flow)."""

    retried: int = 0
    failed: int = 0
    skipped: list[int] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return {"retried": self.retried, "failed": self.failed, "skipped": self.skipped}


@dataclass(frozen=True)
class CanaryCount:
    """Messages one version of a canary's changed steps handled since it started, and how
    many of them failed (became dead letters, or failed their mapping into the step)."""

    messages: int = 0
    errors: int = 0

    @property
    def rate(self) -> float:
        return self.errors / self.messages if self.messages else 0.0

    def as_json(self) -> dict[str, Any]:
        return {"messages": self.messages, "errors": self.errors, "error_rate": self.rate}


@dataclass(frozen=True)
class CanaryTally:
    """What a runtime counted of a canary in progress: the new and the old version over every
    changed step (and `steps`: the same by step id), and how many messages wait in the new
    version's share of the queues."""

    new: CanaryCount = CanaryCount()
    old: CanaryCount = CanaryCount()
    queued: int = 0
    steps: Mapping[str, tuple[CanaryCount, CanaryCount]] = field(default_factory=dict)


@dataclass(frozen=True)
class StepExit:
    """A step process of a running flow version ended unexpectedly (the runtime restarts it)."""

    step: str
    at: float  # time.monotonic()
    reason: str


@dataclass(frozen=True)
class DeploymentResult:
    """What a publish, rollback or redeploy did: the API's and CLI's answer."""

    flow: str
    deployment: int
    version: int
    from_version: int | None
    status: DeploymentState
    reason: str | None = None
    warmup_ms: float | None = None
    gap_ms: float | None = None
    # A canary publish: its settings, steps and (once ended) the counts it was judged on.
    canary: Mapping[str, Any] | None = None

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "flow": self.flow,
            "deployment": self.deployment,
            "version": self.version,
            "from_version": self.from_version,
            "status": str(self.status),
        }
        if self.status == DeploymentState.FAILED:
            out["reason"] = self.reason
        elif self.status == DeploymentState.DONE and self.warmup_ms is not None:
            out["warmup_ms"] = self.warmup_ms
            out["gap_ms"] = self.gap_ms
        elif self.status == DeploymentState.CANARY:
            out["warmup_ms"] = self.warmup_ms
        elif self.status in (DeploymentState.PROMOTED, DeploymentState.ROLLED_BACK):
            out["reason"] = self.reason
            if self.gap_ms is not None:
                out["gap_ms"] = self.gap_ms
        if self.canary is not None:
            out["canary"] = dict(self.canary)
        return out
