"""What every command shares: the `--config` and `--json` options, the debug flag, the config."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

# Set by the root callback (`--debug` or $DEPLOYD_DEBUG); read by `serve` and `main()`.
state: dict[str, bool] = {"debug": False}

ConfigOpt = Annotated[
    Path | None,
    typer.Option(
        "--config",
        "-c",
        help="Config file (default: $DEPLOYD_CONFIG, ./config.toml, /etc/deployd/config.toml).",
        show_default=False,
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


def load_config(config: Path | None, secrets: bool = False) -> Any:
    """The validated config from `--config` (or the default places); ConfigError if invalid.

    The CLI's commands read the state or ask the daemon (which has its own environment), so
    a `${VAR}` secret not set in the caller's shell is no error for them (`secrets=False`:
    the key is left out); `serve` and `check-config`, which need or check it, pass True."""
    from .. import config as cfgmod

    return cfgmod.load(cfgmod.resolve_path(config), secrets=secrets)
