"""Credentials: `deployd credential list` and `deployd credential verify NAME`.

`list` reads the config and the state database (never a value: names of fields and of
refreshed keys only); `verify` asks the running daemon, which runs the component's
verifyCredentials in a one-off step process. Exit codes of `verify`: 0 verified, 1 not
verified, 2 it could not run (unknown credential, no version, the verifier failed to load or
timed out, the daemon is not reachable), 3 the component has no verifier (nothing checked).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..errors import DeploydError
from .common import JsonOpt, load_config
from .render import grid, print_json

credential_app = typer.Typer(help="The config's [[credentials]]: list them, verify one.")

EXIT_VERIFIED, EXIT_NOT_VERIFIED, EXIT_NOT_RUN, EXIT_NO_VERIFIER = 0, 1, 2, 3

DaemonConfigOpt = Annotated[
    Path | None,
    typer.Option(
        "--daemon-config",
        "--config",
        "-c",
        help="deployd's config file (default: $DEPLOYD_CONFIG, ./config.toml, "
        "/etc/deployd/config.toml).",
        show_default=False,
    ),
]


class VerifyError(DeploydError):
    """The verification could not run."""

    exit_code = EXIT_NOT_RUN


@credential_app.command("list")
def credential_list(config: DaemonConfigOpt = None, as_json: JsonOpt = False) -> None:
    """Every credential: its name, component, field names and refreshed keys (no values)."""
    from ..paths import Paths
    from ..runtime.credentials import Credentials
    from ..store import Store

    cfg = load_config(config)
    store = Store.readonly(Paths(cfg.state_dir).db)
    try:
        rows = Credentials(cfg, store).describe()
    finally:
        if store is not None:
            store.close()
    if as_json:
        print_json(rows)
        return
    if not rows:
        typer.echo("no credentials (add [[credentials]] tables to the daemon config)")
        return
    table = []
    for row in rows:
        refreshed = row["refreshed"]
        if refreshed is None:
            note = "-"
        else:
            note = f"{', '.join(refreshed['fields'])} at {refreshed['updated_at']}"
            if not refreshed["used"]:
                note += " (stored for another component: not used)"
        table.append(
            [
                (row["name"], ""),
                (row["component"], ""),
                (", ".join(row["fields"]) or "-", ""),
                (note, ""),
            ]
        )
    typer.echo(grid(["NAME", "COMPONENT", "FIELDS", "REFRESHED KEYS"], table))


@credential_app.command("verify")
def credential_verify(
    name: Annotated[str, typer.Argument(help="The credential's name ([[credentials]] name).")],
    version: Annotated[
        int | None,
        typer.Option("--version", help="The component version (default: the recent one).", min=1),
    ] = None,
    timeout: Annotated[
        float, typer.Option("--timeout", help="Seconds the check may take.", min=0.1, max=300)
    ] = 30.0,
    config: DaemonConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Run the verifyCredentials of NAME's component with its fields; print `verified` or
    `not verified: REASON` (exit 0 verified, 1 not verified, 2 could not run, 3 no verifier)."""
    from ..errors import DaemonError
    from .client import call

    cfg = load_config(config)
    body = {"version": version, "timeout": timeout}
    try:
        data = call(
            cfg, "POST", f"/api/v1/credentials/{name}/verify", json=body, timeout=timeout + 30
        )
    except DaemonError as exc:
        raise VerifyError(str(exc)) from exc
    verified = data.get("verified") if isinstance(data, dict) else None
    if as_json:
        print_json(data)
    elif verified is True:
        typer.echo("verified")
    elif verified is False:
        typer.echo(f"not verified: {data.get('reason')}")
    else:
        typer.echo(f"no verifier: {data.get('reason')}")
    if verified is True:
        return
    raise typer.Exit(EXIT_NOT_VERIFIED if verified is False else EXIT_NO_VERIFIER)
