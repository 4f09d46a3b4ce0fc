"""`validate_input = true`: a step's messages checked against its metadata.in before process().

The runners call `refusal(step, body)` for each message they are about to hand a step
process; a message that does not match is not sent: it fails with the schema error, and the
router makes it a dead letter of the step as for any failed message (a retry checks it again).
Validators are compiled once per schema (jsonschema picks the draft from `$schema`, else the
newest it knows).
"""

from __future__ import annotations

import json
from typing import Any

import jsonschema

from ..types import RunStep

MAX_ERRORS = 5  # of one message, in its dead letter
_validators: dict[str, Any] = {}


def _validator(schema: Any) -> Any:
    key = json.dumps(schema, sort_keys=True)
    found = _validators.get(key)
    if found is None:
        cls = jsonschema.validators.validator_for(schema)
        found = cls(schema)
        if len(_validators) > 256:
            _validators.clear()
        _validators[key] = found
    return found


def refusal(step: RunStep, body: str | dict[str, Any]) -> str | None:
    """Why the message body `body` (JSON text as queued, or an object) does not match
    `step`'s input schema; None when it does, or the step does not check its input."""
    if step.input_schema is None:
        return None
    try:
        value = json.loads(body) if isinstance(body, str) else body
    except ValueError as exc:
        return f"input does not match metadata.in of {step.component} v{step.version}: {exc}"
    errors = sorted(_validator(step.input_schema).iter_errors(value), key=lambda e: list(e.path))
    if not errors:
        return None
    shown = []
    for err in errors[:MAX_ERRORS]:
        where = "/".join(str(p) for p in err.absolute_path)
        shown.append((f"at {where}: " if where else "") + err.message)
    more = f" (and {len(errors) - MAX_ERRORS} more)" if len(errors) > MAX_ERRORS else ""
    return (
        f'input does not match metadata.in of {step.component} v{step.version} "{step.function}"'
        f" (validate_input): " + "; ".join(shown) + more
    )
