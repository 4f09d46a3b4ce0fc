"""`deployd plan`: what a push of a commit or a working tree would do, registering nothing."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any

import typer

from ..errors import DeploydError, UnknownComponent
from .common import ConfigOpt, JsonOpt, load_config
from .render import print_json, print_plan

commands = typer.Typer()  # `deployd.cli` adds them to its app


@commands.command("plan")
def plan(
    component: Annotated[str, typer.Argument(help="Component name.")],
    sha: Annotated[
        str | None,
        typer.Option("--sha", help="Commit to plan, full or abbreviated (default: branch head)."),
    ] = None,
    tree: Annotated[
        Path | None,
        typer.Option(
            "--dir",
            help="Plan this working tree instead (built here, uncommitted changes included).",
            file_okay=False,
        ),
    ] = None,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Build a commit (or a working tree) in a scratch folder and show what a push of it
    would do to every flow; exit 0 all would publish, 3 any needs attention, 1 build fails."""
    from ..flows.plan import PlanError

    cfg = load_config(config)
    if cfg.component(component) is None:
        known = ", ".join(c.name for c in cfg.components) or "none"
        raise UnknownComponent(f"unknown component {component!r} (known: {known})")
    if sha is not None and tree is not None:
        raise PlanError("give --sha or --dir, not both")
    if sha is not None and not re.fullmatch(r"[0-9a-fA-F]{7,64}", sha.strip()):
        raise PlanError(f"--sha {sha[:80]!r} is not a commit sha (7 to 64 hex digits)")
    if tree is not None:
        res = _local(cfg, component, tree.resolve())
    else:
        from .client import call

        # A build may take build_timeout; the daemon answers when it is done.
        timeout = max(120.0, cfg.component(component).build_timeout + 60.0)
        res = call(cfg, "POST", f"/api/v1/plan/{component}", json={"sha": sha}, timeout=timeout)
    if as_json:
        print_json(res)
    else:
        print_plan(res)
    raise typer.Exit(int(res.get("exit_code", 1)))


def _local(cfg: Any, component: str, tree: Path) -> dict[str, Any]:
    """Plan a working tree in this process: built in a private temporary folder, against
    the flows in the state database (read-only); no step process, so no getMetaModel."""
    import asyncio

    from ..flows.plan import Planner
    from ..paths import Paths
    from ..pauses import Pauses
    from ..store import Store

    if not tree.is_dir():
        raise DeploydError(f"--dir {tree}: no such directory")
    store = Store.readonly(Paths(cfg.state_dir).db)
    if store is None:
        raise DeploydError(
            f"no state database at {Paths(cfg.state_dir).db}: start the daemon once "
            "(`deployd serve`) so there are flows to plan against"
        )
    try:
        pauses = Pauses(store)
        pauses.load()
        planner = Planner(cfg, store, None, paused=pauses.flow)
        return asyncio.run(planner.plan(component, tree=tree))
    finally:
        store.close()
