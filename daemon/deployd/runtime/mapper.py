"""Mapper steps: JSONata over the previous step's output body, evaluated in the router.

A mapper step costs nothing to start (no process), which keeps warm-up flat. As in the seed
platform's components library (`@elastic.io/component-commons-library`'s JSONata helper),
`$getPassthrough()` returns the message's passthrough: what each earlier step of the flow
execution emitted, by step id (`$getPassthrough().tick.body.n`), and `$getFlowVariables()`
the flow file's `[variables]` (`$getFlowVariables().region`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from functools import lru_cache
from typing import Any

import jsonata

from ..errors import FlowError

PASSTHROUGH_FUNCTION = "getPassthrough"
VARIABLES_FUNCTION = "getFlowVariables"


@lru_cache(maxsize=1024)
def compile_mapping(expr: str) -> jsonata.Jsonata:
    """Compile once; raise ValueError (for validators) with the parser's reason."""
    try:
        return jsonata.Jsonata(expr)
    except Exception as exc:
        raise ValueError(f"mapping is not valid JSONata: {exc}") from exc


def apply(
    expr: str,
    body: dict[str, Any],
    passthrough: str | dict[str, Any] | None = None,
    variables: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Evaluate `expr` over `body`; a non-object result becomes {"value": result}.

    `passthrough` (JSON text as stored, or an object) is decoded only when the expression
    calls `$getPassthrough()`, so a mapping that does not pays nothing for it;
    `$getFlowVariables()` is a copy of `variables` (the flow's, secrets expanded).
    """
    bindings: dict[str, Any] | None = None
    if PASSTHROUGH_FUNCTION in expr:
        value = _decoded(passthrough)
        bindings = {PASSTHROUGH_FUNCTION: jsonata.Jsonata.JLambda(lambda: value)}
    if VARIABLES_FUNCTION in expr:
        flow_vars = dict(variables or {})
        bindings = bindings or {}
        bindings[VARIABLES_FUNCTION] = jsonata.Jsonata.JLambda(lambda: flow_vars)
    try:
        result = compile_mapping(expr).evaluate(body, bindings)
    except ValueError as exc:
        raise FlowError(str(exc)) from exc
    except Exception as exc:
        raise FlowError(f"mapping failed: {exc}") from exc
    if result is None:
        return {}
    if not isinstance(result, dict):
        return {"value": result}
    return result


def _decoded(passthrough: str | dict[str, Any] | None) -> dict[str, Any]:
    if isinstance(passthrough, str):
        value = json.loads(passthrough)
        return value if isinstance(value, dict) else {}
    return passthrough or {}
