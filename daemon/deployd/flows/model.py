"""Flow files (TOML) and resolved flow steps.

A `FlowSpec` is what the user wrote. Resolving it pins every step to a component version
(the step's `version`, else the component's recent one) and yields `Step`s, the immutable
content of a flow version or draft. `validate` says, per step, what stops it from running.
"""

from __future__ import annotations

import difflib
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from apscheduler.triggers.cron import CronTrigger
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..config import NAME_RE, Duration, component_name, nearest_key
from ..errors import FlowError, key_path
from ..types import DEFAULT_PREFETCH

STEP_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$")
FUNCTION_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]{0,127}$")  # as in component.json
SUPPORTED_RUNTIMES = {"python", "node"}
# A step's `env` names: POSIX (letters, digits, '_', not a digit first). Refused: what deployd
# sets itself (the clean environment, the platform's ELASTICIO_* variables), its own DEPLOYD_*
# names, and variables an interpreter reads only at its start (a pooled step process is
# started before it knows its step, so those could not take effect).
ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
RESERVED_ENV = {"PATH", "HOME", "LANG", "NODE_OPTIONS", "NODE_PATH"}
RESERVED_ENV_PREFIXES = ("ELASTICIO_", "DEPLOYD_", "LC_", "PYTHON")
VARIABLE_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]{0,127}$")
MAX_VALUE = 64 * 1024  # characters of one variable or env value


def _env_problem(name: str) -> str | None:
    """Why `name` cannot be a step's env variable (None: it can)."""
    if not ENV_NAME_RE.match(name):
        return (
            f"{name!r} is not a valid environment variable name (letters, digits and '_', "
            "not starting with a digit)"
        )
    if name in RESERVED_ENV or name.startswith(RESERVED_ENV_PREFIXES):
        return (
            f"{name} is set by deployd itself and cannot be overridden (reserved: PATH, HOME, "
            "LANG, LC_*, NODE_OPTIONS, NODE_PATH, PYTHON*, ELASTICIO_*, DEPLOYD_*); use another "
            "name"
        )
    return None


def _check_values(table: dict[str, str], what: str) -> None:
    for key, value in table.items():
        if "\x00" in value:
            raise ValueError(f"{what} {key!r} holds a NUL character")
        if len(value) > MAX_VALUE:
            raise ValueError(f"{what} {key!r} is longer than {MAX_VALUE} characters")


