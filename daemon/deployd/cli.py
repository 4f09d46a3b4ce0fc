"""The `deployd` command line: parses, calls one function, formats the result.

Heavy imports (FastAPI, uvicorn, the pipeline) happen inside the commands that need them,
so read-only commands such as `status` start fast.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from .errors import DeploydError

app = typer.Typer(
    name="deployd",
    help="git push → new component version → real-time flows republished, no message lost.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
hook_app = typer.Typer(help="Install deployd's post-receive hook into bare repositories.")
app.add_typer(hook_app, name="hook")

_state: dict[str, bool] = {"debug": False}

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


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks and debug logs.")] = False,
) -> None:
    """deployd: git-driven deploys of integration components and real-time flows."""
    _state["debug"] = debug or bool(os.environ.get("DEPLOYD_DEBUG"))


def _load(config: Path | None) -> Any:
    from . import config as cfgmod

    return cfgmod.load(cfgmod.resolve_path(config))


def _print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def _console() -> Any:
    from rich.console import Console

    # soft_wrap: a line longer than the terminal (or than 80 columns when piped) stays one
    # line, so paths and messages can be copied and grepped.
    return Console(soft_wrap=True)


# -- serve / check-config -------------------------------------------------------------------


@app.command()
def serve(config: ConfigOpt = None) -> None:
    """Run the daemon in the foreground (SIGINT/SIGTERM stop it cleanly)."""
    cfg = _load(config)
    from .service import serve as run

    run(cfg, debug=_state["debug"])


@app.command("check-config")
def check_config(config: ConfigOpt = None) -> None:
    """Validate the config file; print a summary, or every problem and exit 2."""
    from .config import format_duration, redact_url
    from .runtime.node import detect as detect_node

    cfg = _load(config)
    d = cfg.daemon
    out = _console()
    out.print(f"config {cfg.path}: OK")
    out.print(f"  state_dir  {d.state_dir}")
    out.print(f"  listen     {d.listen}" + ("" if d.listen_is_loopback else "  (not loopback)"))
    out.print(f"  api_token  {'set' if d.api_token else 'generated into state_dir'}")
    node = detect_node(d.node)
    out.print(
        f"  node       {node.version} ({node.path})" if node.ok else f"  node       {node.error}",
        markup=False,
        highlight=False,
    )
    out.print(f"  components {len(cfg.components)}")
    for comp in cfg.components:
        where = "hosted" if comp.hosted else redact_url(comp.url or "")
        secret = "secret set" if comp.secret_configured else "no secret"
        out.print(
            f"    {comp.name:<24} branch {comp.branch:<12} {where}  "
            f"(build_timeout {format_duration(comp.build_timeout)}, {secret})",
            markup=False,
            highlight=False,
        )


# -- status / versions / builds -------------------------------------------------------------


@app.command()
def status(config: ConfigOpt = None, as_json: JsonOpt = False) -> None:
    """Show the daemon, every component's recent version and last build, and the flows."""
    from .client import live_status
    from .status import build_status, open_reader

    cfg = _load(config)
    data = live_status(cfg)
    if data is None:
        data = build_status(cfg, open_reader(cfg))
    if as_json:
        _print_json(data)
        return
    say = sys.stdout.write
    d = data["daemon"]
    if d["running"]:
        say(f"{_paint('daemon running', 'green')} (pid {d['pid']}) on {d['listen']}\n")
    else:
        say(f"{_paint('daemon not running', 'yellow')} (would listen on {d['listen']})\n")
    rows: list[list[tuple[str, str]]] = []
    for c in data["components"]:
        r, b = c["recent"], c["last_build"]
        last = ("-", "")
        if b:
            color = {"succeeded": "green", "failed": "red"}.get(b["status"], "yellow")
            text = f"#{b['id']} {b['status']}"
            if b["status"] == "failed" and b["error"]:
                text += f": {b['error'][:80]}"
            last = (text, color)
        rows.append(
            [
                (c["name"], ""),
                (c["branch"], ""),
                (
                    f"v{r['version']}" + (f" ({r['semver']})" if r["semver"] else "") if r else "-",
                    "",
                ),
                (r["sha"][:12] if r else "-", ""),
                (r["built_at"][:19].replace("T", " ") if r else "-", ""),
                last,
            ]
        )
    say(_grid(["component", "branch", "recent", "sha", "built", "last build"], rows) + "\n")
    rts = data.get("runtimes") or {}
    node = rts.get("node") or "not available (see `deployd check-config`)"
    say(f"runtimes: python {rts.get('python')}, node {node}\n")
    _print_flows_table(data.get("flows", []))
    paused = data.get("paused") or {}
    names = [f"flow {n}" for n in paused.get("flow", [])] + [
        f"component {n}" for n in paused.get("component", [])
    ]
    if names:
        say(_paint("paused: ", "yellow") + ", ".join(names) + "\n")
    disk = (data.get("disk") or {}).get("state_dir_bytes")
    if disk is not None:
        say(f"state_dir uses {disk / 1e6:.1f} MB\n")
    for part, err in (data.get("last_errors") or {}).items():
        if err:
            say(f"last {part[:-1]} error ({err['at'][:19]}): {err['message'][:150]}\n")


