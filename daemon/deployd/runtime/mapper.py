"""Mapper steps: JSONata over the previous step's output body, evaluated in the router.

A mapper step costs nothing to start (no process), which keeps warm-up flat.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import jsonata

from ..errors import FlowError


@lru_cache(maxsize=1024)
def compile_mapping(expr: str) -> jsonata.Jsonata:
    """Compile once; raise ValueError (for validators) with the parser's reason."""
    try:
        return jsonata.Jsonata(expr)
    except Exception as exc:
        raise ValueError(f"mapping is not valid JSONata: {exc}") from exc


def apply(expr: str, body: dict[str, Any]) -> dict[str, Any]:
    """Evaluate `expr` over `body`; a non-object result becomes {"value": result}."""
    try:
        result = compile_mapping(expr).evaluate(body)
    except ValueError as exc:
        raise FlowError(str(exc)) from exc
    except Exception as exc:
        raise FlowError(f"mapping failed: {exc}") from exc
    if result is None:
        return {}
    if not isinstance(result, dict):
        return {"value": result}
    return result
