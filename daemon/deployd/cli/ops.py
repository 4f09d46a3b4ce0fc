"""Operator commands: `deployd history`, `pause`, `resume`, `redeploy`, `gc`."""

from __future__ import annotations

import sys
from typing import Annotated, Any

import typer

from ..errors import UnknownComponent
from .common import ConfigOpt, JsonOpt, load_config
from .render import print_json

commands = typer.Typer()  # the commands below; `deployd.cli` adds them to its app


def _call(cfg: Any, path: str, body: Any = None) -> Any:
    from .client import call

    return call(cfg, "POST", path, json=body)


@commands.command("history")
def history(
    component: Annotated[
        str | None, typer.Option("--component", help="Only this component.")
    ] = None,
    flow: Annotated[str | None, typer.Option("--flow", help="Only this flow.")] = None,
    limit: Annotated[int, typer.Option(help="How many events to show.", min=1)] = 100,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """The event log: pushes, builds, versions, drafts and deploys, newest first."""
    import json

    from ..status import open_reader

    cfg = load_config(config)
    store = open_reader(cfg)
    rows = store.events(component=component, flow=flow, limit=limit) if store else []
    for row in rows:
        row["detail"] = json.loads(row["detail"]) if row["detail"] else None
    if as_json:
        print_json(rows)
        return
    if not rows:
        typer.echo("no events yet")
        return
    from .render import grid

    cells = [
        [
            (r["ts"][5:19].replace("T", " "), ""),
            (r["kind"], ""),
            (" ".join(x for x in (r["component"], r["flow"]) if x) or "-", ""),
        ]
        for r in rows
    ]
    notes = [r["message"] for r in rows]
    sys.stdout.write(grid(["time (UTC)", "event", "of"], cells, notes) + "\n")


@commands.command("pause")
def pause(
    name: Annotated[str, typer.Argument(help="A flow or component name.")],
    config: ConfigOpt = None,
) -> None:
    """Pause automatic redeploys of a flow, or builds of a component (shown in status)."""
    res = _call(load_config(config), "/api/v1/pause", {"name": name})
    typer.echo(f"paused {name} ({', '.join(res['paused'])})")


@commands.command("resume")
def resume(
    name: Annotated[str, typer.Argument(help="A flow or component name.")],
    config: ConfigOpt = None,
) -> None:
    """Resume a paused flow or component; what was held back is built or published now."""
    res = _call(load_config(config), "/api/v1/resume", {"name": name})
    line = f"resumed {name} ({', '.join(res['resumed'])})"
    if res.get("builds_queued"):
        line += f"; {res['builds_queued']} build(s) queued"
    if res.get("publish"):
        line += f"; published v{res['publish'].get('version')}: {res['publish'].get('status')}"
    typer.echo(line)


@commands.command("redeploy")
def redeploy(
    component: Annotated[str, typer.Argument(help="Component name.")],
    sha: Annotated[
        str | None, typer.Option("--sha", help="Commit to deploy (default: branch head).")
    ] = None,
    config: ConfigOpt = None,
) -> None:
    """Rebuild a commit (even one whose build failed) or redeploy its version to the flows."""
    cfg = load_config(config)
    if cfg.component(component) is None:
        raise UnknownComponent(f"unknown component {component!r}")
    res = _call(cfg, f"/api/v1/components/{component}/redeploy", {"sha": sha})
    if res.get("version"):
        typer.echo(f"{component} v{res['version']} ({res['sha'][:12]}): redeploying to its flows")
    else:
        typer.echo(f"{component} {res['sha'][:12]}: build queued")


@commands.command("gc")
def gc(config: ConfigOpt = None, as_json: JsonOpt = False) -> None:
    """Run retention now: old version folders, build logs and dead letters; prints what was
    removed."""
    res = _call(load_config(config), "/api/v1/gc")
    if as_json:
        print_json(res)
        return
    typer.echo(
        f"removed {len(res['versions_pruned'])} version folder(s), "
        f"{res['build_logs_deleted']} build log(s), "
        f"{res.get('dead_letters_expired', 0)} dead letter(s); freed {res['freed_bytes']} bytes; "
        f"state_dir uses {res['state_dir_bytes']} bytes"
    )