_ANSI = {"bold": "1", "red": "31", "green": "32", "yellow": "33"}


def _paint(text: str, style: str) -> str:
    """`text` in an ANSI style when stdout is a terminal (and NO_COLOR is unset)."""
    if not style or not sys.stdout.isatty() or os.environ.get("NO_COLOR"):
        return text
    return f"\033[{_ANSI[style]}m{text}\033[0m"


def _grid(headers: list[str], rows: list[list[tuple[str, str]]]) -> str:
    """(text, style) cells as aligned columns: a table without rich.

    rich's layout and markup passes cost ~150 ms for a few hundred rows, and `deployd status`
    has a 300 ms budget. Cell text is printed as written (no markup to escape).
    """
    widths = [max([len(h)] + [len(row[i][0]) for row in rows]) for i, h in enumerate(headers)]

    def line(cells: list[tuple[str, str]]) -> str:
        parts = []
        for i, (text, style) in enumerate(cells):
            pad = " " * (widths[i] - len(text)) if i < len(cells) - 1 else ""
            parts.append(_paint(text, style) + pad)
        return "  ".join(parts).rstrip()

    return "\n".join([line([(h, "bold") for h in headers]), *(line(row) for row in rows)])


def _print_flows_table(flows: list[dict[str, Any]]) -> None:
    """The flows of a status object as aligned columns."""
    if not flows:
        return
    rows: list[list[tuple[str, str]]] = []
    for f in flows:
        state, style = f["state"], {"running": "green", "failed": "red"}.get(f["state"], "")
        if f.get("needs_attention"):
            state, style = f"{state} needs attention: {f['needs_attention']}", "red"
        elif f.get("stale"):
            state, style = f"{state} (stale)", "yellow"
        last = f.get("last_deploy")
        last_s = "-"
        if last:
            last_s = f"{last['status']} -> v{last['to_version']}"
            if last.get("gap_ms") is not None:
                last_s += f" gap {last['gap_ms']:.1f} ms"
        rows.append(
            [
                (f["name"], ""),
                (state, style),
                (f"v{f['version']}" if f["version"] else "-", ""),
                (str(len(f["steps"])), ""),
                (f["update"], ""),
                (last_s, ""),
            ]
        )
    sys.stdout.write(_grid(["flow", "state", "version", "steps", "update", "last deploy"], rows))
    sys.stdout.write("\n")


