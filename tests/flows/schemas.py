"""A counter component whose functions declare metadata.in/out (JSON Schema), for the plan
and schema-compatibility tests."""

from __future__ import annotations

import copy
from typing import Any

from tests.flows.conftest import COUNTER_DESC, counter_files

TICK_OUT: dict[str, Any] = {
    "type": "object",
    "properties": {"text": {"type": "string"}, "n": {"type": "integer"}},
    "required": ["text", "n"],
}
WRITE_IN: dict[str, Any] = {
    "type": "object",
    "properties": {"text": {"type": "string"}, "n": {"type": "integer"}},
    "required": ["n"],
}


def desc(tick_out: dict[str, Any] | None = None, write_in: dict[str, Any] | None = None) -> Any:
    d = copy.deepcopy(COUNTER_DESC)
    d["triggers"]["ticker"]["metadata"] = {"out": tick_out or TICK_OUT}
    d["actions"]["write"]["metadata"] = {"in": write_in or WRITE_IN}
    return d


def files(tag: str = "v1", **kw: Any) -> dict[str, Any]:
    """The counter component with schemas; `kw`: desc() arguments or file overrides."""
    d = desc(kw.pop("tick_out", None), kw.pop("write_in", None))
    return counter_files(tag, **{"component.json": d, **kw})


def without(schema: dict[str, Any], prop: str) -> dict[str, Any]:
    out = copy.deepcopy(schema)
    out["properties"].pop(prop)
    out["required"] = [r for r in out.get("required", []) if r != prop]
    return out


def retyped(schema: dict[str, Any], prop: str, type_: str) -> dict[str, Any]:
    out = copy.deepcopy(schema)
    out["properties"][prop] = {"type": type_}
    return out


def flow(name: str, out: Any, *, mapping: str | None = None, update: str = "auto") -> str:
    """tick (ticker) → write (write), optionally with a mapping on write."""
    lines = [
        f'name = "{name}"',
        f'update = "{update}"',
        "[[steps]]",
        'id = "tick"',
        'component = "hello"',
        'function = "ticker"',
        'interval = "50ms"',
        "[[steps]]",
        'id = "write"',
        'component = "hello"',
        'function = "write"',
        f'config = {{ out = "{out}" }}',
    ]
    if mapping is not None:
        lines.append(f"mapping = '{mapping}'")
    return "\n".join(lines) + "\n"


MAPPING = '{"text": $uppercase(text), "n": n}'
