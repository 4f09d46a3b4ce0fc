"""Flow files (TOML) and resolved flow steps.

A `FlowSpec` is what the user wrote. Resolving it pins every step to a component version
(the step's `version`, else the component's recent one) and yields `Step`s, the immutable
content of a flow version or draft. `validate` says, per step, what stops it from running.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..config import NAME_RE, Duration, component_name
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
    component: str
    function: str
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
        return component_name(value)

    @field_validator("function")
    @classmethod
    def _function(cls, value: str) -> str:
        if not FUNCTION_RE.match(value):
            raise ValueError(
                f"{value!r} is not a function name; give a trigger or action name from the "
                "component's component.json"
            )
        return value

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
    steps: list[StepSpec]

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
        if self.type == "ordinary":
            raise ValueError(
                'type "ordinary" (scheduled flows) is not supported yet; use "realtime"'
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
        if self.steps[0].replicas != 1:
            raise ValueError(
                f"step {self.steps[0].id}: a trigger runs as one process (replicas = 1); "
                "give replicas to action steps only"
            )
        return self


def parse(raw: dict[str, Any], source: str = "flow") -> FlowSpec:
    """Validate a parsed flow document; FlowError lists every problem."""
    try:
        return FlowSpec.model_validate(raw)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            msg = str(err["msg"]).removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                msg = "unknown key"
            elif err["type"] == "model_type":  # not "... or instance of StepSpec"
                msg = "must be a table ([[steps]] with id, component and function)"
            elif _in_table(err["loc"]) and err["type"] == "string_type":
                msg = 'must be a string (quote it, e.g. "3")'
            elif _in_table(err["loc"]) and err["type"] == "dict_type":
                msg = 'must be a table of NAME = "value" (e.g. { REGION = "eu" })'
            problems.append(f"{key_path(err['loc'])}: {msg}")
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
) -> list[str]:
    """Every reason these steps cannot run, as `step ID: what is wrong` lines (empty: valid).

    `node_error`: why node cannot run here (None: it can); refuses `runtime = "node"` steps.
    `credentials`: the daemon config's, by name (a step naming another one is refused).
    """
    problems = []
    for step in steps:
        where = f"step {step.id}"
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
            else:
                problems.append(f'{where}: {noun} "{step.function}" no longer exists in {ref}')
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
