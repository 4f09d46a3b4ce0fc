"""`${VAR}` in a flow file's `[variables]` and steps' `env`: secrets from deployd's environment.

The flow file, and so the database, `flow show`, status and the API, keep the reference as
written; the value is read from the daemon's environment only when a flow version's steps are
started, and goes to the step processes and nowhere else. deployd's own secrets cannot be read
this way: names that its config file mentions and `DEPLOYD_*` names are refused.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from ..config import Config, env_value
from ..errors import FlowError
from .model import FlowSpec

REF_RE = re.compile(r"\$\{([^}]*)\}")
NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _problem(name: str, config: Config) -> str | None:
    """Why `${name}` cannot be expanded (None: it can)."""
    if not NAME_RE.match(name):
        return f"${{{name}}} is not an environment variable reference (write ${{NAME}})"
    if name.startswith("DEPLOYD_") or name in config.own_env:
        return (
            f"${{{name}}} is one of deployd's own settings (its config file uses it, or it "
            "starts with DEPLOYD_), which steps never get; export the step's secret under "
            "another name"
        )
    if env_value(name) is None:
        return (
            f"environment variable {name} is not set in deployd's environment (set it where "
            "deployd is started, e.g. the systemd unit's EnvironmentFile, and restart it)"
        )
    return None


def problems(spec: FlowSpec, config: Config) -> list[str]:
    """Every `${VAR}` of `spec` that cannot be expanded, as `key.path: what` lines."""
    out = []
    tables: list[tuple[str, Mapping[str, str]]] = [("variables", spec.variables)]
    tables += [(f"steps[{i}].env", s.env) for i, s in enumerate(spec.steps)]
    tables += [(f"steps[{i}]", {"secret": s.secret}) for i, s in enumerate(spec.steps) if s.secret]
    for where, table in tables:
        for key, value in table.items():
            for name in REF_RE.findall(value):
                problem = _problem(name, config)
                if problem is not None:
                    out.append(f"{where}.{key}: {problem}")
    return out


def expand(table: Mapping[str, str], where: str, config: Config) -> dict[str, str]:
    """`table` with every `${VAR}` replaced by its value; FlowError names the first that
    cannot be (the variable was unset since the flow was applied, say)."""

    out = {}
    for key, value in table.items():

        def sub(match: re.Match[str], key: str = key) -> str:
            name = match.group(1)
            problem = _problem(name, config)
            if problem is not None:
                raise FlowError(f"{where}.{key}: {problem}")
            return env_value(name) or ""

        out[key] = REF_RE.sub(sub, value)
    return out
