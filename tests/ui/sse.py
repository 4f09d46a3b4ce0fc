"""Reading a server-sent event stream in tests."""

from __future__ import annotations

import json
from typing import Any

import httpx


def read_events(response: httpx.Response, count: int) -> list[dict[str, Any]]:
    """The first `count` events of a stream (id and decoded data)."""
    out: list[dict[str, Any]] = []
    current: dict[str, Any] = {}
    for line in response.iter_lines():
        if line.startswith("id: "):
            current["id"] = int(line[4:])
        elif line.startswith("data: "):
            current["data"] = json.loads(line[6:])
        elif line == "" and current:
            out.append(current)
            current = {}
            if len(out) >= count:
                break
    return out