@app.command()
def versions(
    component: Annotated[str, typer.Argument(help="Component name.")],
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """List a component's versions, newest first."""
    from .status import open_reader

    cfg = _load(config)
    _known_component(cfg, component)
    store = open_reader(cfg)
    rows = store.versions(component) if store else []
    recent = rows[0]["version"] if rows else None
    data = [
        {
            "version": r["version"],
            "sha": r["sha"],
            "semver": r["semver"],
            "runtime": r["runtime"],
            "built_at": r["built_at"],
            "recent": r["version"] == recent,
        }
        for r in rows
    ]
    if as_json:
        _print_json(data)
        return
    from rich.table import Table

    table = Table("version", "sha", "semver", "runtime", "built_at", "", box=None)
    for r in data:
        table.add_row(
            f"v{r['version']}",
            r["sha"][:12],
            r["semver"] or "-",
            r["runtime"],
            r["built_at"],
            "recent" if r["recent"] else "",
        )
    _console().print(table if data else f"{component} has no versions yet")


def _known_component(cfg: Any, name: str) -> None:
    if cfg.component(name) is None:
        known = ", ".join(c.name for c in cfg.components) or "none configured"
        raise DeploydError(f"unknown component {name!r} (known: {known})")


@app.command()
def builds(
    component: Annotated[str | None, typer.Argument(help="Only this component.")] = None,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
    limit: Annotated[int, typer.Option(help="How many builds to show.", min=1)] = 50,
) -> None:
    """List recent builds, newest first (all components, or one)."""
    from .status import open_reader

    cfg = _load(config)
    if component:
        _known_component(cfg, component)
    store = open_reader(cfg)
    rows = store.builds(component, limit=limit) if store else []
    data = [
        {
            k: r[k]
            for k in (
                "id",
                "component",
                "sha",
                "status",
                "version",
                "source",
                "error",
                "started_at",
                "finished_at",
            )
        }
        for r in rows
    ]
    if as_json:
        _print_json(data)
        return
    from rich.table import Table

    table = Table("id", "component", "sha", "status", "version", "source", "finished", box=None)
    for r in data:
        table.add_row(
            str(r["id"]),
            r["component"],
            r["sha"][:12],
            r["status"] + (f": {r['error'][:70]}" if r["error"] else ""),
            f"v{r['version']}" if r["version"] else "-",
            r["source"],
            (r["finished_at"] or "")[:19].replace("T", " "),
        )
    _console().print(table if data else "no builds yet")


@app.command("build-log")
def build_log(
    build_id: Annotated[int, typer.Argument(help="Build id (see `deployd builds`).")],
    config: ConfigOpt = None,
) -> None:
    """Print the full log of one build."""
    from .status import open_reader

    cfg = _load(config)
    store = open_reader(cfg)
    row = store.build(build_id) if store else None
    if row is None:
        raise DeploydError(f"no build {build_id} (see `deployd builds`)")
    if not row["log_path"] or not Path(row["log_path"]).exists():
        raise DeploydError(f"build {build_id} has no log (it never started running)")
    with open(row["log_path"], "rb") as fh:
        sys.stdout.buffer.write(fh.read())
    if row["error"]:
        sys.stdout.write(f"\n[deployd: build {build_id} failed: {row['error']}]\n")


# -- poll -----------------------------------------------------------------------------------


@app.command()
def poll(
    component: Annotated[str | None, typer.Argument(help="Only this component.")] = None,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Ask the running daemon to check remote repositories now (all polled ones, or one)."""
    from .client import call

    cfg = _load(config)
    if component:
        _known_component(cfg, component)
    data = call(cfg, "POST", "/api/v1/poll", json={"component": component})
    if as_json:
        _print_json(data)
        return
    results = data.get("polled", [])
    if not results:
        typer.echo("no component is polled (only remote or unwatched repositories are)")
    failed = False
    for r in results:
        if not r.get("ok"):
            failed = True
            typer.echo(f"{r['component']}: poll failed: {r.get('error')}")
            continue
        head = (r.get("head") or "")[:12] or "(no branch)"
        what = "queued for build" if r.get("queued") else "nothing new to build"
        typer.echo(f"{r['component']}: head {head}, {what}")
    if failed:
        raise typer.Exit(1)


# -- hook -----------------------------------------------------------------------------------


@hook_app.command("install")
def hook_install(
    bare_repo: Annotated[Path, typer.Argument(help="Path of an existing bare repository.")],
    component: Annotated[str, typer.Option("--component", help="Component it deploys.")],
    config: ConfigOpt = None,
) -> None:
    """Install the post-receive hook into BARE_REPO so its pushes deploy COMPONENT."""
    from .paths import Paths
    from .pipeline import git as gitops

    cfg = _load(config)
    _known_component(cfg, component)
    paths = Paths(cfg.state_dir)
    repo = bare_repo.resolve()
    comp = cfg.component(component)
    # The daemon builds from the component's own repository: a hook anywhere else would
    # report commits it cannot read.
    expected = None
    if comp.url is None:
        expected = paths.hosted_repo(component)
    elif comp.local:
        from .config import local_path

        expected = local_path(comp.url).resolve()
    if expected is not None and expected.resolve() != repo:
        raise DeploydError(
            f"component {component} deploys from {expected}, not {repo}; "
            f"set url = {str(repo)!r} for it in the config first"
        )
    paths.inbox.mkdir(parents=True, exist_ok=True)
    gitops.install_hook(repo, component, paths.inbox)
    typer.echo(f"installed deployd post-receive hook in {bare_repo} for component {component}")


from . import cli_flows, cli_ops  # noqa: E402  (register their commands on `app`)

_ = (cli_flows, cli_ops)


def main() -> None:
    """Console-script entry point: one line per error, named exit codes, no traceback."""
    try:
        app()
    except DeploydError as exc:
        if _state["debug"]:
            raise
        sys.stderr.write(f"deployd: error: {exc}\n")
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as exc:
        # Last resort: an error no adapter translated is still one line, not a traceback.
        if _state["debug"]:
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
