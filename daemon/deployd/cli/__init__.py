"""The `deployd` command line: parses, calls one function, formats the result.

The commands live in one module per subject (`components`, `flows`, `ops`), which share
`common` (options, config) and `render` (printing); this module assembles them into `app`
and is the console-script entry point. Heavy imports (FastAPI, uvicorn, the pipeline)
happen inside the commands that need them, so read-only commands such as `status` start fast.
"""

from __future__ import annotations

import os
import sys
from typing import Annotated

import typer

from ..errors import DeploydError
from . import components, credentials, flows, ops, plan
from .common import state

app = typer.Typer(
    name="deployd",
    help="git push → new component version → real-time flows republished, no message lost.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
# In this order, which is the order of `deployd --help`: top-level commands, then the groups.
for part in (components.commands, plan.commands, flows.commands, ops.commands):
    app.registered_commands.extend(part.registered_commands)
app.add_typer(components.hook_app, name="hook")
app.add_typer(components.component_app, name="component")
app.add_typer(credentials.credential_app, name="credential")
app.add_typer(flows.flow_app, name="flow")


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks and debug logs.")] = False,
) -> None:
    """deployd: git-driven deploys of integration components and real-time flows."""
    state["debug"] = debug or bool(os.environ.get("DEPLOYD_DEBUG"))


def main() -> None:
    """Console-script entry point: one line per error, named exit codes, no traceback."""
    try:
        app()
    except DeploydError as exc:
        if state["debug"]:
            raise
        sys.stderr.write(f"deployd: error: {exc}\n")
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as exc:
        # Last resort: an error no adapter translated is still one line, not a traceback.
        if state["debug"]:
            raise
        import sqlite3

        what = " ".join(str(exc).split())
        if isinstance(exc, sqlite3.Error):
            hint = (
                "the state database cannot be read; if deployd was just upgraded, start "
                "`deployd serve` once so it upgrades the database"
            )
        else:
            hint = "unexpected error; run with --debug for the traceback"
        sys.stderr.write(f"deployd: error: {type(exc).__name__}: {what} ({hint})\n")
        sys.exit(1)
