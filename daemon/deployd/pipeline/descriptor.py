"""component.json: the model of a component's descriptor, and its validation against a tree."""

from __future__ import annotations

import json
import re
import stat
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ..errors import ComponentError, key_path

MAX_DESCRIPTOR_BYTES = 1024 * 1024
MAX_DEPTH = 100  # levels of nested objects and arrays in component.json
_SEMVER_RE = re.compile(
    r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)"
    r"(?:-((?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*)(?:\.(?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*))*))?"
    r"(?:\+([0-9a-zA-Z-]+(?:\.[0-9a-zA-Z-]+)*))?$"
)
_FUNC_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]{0,127}$")


class FieldSpec(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)
    label: str | None = None
    required: bool = False
    viewClass: str | None = None
    placeholder: str | None = None
    note: str | None = None


class Function(BaseModel):
    """One trigger or action of a component."""

    model_config = ConfigDict(extra="allow", frozen=True)
    main: str
    title: str | None = None
    description: str | None = None
    type: str | None = None
    fields: dict[str, FieldSpec] = Field(default_factory=dict)
    metadata: dict[str, Any] | None = None

    @field_validator("main")
    @classmethod
    def _main(cls, value: str) -> str:
        if not value or value.startswith("/") or "\x00" in value:
            raise ValueError(f"{value!r} must be a relative path inside the component")
        if any(part == ".." for part in Path(value).parts):
            raise ValueError(f"{value!r} escapes the component tree ('..' is not allowed)")
        return value


class Descriptor(BaseModel):
    """The parsed component.json."""

    model_config = ConfigDict(extra="allow", frozen=True)
    title: str | None = None
    description: str | None = None
    version: str | None = None
    runtime: Literal["python", "node"] | None = None
    build: str | None = None
    test: str | None = None
    fields: dict[str, FieldSpec] = Field(default_factory=dict)
    triggers: dict[str, Function] = Field(default_factory=dict)
    actions: dict[str, Function] = Field(default_factory=dict)

    @field_validator("version")
    @classmethod
    def _semver(cls, value: str | None) -> str | None:
        if value is not None and not _SEMVER_RE.match(value):
            raise ValueError(f"{value!r} is not a semantic version (MAJOR.MINOR.PATCH)")
        return value

    @field_validator("triggers", "actions")
    @classmethod
    def _names(cls, value: dict[str, Function]) -> dict[str, Function]:
        for name in value:
            if not _FUNC_NAME_RE.match(name):
                raise ValueError(
                    f"{name!r} is not a valid function name (letters, digits, '_' and '-')"
                )
        return value

    def function(self, name: str) -> tuple[str, Function] | None:
        """("trigger"|"action", Function) for `name`, or None."""
        if name in self.triggers:
            return "trigger", self.triggers[name]
        if name in self.actions:
            return "action", self.actions[name]
        return None


def semver_key(value: str) -> tuple[Any, ...]:
    """Sort key per semver precedence (pre-releases sort before the release)."""
    match = _SEMVER_RE.match(value)
    if not match:
        return (0, 0, 0, 0, ())
    major, minor, patch, pre = match.group(1), match.group(2), match.group(3), match.group(4)
    pre_key: tuple[Any, ...] = ()
    if pre:
        pre_key = tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in pre.split("."))
    return (int(major), int(minor), int(patch), 0 if pre else 1, pre_key)


def json_depth(value: Any) -> int:
    """How deeply JSON `value` nests objects and arrays (iteratively: no recursion limit)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict | list):
            deepest = max(deepest, level)
            stack.extend(
                (v, level + 1) for v in (item.values() if isinstance(item, dict) else item)
            )
    return deepest


def load(tree: Path) -> Descriptor:
    """Read and validate `tree/component.json` and check it against the files of `tree`."""
    path = tree / "component.json"
    if path.is_symlink():
        raise ComponentError("component.json must be a regular file, not a symbolic link")
    try:
        st = path.stat()
    except FileNotFoundError as exc:
        raise ComponentError(
            "component.json is missing at the root of the repository; add one "
            "(see README: component code contract)"
        ) from exc
    if not stat.S_ISREG(st.st_mode):
        raise ComponentError("component.json must be a regular file, not a directory")
    size = st.st_size
    if size > MAX_DESCRIPTOR_BYTES:
        raise ComponentError(
            f"component.json is {size} bytes; the limit is {MAX_DESCRIPTOR_BYTES} bytes"
        )
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise ComponentError("component.json is not UTF-8 text") from exc
    except json.JSONDecodeError as exc:
        raise ComponentError(
            f"component.json is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from exc
    except RecursionError as exc:
        raise ComponentError(
            "component.json is nested too deeply to read; flatten its objects and arrays"
        ) from exc
    except ValueError as exc:  # an integer longer than Python converts (4,300 digits)
        raise ComponentError(
            "component.json holds a number with too many digits; write it as a string"
        ) from exc
    except OSError as exc:
        raise ComponentError(f"component.json cannot be read: {exc.strerror}") from exc
    if not isinstance(raw, dict):
        raise ComponentError("component.json must hold a JSON object")
    if json_depth(raw) > MAX_DEPTH:  # deeper cannot be stored (pydantic serializes ~250 levels)
        raise ComponentError(
            f"component.json is nested more than {MAX_DEPTH} levels deep; flatten it"
        )
    try:
        desc = Descriptor.model_validate(raw)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            msg = str(err["msg"]).removeprefix("Value error, ")
            if err["type"] == "model_type":  # not "... or instance of Function"
                msg = "must be a JSON object"
            problems.append(f"component.json {key_path(err['loc'])}: {msg}")
        raise ComponentError("; ".join(problems)) from exc
    if not desc.triggers and not desc.actions:
        raise ComponentError("component.json declares no triggers and no actions; add at least one")
    runtime = desc.runtime or ("node" if (tree / "package.json").exists() else "python")
    desc = desc.model_copy(update={"runtime": runtime})
    root = tree.resolve()
    for kind, funcs in (("triggers", desc.triggers), ("actions", desc.actions)):
        for name, func in funcs.items():
            try:
                target = (tree / func.main).resolve()
            except (OSError, RuntimeError) as exc:  # a symbolic link loop
                raise ComponentError(
                    f"component.json {kind}.{name}.main: {func.main!r} cannot be resolved "
                    "(a symbolic link loop?); make it a regular file"
                ) from exc
            if not target.is_relative_to(root):
                raise ComponentError(
                    f"component.json {kind}.{name}.main: {func.main!r} points outside the "
                    "component tree (through a symbolic link)"
                )
            if target.is_dir():
                raise ComponentError(
                    f"component.json {kind}.{name}.main: {func.main!r} is a directory; "
                    "name the module file (e.g. ./lib/ticker.py)"
                )
            if not target.is_file():
                raise ComponentError(
                    f"component.json {kind}.{name}.main: file {func.main!r} does not exist in "
                    "this commit"
                )
    return desc
