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


def load_config(config: Path | None, require_secrets: bool = False) -> Any:
    """The validated config from `--config` (or the default places); ConfigError if invalid.

    `require_secrets` for `serve` and `check-config`: the daemon's own secrets (report tokens,
    notify urls) must then be set in the environment; other commands never use them."""
    from .. import config as cfgmod

    return cfgmod.load(cfgmod.resolve_path(config), require_secrets=require_secrets)