BUILTINS = ("http",)
SECRET_REF_RE = re.compile(r"^\$\{[A-Za-z_][A-Za-z0-9_]*\}$")
MAX_REPLY_TIMEOUT = 300.0
# Keys of a step that a builtin trigger (`builtin = "http"`) has no use for.
_NOT_FOR_BUILTIN = ("component", "function", "config", "mapping", "version", "env", "credential")
_HTTP_ONLY = ("auth", "secret", "reply", "reply_timeout")
# Kubernetes quantities (issue 13): cpu "500m", "1", "0.5"; memory "256Mi", "1Gi", "512M".
_CPU_RE = re.compile(r"^(\d+(\.\d{1,3})?|\d+m)$")
_MEMORY_RE = re.compile(r"^\d+(\.\d+)?(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?$")
_MEMORY_UNITS = {"": 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15}
_MEMORY_UNITS |= {"E": 10**18, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
_MEMORY_UNITS |= {"Pi": 2**50, "Ei": 2**60}


def quantity(kind: str, value: str) -> float:
    """`value` as cores (cpu) or bytes (memory); ValueError naming the expected form."""
    if kind == "cpu":
        if not _CPU_RE.match(value):
            raise ValueError(
                f'{value!r} is not a cpu quantity; write cores ("1", "0.5") or millicores ("500m")'
            )
        return int(value[:-1]) / 1000 if value.endswith("m") else float(value)
    match = _MEMORY_RE.match(value)
    if not match:
        raise ValueError(
            f'{value!r} is not a memory quantity; write bytes with a unit, e.g. "256Mi", '
            '"1Gi" or "512M"'
        )
    number = value[: len(value) - len(match.group(2) or "")]
    return float(number) * _MEMORY_UNITS[match.group(2) or ""]


class Resource(BaseModel):
    """A step's cpu or memory as `{request, limit}` (a plain string: both the same)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    request: str
    limit: str


def _resource(kind: str, value: Any) -> str | Resource | None:
    """A step's raw `cpu` or `memory`, checked: a quantity, or {request, limit} of two."""
    if value is None or isinstance(value, Resource):
        return value
    if isinstance(value, str):
        quantity(kind, value)
        return value
    example = '"500m"' if kind == "cpu" else '"256Mi"'
    if not isinstance(value, dict) or set(value) != {"request", "limit"}:
        raise ValueError(
            f"must be a quantity (e.g. {kind} = {example}: request and limit alike) or "
            f'{{ request = "…", limit = "…" }} with both keys'
        )
    for key in ("request", "limit"):
        if not isinstance(value[key], str):
            raise ValueError(f"{key} must be a string (e.g. {key} = {example})")
        quantity(kind, value[key])
    if quantity(kind, value["request"]) > quantity(kind, value["limit"]):
        raise ValueError(
            f"request {value['request']!r} is more than limit {value['limit']!r}; the request "
            "must be at most the limit"
        )
    return Resource(request=value["request"], limit=value["limit"])


class StepSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    id: str
    # A component's function; or, for the trigger only, a trigger deployd provides itself:
    # `builtin = "http"` (the flow is fed by `POST /flows/<flow>/in`).
    component: str = ""
    function: str = ""
    builtin: Literal["http"] | None = None
    # builtin = "http": how a request is authenticated, with what, and what it is answered.
    auth: Literal["hmac", "token", "none"] = "hmac"
    secret: str | None = None  # "${VAR}": deployd's environment (never stored in clear)
    reply: Literal["async", "sync"] = "async"
    reply_timeout: Duration = 30.0
    interval: Duration = 1.0
    config: dict[str, Any] = Field(default_factory=dict)
    mapping: str | None = None
    version: int | None = Field(default=None, ge=1)
    # The message path: messages handed to the step process ahead of the one it handles,
    # and the limit of the step's input queue (default: daemon.max_queue).
    prefetch: int = Field(default=DEFAULT_PREFETCH, ge=1, le=10000)
    max_queue: int | None = Field(default=None, ge=1, le=10_000_000)
    # Environment variables of the step process (values may be "${VAR}" secrets).
    env: dict[str, str] = Field(default_factory=dict)
    # A [[credentials]] of the daemon config, by name: its fields are merged into cfg.
    credential: str | None = None
    # Check each message against the function's metadata.in before process().
    validate_input: bool = False
    # On Kubernetes (issue 13): pods of an action (> 1 share its queue: per-step order is then
    # not kept), and the pod's cpu and memory (requests = limits, or {request, limit}).
    replicas: int = Field(default=1, ge=1, le=100)
    cpu: str | Resource | None = None
    memory: str | Resource | None = None

    @field_validator("cpu", mode="before")
    @classmethod
    def _cpu(cls, value: Any) -> str | Resource | None:
        return _resource("cpu", value)

    @field_validator("memory", mode="before")
    @classmethod
    def _memory(cls, value: Any) -> str | Resource | None:
        return _resource("memory", value)

    @field_validator("credential")
    @classmethod
    def _credential(cls, value: str | None) -> str | None:
        if value is not None and not NAME_RE.match(value):
            raise ValueError(
                f"{value!r} is not a credential name (the name of a [[credentials]] table of "
                "the daemon config: lowercase letters, digits and '-')"
            )
        return value

    @field_validator("env")
    @classmethod
    def _env(cls, value: dict[str, str]) -> dict[str, str]:
        for name in value:
            problem = _env_problem(name)
            if problem is not None:
                raise ValueError(problem)
        _check_values(value, "env")
        return value

    @field_validator("id")
    @classmethod
    def _id(cls, value: str) -> str:
        if not STEP_ID_RE.match(value):
            raise ValueError(f"{value!r} is not a valid step id (letters, digits, '_' and '-')")
        return value

    @field_validator("component")
    @classmethod
    def _component(cls, value: str) -> str:
        return component_name(value) if value else value

    @field_validator("function")
    @classmethod
    def _function(cls, value: str) -> str:
        if value and not FUNCTION_RE.match(value):
            raise ValueError(
                f"{value!r} is not a function name; give a trigger or action name from the "
                "component's component.json"
            )
        return value

    @model_validator(mode="after")
    def _kind(self) -> StepSpec:
        given = self.model_fields_set
        if self.builtin is None:
            # "@key: what" is reported at the key's path (`parse`), as a field error would be
            for key in ("component", "function"):
                if key not in given:
                    raise ValueError(
                        f"@{key}: Field required (a component's trigger or action; or "
                        'builtin = "http" for a trigger fed by HTTP requests)'
                    )
            if not self.component:
                raise ValueError("@component: '' is not a valid component name")
            if not self.function:
                raise ValueError(
                    "@function: '' is not a function name; give a trigger or action name "
                    "from the component's component.json"
                )
            extra = [k for k in _HTTP_ONLY if k in given]
            if extra:
                raise ValueError(f'{", ".join(extra)} belong(s) to builtin = "http" steps only')
            return self
        extra = [k for k in _NOT_FOR_BUILTIN if k in given]
        if extra:
            raise ValueError(
                f"a builtin = {self.builtin!r} step takes no "
                f"{', '.join(extra)} (it is deployd's own trigger: auth, secret, reply, "
                "reply_timeout)"
            )
        if self.auth == "none":
            if self.secret is not None:
                raise ValueError('auth = "none" takes no secret; remove it')
        elif self.secret is None:
            raise ValueError(
                f'auth = "{self.auth}" needs secret = "${{VAR}}" (an environment '
                "variable of deployd holding a long random string, e.g. from `openssl rand "
                '-hex 32`); or auth = "none" on a loopback listen address'
            )
        elif not SECRET_REF_RE.match(self.secret):
            raise ValueError(
                'secret must be a "${VAR}" reference to deployd\'s '
                "environment, not the secret itself (flow files and the database keep it as "
                'written); e.g. secret = "${ORDERS_IN_SECRET}"'
            )
        if not 0 < self.reply_timeout <= MAX_REPLY_TIMEOUT:
            raise ValueError(f"reply_timeout must be above 0 and at most {MAX_REPLY_TIMEOUT:g}s")
        return self

    @field_validator("config")
    @classmethod
    def _config(cls, value: dict[str, Any]) -> dict[str, Any]:
        from ..pipeline.descriptor import MAX_DEPTH, json_depth

        if json_depth(value) > MAX_DEPTH:  # deeper cannot be stored with the flow version
            raise ValueError(f"is nested more than {MAX_DEPTH} levels deep; flatten it")
        return value

    @field_validator("mapping")
    @classmethod
    def _mapping(cls, value: str | None) -> str | None:
        if value is None:
            return None
        from ..runtime.mapper import compile_mapping

        compile_mapping(value)
        return value


def _number(value: Any) -> Any:
    """A TOML number as given (an integer or a float), never a string or a boolean."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError("must be a number (e.g. 0.1)")
    return value


class CanarySpec(BaseModel):
    """A flow's [canary] table (issue 16): how a publish that changes only action steps is
    tried on a share of their messages first (see `flows/canary.py`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    # The share of each changed action step's messages its new version handles.
    share: float = 0.1
    # How long the canary lasts at the least, and how many messages its new version must
    # have handled by then; it is judged on the new version's error rate (errors ÷ messages).
    duration: Duration = 300.0
    min_messages: int = 100
    max_error_rate: float = 0.01

    @field_validator("share", "max_error_rate", mode="before")
    @classmethod
    def _numbers(cls, value: Any) -> Any:
        return _number(value)

    @field_validator("min_messages", mode="before")
    @classmethod
    def _min_messages(cls, value: Any) -> Any:
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 10**12:
            raise ValueError(
                f"{repr(value)[:40]} is not a number of messages: it must be a whole number, "
                "0 or more (e.g. 100)"
            )
        return value

    @field_validator("share")
    @classmethod
    def _share(cls, value: float) -> float:
        if not 0 < value < 1:
            raise ValueError(
                f"{value:g} is not a share: it must be above 0 and below 1 (e.g. 0.1: the new "
                "version handles a tenth of the messages)"
            )
        return float(value)

    @field_validator("max_error_rate")
    @classmethod
    def _rate(cls, value: float) -> float:
        if not 0 <= value <= 1:
            raise ValueError(
                f"{value:g} is not an error rate: it must be from 0 to 1 (e.g. 0.01: one "
                "failed message in a hundred)"
            )
        return float(value)

    @field_validator("duration")
    @classmethod
    def _duration(cls, value: float) -> float:
        if value > MAX_CANARY:
            raise ValueError(f'must be at most {MAX_CANARY / 86400:g} days (e.g. "5m")')
        return value


MAX_CANARY = 30 * 86400.0  # seconds: a canary is a publish in progress, not a way of running


class FlowSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str
    type: Literal["realtime", "ordinary"] = "realtime"
    update: Literal["auto", "manual"] = "auto"
    # "on_publish": after a publish that changed a step's component version stays up through
    # the rollback window, that step's dead letters are re-queued once into the new version.
    retry_errors: Literal["manual", "on_publish"] = "manual"
    # What runs it: "embedded" (this machine, SQLite queues) or "rabbitmq" (queues in
    # RabbitMQ); None: the daemon's [runtime] default.
    runtime: Literal["embedded", "rabbitmq"] | None = None
    # Flow variables: what this.getFlowVariables() / ctx.flow_variables return in every step
    # (values may be "${VAR}" secrets, expanded only when the steps start).
    variables: dict[str, str] = Field(default_factory=dict)
    # Ordinary (scheduled) flows (issue 14): exactly one of `schedule` (cron, 5 fields, in
    # daemon.timezone) and `every` (a duration); what a run due while one is going does; what
    # runs missed while deployd was stopped become; how long a run may take.
    schedule: str | None = None
    every: Duration | None = None
    overlap: Literal["skip", "queue"] = "skip"
    catch_up: Literal["one", "none"] = "one"
    run_timeout: Duration = 3600.0
    # [canary]: a publish changing only action steps goes to a share of their messages first.
    canary: CanarySpec | None = None
    steps: list[StepSpec]

    @field_validator("schedule")
    @classmethod
    def _schedule(cls, value: str | None) -> str | None:
        if value is not None:
            cron_trigger(value, "UTC")  # the daemon's time zone is checked by its config
        return value

    @field_validator("every", "run_timeout")
    @classmethod
    def _positive(cls, value: float | None) -> float | None:
        if value is not None and value <= 0:
            raise ValueError('must be longer than 0 (e.g. "30s")')
        return value

    @field_validator("every")
    @classmethod
    def _every(cls, value: float | None) -> float | None:
        if value is not None and value < MIN_EVERY:
            raise ValueError(
                f"must be at least {MIN_EVERY:g}s: every run starts and stops the steps "
                '(e.g. "30s")'
            )
        return value

    @field_validator("variables")
    @classmethod
    def _variables(cls, value: dict[str, str]) -> dict[str, str]:
        for name in value:
            if not VARIABLE_NAME_RE.match(name):
                raise ValueError(
                    f"{name!r} is not a valid variable name (letters, digits, '_' and '-', "
                    "starting with a letter or '_')"
                )
        _check_values(value, "variable")
        return value

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not NAME_RE.match(value):
            raise ValueError(
                f"{value!r} is not a valid flow name: use 1-63 lowercase letters, digits and '-'"
            )
        return value

    @model_validator(mode="after")
    def _shape(self) -> FlowSpec:
        scheduling = ORDINARY_KEYS & self.model_fields_set
        if self.type == "ordinary":
            if (self.schedule is None) == (self.every is None):
                raise ValueError(
                    "an ordinary flow runs on a schedule: give exactly one of schedule (cron, "
                    'e.g. "*/15 * * * *") and every (e.g. "30s")'
                    + (", not both" if self.schedule is not None else "")
                )
            if self.steps and self.steps[0].builtin is not None:
                raise ValueError(
                    f"step {self.steps[0].id}: builtin = {self.steps[0].builtin!r} feeds a"
                    " real-time flow from requests; an ordinary flow's trigger is called once"
                    ' per run: give it a component trigger, or remove type = "ordinary"'
                )
        elif scheduling:
            raise ValueError(
                f"{', '.join(sorted(scheduling))}: only for ordinary (scheduled) flows; add "
                'type = "ordinary" or remove them'
            )
        if self.type == "ordinary" and self.canary is not None:
            raise ValueError(
                "@canary: only for real-time flows (each run of an ordinary flow takes the "
                "newest valid versions of its steps); remove [canary]"
            )
        if len(self.steps) < 2:
            raise ValueError("a flow needs a trigger step and at least one action step")
        seen: set[str] = set()
        for step in self.steps:
            if step.id in seen:
                raise ValueError(f"step id {step.id!r} is used twice; step ids must be unique")
            seen.add(step.id)
        if self.steps[0].mapping is not None:
            raise ValueError(f"step {self.steps[0].id}: the trigger step cannot have a mapping")
        for step in self.steps[1:]:
            if step.builtin is not None:
                raise ValueError(
                    f"step {step.id}: builtin = {step.builtin!r} is a trigger: only the first "
                    "step can be one"
                )
        if self.steps[0].replicas != 1:
            raise ValueError(
                f"step {self.steps[0].id}: a trigger runs as one process (replicas = 1); "
                "give replicas to action steps only"
            )
        return self

    @property
    def http(self) -> StepSpec | None:
        """The builtin HTTP trigger when the flow is fed by HTTP requests."""
        first = self.steps[0] if self.steps else None
        return first if first is not None and first.builtin == "http" else None


MIN_EVERY = 1.0  # seconds between runs at the least
ORDINARY_KEYS = frozenset({"schedule", "every", "overlap", "catch_up", "run_timeout"})


def cron_trigger(expr: str, timezone: str) -> CronTrigger:
    """A 5-field cron expression (minute hour day month weekday) as an APScheduler trigger
    in `timezone`; ValueError says what is wrong with it."""
    fields = expr.split()
    if len(fields) != 5:
        raise ValueError(
            f"{expr!r} is not a cron expression: it needs 5 fields (minute hour day month "
            f'weekday, e.g. "*/15 * * * *"), it has {len(fields)}'
        )
    try:
        minute, hour, day, month, weekday = fields
        return CronTrigger(
            minute=minute,
            hour=hour,
            day=day,
            month=month,
            day_of_week=_cron_weekdays(weekday),
            timezone=timezone,
        )
    except (ValueError, TypeError, KeyError) as exc:
        raise ValueError(
            f"{expr!r} is not a cron expression: {exc} (minute hour day month weekday, e.g. "
            '"*/15 * * * *")'
        ) from None


_WEEKDAYS = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")


def _cron_weekdays(field: str) -> str:
    """cron's weekday numbers (0 and 7 Sunday) as names: APScheduler 3 counts 0 as Monday."""
    parts = []
    for part in field.split(","):
        head, slash, step = part.partition("/")
        lo, dash, hi = head.partition("-")
        if not (lo.isdigit() and (not dash or hi.isdigit())):
            parts.append(part)  # names, "*" (APScheduler checks them)
            continue
        if int(lo) > 7 or (dash and int(hi) > 7):
            raise ValueError(f"weekday {head!r} is out of range (0-7, 0 and 7 are Sunday)")
        first, last = _WEEKDAYS[int(lo) % 7], _WEEKDAYS[int(hi) % 7] if dash else ""
        if dash and first == "sun" and last != "sun":  # 0-5: Sunday, then Monday to Friday
            if slash:
                raise ValueError(f"write weekday steps from Sunday with names ({part!r})")
            parts += ["sun", f"mon-{last}" if last != "mon" else "mon"]
        else:
            parts.append(first + (f"-{last}" if dash else "") + (f"/{step}" if slash else ""))
    return ",".join(parts)


def parse(raw: dict[str, Any], source: str = "flow") -> FlowSpec:
    """Validate a parsed flow document; FlowError lists every problem."""
    try:
        return FlowSpec.model_validate(raw)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            msg = str(err["msg"]).removeprefix("Value error, ")
            loc = tuple(err["loc"])
            if msg.startswith("@"):  # a model check naming the key it is about
                key, _, msg = msg[1:].partition(": ")
                loc = (*loc, key)
            if err["type"] == "extra_forbidden":
                close = nearest_key(FlowSpec, loc)
                msg = "unknown key" + (f"; did you mean {close!r}?" if close else "")
            elif err["type"] == "model_type" and loc[:1] == ("canary",):
                msg = (
                    "must be a table ([canary] with share, duration, min_messages, max_error_rate)"
                )
            elif err["type"] == "model_type":  # not "... or instance of StepSpec"
                msg = "must be a table ([[steps]] with id, component and function)"
            elif _in_table(err["loc"]) and err["type"] == "string_type":
                msg = 'must be a string (quote it, e.g. "3")'
            elif _in_table(err["loc"]) and err["type"] == "dict_type":
                msg = 'must be a table of NAME = "value" (e.g. { REGION = "eu" })'
            problems.append(f"{key_path(loc)}: {msg}")
        raise FlowError(f"{source} is invalid: " + "; ".join(problems)) from exc


def _in_table(loc: tuple[Any, ...]) -> bool:
    """Whether a validation error is inside `variables` or a step's `env`."""
    return bool(loc) and (loc[0] == "variables" or (len(loc) > 2 and loc[2] == "env"))


def load(path: Path) -> FlowSpec:
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise FlowError(f"flow file {path} does not exist") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise FlowError(f"flow file {path} cannot be read: {exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise FlowError(f"flow file {path} is not valid TOML: {exc}") from exc
    except RecursionError as exc:
        raise FlowError(f"flow file {path} is nested too deeply to read; flatten it") from exc
    return parse(raw, str(path))


class Step(BaseModel):
    """A step pinned to one component version: the content of a flow version."""

    model_config = ConfigDict(frozen=True)
    id: str
    kind: Literal["trigger", "action"]
    component: str
    function: str
    version: int | None
    pinned: bool
    interval: float = 1.0
    config: dict[str, Any] = Field(default_factory=dict)
    mapping: str | None = None
    prefetch: int = DEFAULT_PREFETCH
    max_queue: int | None = None
    env: dict[str, str] = Field(default_factory=dict)  # "${VAR}" kept as written
    credential: str | None = None  # its name only: the values are never stored with a flow
    validate_input: bool = False
    builtin: str | None = None  # "http": deployd's own trigger (no component, no process)
    # builtin "http": {"auth", "secret" ("${VAR}" as written), "reply", "reply_timeout"}
    http: dict[str, Any] | None = None
    replicas: int = 1
    cpu: str | Resource | None = None
    memory: str | Resource | None = None


@dataclass(frozen=True)
class CredentialInfo:
    """What validation knows of a credential: its component and the names of its fields
    (the config's and the refreshed keys'); never a value."""

    component: str
    fields: frozenset[str]


def resolve(spec: FlowSpec, recent: dict[str, int | None]) -> list[Step]:
    """Pin each step: its own `version`, else the component's recent one."""
    steps = []
    for i, s in enumerate(spec.steps):
        if s.builtin is not None:
            steps.append(
                Step(
                    id=s.id,
                    kind="trigger",
                    component="",
                    function=s.builtin,
                    version=None,
                    pinned=True,  # no component version: never moved by a redeploy
                    builtin=s.builtin,
                    http={
                        "auth": s.auth,
                        "secret": s.secret,
                        "reply": s.reply,
                        "reply_timeout": s.reply_timeout,
                    },
                )
            )
            continue
        version = s.version
        if version is None:
            version = recent.get(s.component)
        steps.append(
            Step(
                id=s.id,
                kind="trigger" if i == 0 else "action",
                component=s.component,
                function=s.function,
                version=version,
                pinned=s.version is not None,
                interval=s.interval,
                config=s.config,
                mapping=s.mapping,
                prefetch=s.prefetch,
                max_queue=s.max_queue,
                env=s.env,
                credential=s.credential,
                validate_input=s.validate_input,
                replicas=s.replicas,
                cpu=s.cpu,
                memory=s.memory,
            )
        )
    return steps


def validate(
    steps: list[Step],
    descriptors: dict[tuple[str, int], dict[str, Any]],
    node_error: str | None = None,
    credentials: Mapping[str, CredentialInfo] | None = None,
    before: list[Step] | None = None,
) -> list[str]:
    """Every reason these steps cannot run, as `step ID: what is wrong` lines (empty: valid).

    `node_error`: why node cannot run here (None: it can); refuses `runtime = "node"` steps.
    `credentials`: the daemon config's, by name (a step naming another one is refused).
    `before`: the steps running now; a function one of them ran on an older version of the
    same component "no longer exists" in the new one, any other missing one "does not exist".
    """
    ran = {(s.id, s.component, s.function) for s in before or ()}
    problems = []
    for step in steps:
        where = f"step {step.id}"
        if step.builtin is not None:
            continue  # deployd's own trigger: checked when the flow file was read
        if step.version is None:
            problems.append(f"{where}: component {step.component!r} has no version yet (push it)")
            continue
        desc = descriptors.get((step.component, step.version))
        if desc is None:
            problems.append(f"{where}: {step.component} v{step.version} does not exist")
            continue
        ref = f"{step.component} v{step.version}"
        group = "triggers" if step.kind == "trigger" else "actions"
        noun = "trigger" if step.kind == "trigger" else "action"
        funcs = desc.get(group) or {}
        if step.function not in funcs:
            other = "actions" if group == "triggers" else "triggers"
            if step.function in (desc.get(other) or {}):
                article = "an" if noun == "action" else "a"
                rule = "the first step" if noun == "trigger" else "only the first step"
                problems.append(
                    f"{where}: {step.function!r} is not {article} {noun} of {ref} "
                    f"(it is one of its {other}; {rule} must be a trigger)"
                )
            elif (step.id, step.component, step.function) in ran:
                problems.append(f'{where}: {noun} "{step.function}" no longer exists in {ref}')
            else:
                names = ", ".join(sorted(funcs)) or "none"
                close = difflib.get_close_matches(step.function, list(funcs), n=1)
                hint = f'; did you mean "{close[0]}"?' if close else ""
                problems.append(
                    f'{where}: {noun} "{step.function}" does not exist in {ref} (its {group}:'
                    f" {names}){hint}"
                )
            continue
        fields = (funcs[step.function] or {}).get("fields") or {}
        for fname, fspec in fields.items():
            if (fspec or {}).get("required") and fname not in step.config:
                problems.append(
                    f"{where}: field {fname!r} is required by {ref} but has no value in config"
                )
        if step.credential is not None:
            problems += _credential_problems(step, desc, ref, credentials or {})
        runtime = desc.get("runtime", "python")
        if runtime not in SUPPORTED_RUNTIMES:
            problems.append(f"{where}: runtime {runtime!r} of {ref} is not supported")
        elif runtime == "node" and node_error is not None:
            problems.append(f"{where}: {ref} cannot run: {node_error}")
    return problems


def _credential_problems(
    step: Step, desc: dict[str, Any], ref: str, credentials: Mapping[str, CredentialInfo]
) -> list[str]:
    """Why `step`'s credential cannot be used with its component version `desc`."""
    where, name = f"step {step.id}", step.credential
    info = credentials.get(name or "")
    if info is None:
        known = ", ".join(sorted(credentials)) or "none"
        return [
            f"{where}: credential {name!r} is not defined in the daemon config (known: "
            f"{known}); add a [[credentials]] table with name = {name!r}, component = "
            f'"{step.component}" and its fields, then reload deployd'
        ]
    if info.component != step.component:
        return [
            f"{where}: credential {name!r} belongs to component {info.component!r}, not "
            f"{step.component!r}; name a credential of {step.component}"
        ]
    declared = desc.get("credentials")
    if not isinstance(declared, dict):
        return [
            f"{where}: {ref} takes no credential (its component.json has no credentials "
            f"section); remove credential = {name!r} from the step"
        ]
    fields = declared.get("fields")
    out = []
    for fname, fspec in (fields if isinstance(fields, dict) else {}).items():
        if isinstance(fspec, dict) and fspec.get("required") is True and fname not in info.fields:
            out.append(
                f"{where}: field {fname!r} is required by {ref} (component.json "
                f"credentials.fields) but credential {name!r} has no value for it; add it to "
                "the credential's fields in the daemon config"
            )
    return out
