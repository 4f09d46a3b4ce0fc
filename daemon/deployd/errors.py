"""Every error deployd raises on purpose, under one root.

    DeploydError
    ├── ConfigError        the config file is missing, unreadable or invalid (exit 2)
    ├── StateError         the state directory or database cannot be used
    ├── ComponentError     a component.json or component tree is invalid
    ├── BuildError         a build or test command failed or timed out
    ├── GitError           a git operation failed (bad ref, missing commit, unreadable repo)
    ├── FlowError          a flow file, draft or publish is invalid
    │   └── UnknownFlow    no flow of that name (exit 1, as every "no such …")
    ├── UnknownComponent   no component of that name in the config (exit 1)
    ├── DaemonError        the CLI could not reach, or was refused by, the running daemon
    └── WebhookError       a webhook request is not acceptable (carries an HTTP status)

The CLI catches `DeploydError` once, prints its message on one line and exits with
`exit_code`. Foreign errors are translated where they happen, with ``raise ... from exc``.
"""

from __future__ import annotations


class DeploydError(Exception):
    """Root of all deployd errors; the message is meant for a person."""

    exit_code = 1


class ConfigError(DeploydError):
    """The configuration is invalid; `problems` holds one `key.path: what is wrong` per line."""

    exit_code = 2

    def __init__(self, message: str, problems: list[str] | None = None) -> None:
        self.problems = problems or []
        super().__init__(message)

    def __str__(self) -> str:
        if not self.problems:
            return self.args[0]
        return self.args[0] + "\n" + "\n".join(f"  {p}" for p in self.problems)


class StateError(DeploydError):
    """The state directory or its database cannot be used."""


class ComponentError(DeploydError):
    """A component tree or its component.json is invalid."""


class BuildError(DeploydError):
    """A build or test command failed, or ran past its timeout."""


class GitError(DeploydError):
    """A git operation failed."""


class FlowError(DeploydError):
    """A flow file, draft or publish request is invalid."""

    exit_code = 2


class UnknownFlow(FlowError):
    """No flow has this name. Every command exits 1 for a name that does not exist (a flow,
    a component, a build: something missing), 2 only for a usage or config problem."""

    exit_code = 1

    def __init__(self, name: str, message: str | None = None) -> None:
        self.name = name
        super().__init__(message or f"unknown flow {name!r} (see `deployd flow list`)")


class UnknownComponent(DeploydError):
    """No component of this name is configured (exit 1, as `UnknownFlow`)."""


class FlowFrozen(FlowError):
    """A publish a person asked for falls in a freeze window (`--force` publishes anyway)."""


class NoCanary(FlowError):
    """`flow promote` (or ending a canary by hand) on a flow with no canary in progress."""


class DaemonError(DeploydError):
    """The running daemon could not be reached or refused a request."""


class WebhookError(DeploydError):
    """A webhook request was refused; `status` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str) -> None:
        self.status = status
        super().__init__(message)


def key_path(loc: tuple[int | str, ...]) -> str:
    """A validation error's location as people write it: `components[1].name`.

    A key holding a newline or NUL is quoted, so every problem stays on one line.
    """
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            text = part if part and part.isprintable() else repr(part)
            out += ("." if out else "") + text
    return out or "(top level)"
