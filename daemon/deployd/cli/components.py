"""Components and the daemon: serve, check-config, status, versions, builds, build-log, poll,
hook, component call.

Heavy imports (FastAPI, uvicorn, the pipeline) happen inside the commands that need them,
so read-only commands such as `status` start fast.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from ..errors import DeploydError, UnknownComponent
from .common import ConfigOpt, JsonOpt, load_config, state
from .render import console, grid, print_json, print_status

commands = typer.Typer()  # the top-level commands below; `deployd.cli` adds them to its app
hook_app = typer.Typer(help="Install deployd's post-receive hook into bare repositories.")
component_app = typer.Typer(help="Run a component's service verbs (dynamic metadata).")


# -- serve / check-config -------------------------------------------------------------------


@commands.command()
def serve(config: ConfigOpt = None) -> None:
    """Run the daemon in the foreground (SIGINT/SIGTERM stop it cleanly)."""
    cfg = load_config(config, secrets=True)
    from ..api.app import create_server
    from ..service import serve as run

    run(cfg, create_server, debug=state["debug"])


@commands.command("check-config")
def check_config(config: ConfigOpt = None) -> None:
    """Validate the config file; print a summary, or every problem and exit 2."""
    from ..config import format_duration, redact_url
    from ..toolchains.node import detect as detect_node

    cfg = load_config(config, secrets=True)
    d = cfg.daemon
    out = console()
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
    rabbit = cfg.runtime.rabbitmq
    out.print(
        f"  runtime    default {cfg.runtime.default}"
        + (
            f"; rabbitmq at {redact_url(rabbit.url.get_secret_value())} (placement"
            f" {rabbit.placement}, prefetch {rabbit.prefetch})"
            if rabbit.url is not None
            else "; rabbitmq not configured"
        ),
        markup=False,
        highlight=False,
    )
    out.print(
        "  secret_key "
        + ("set (refreshed credential keys are stored encrypted)" if d.secret_key else "not set")
        + ("" if d.secret_key or not cfg.credentials else " (emit('updateKeys') is refused)"),
        markup=False,
        highlight=False,
    )
    out.print(f"  components {len(cfg.components)}")
    for comp in cfg.components:
        where = "hosted" if comp.hosted else redact_url(comp.url or "")
        secret = "secret set" if comp.secret_configured else "no secret"
        out.print(
            f"    {comp.name:<24} branch {comp.branch:<12} {where}"
            + (f" path {comp.path}" if comp.path else "")
            + (f" paths {', '.join(comp.paths)}" if comp.paths else "")
            + f"  (build_timeout {format_duration(comp.build_timeout)}, {secret})",
            markup=False,
            highlight=False,
        )
    for comp in cfg.components:  # where commit statuses go; never the token
        if comp.report != "none":
            from ..outbox.providers import api_base

            out.print(
                f"    {comp.name:<24} reports to {comp.report} {comp.reported_repo}"
                f" at {api_base(comp)}",
                markup=False,
                highlight=False,
            )
    if cfg.notify:
        out.print(f"  notify     {len(cfg.notify)} target(s)")
    for i, target in enumerate(cfg.notify):  # not the url: it is a secret
        signed = ", signed" if target.secret is not None else ""
        out.print(
            f"    [[notify]] {i + 1}: {target.format}{signed}: {', '.join(target.events)}",
            markup=False,
            highlight=False,
        )
    out.print(f"  credentials {len(cfg.credentials)}")
    for cred in cfg.credentials:  # names only: the values are secrets
        fields = ", ".join(sorted(cred.fields)) or "no fields"
        out.print(
            f"    {cred.name:<24} component {cred.component:<16} fields {fields}",
            markup=False,
            highlight=False,
        )
    if cfg.freeze:
        out.print(f"  freeze     {len(cfg.freeze)} window(s), time zone {d.timezone}")
    for fz in cfg.freeze:
        when = (
            f"from {fz.from_.isoformat()} to {fz.to.isoformat()}"
            if fz.from_ is not None
            else f"{fz.schedule!r} for {format_duration(fz.duration or 0)}"
        )
        out.print(
            f"    {', '.join(fz.flows):<24} {when} ({fz.reason})", markup=False, highlight=False
        )


# -- status / versions / builds -------------------------------------------------------------


@commands.command()
def status(config: ConfigOpt = None, as_json: JsonOpt = False) -> None:
    """Show the daemon, every component's recent version and last build, and the flows."""
    from ..status import build_status, open_reader
    from .client import live_status

    cfg = load_config(config)
    data = live_status(cfg)
    if data is None:
        data = build_status(cfg, open_reader(cfg))
    if as_json:
        print_json(data)
        return
    print_status(data)


@commands.command()
def versions(
    component: Annotated[str, typer.Argument(help="Component name.")],
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """List a component's versions, newest first."""
    from ..status import open_reader

    cfg = load_config(config)
    _known_component(cfg, component)
    store = open_reader(cfg)
    rows = store.versions(component) if store else []
    recent = rows[0]["version"] if rows else None  # the highest sequence number wins
    data = [
        {
            "version": r["version"],
            "sha": r["sha"],
            "semver": r["semver"],
            # the older version with the same semver (a new commit, the version kept), or null
            "same_semver_as": next(
                (
                    o["version"]
                    for o in rows
                    if r["semver"] and o["version"] < r["version"] and o["semver"] == r["semver"]
                ),
                None,
            ),
            "runtime": r["runtime"],
            "built_at": r["built_at"],
            "recent": r["version"] == recent,
            "warnings": r["warnings"],
        }
        for r in rows
    ]
    if as_json:
        print_json(data)
        return
    if not data:
        sys.stdout.write(f"{component} has no versions yet\n")
        return
    # Aligned columns, each row one line (a warning is long: it stays whole, for grep).
    cells: list[list[tuple[str, str]]] = []
    for r in data:
        notes = ["recent"] if r["recent"] else []
        if r["same_semver_as"]:
            notes.append(f"same semver as v{r['same_semver_as']}")
        notes += [f"warning: {w}" for w in r["warnings"]]
        style = "yellow" if r["warnings"] else "green" if r["recent"] else ""
        cells.append(
            [
                (f"v{r['version']}", ""),
                (r["sha"][:12], ""),
                (r["semver"] or "-", ""),
                (r["runtime"], ""),
                (r["built_at"], ""),
                ("; ".join(notes), style),
            ]
        )
    sys.stdout.write(grid(["version", "sha", "semver", "runtime", "built_at", ""], cells) + "\n")


def _known_component(cfg: Any, name: str) -> None:
    if cfg.component(name) is None:
        known = ", ".join(c.name for c in cfg.components) or "none configured"
        raise UnknownComponent(f"unknown component {name!r} (known: {known})")


@commands.command()
def builds(
    component: Annotated[str | None, typer.Argument(help="Only this component.")] = None,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
    limit: Annotated[int, typer.Option(help="How many builds to show.", min=1)] = 50,
) -> None:
    """List recent builds, newest first (all components, or one)."""
    from ..status import open_reader

    cfg = load_config(config)
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
        print_json(data)
        return
    if not data:
        typer.echo("no builds yet")
        return
    from .render import ago, clip

    cells = [
        [
            (str(r["id"]), ""),
            (r["component"], ""),
            (r["sha"][:12], ""),
            (r["status"], {"succeeded": "green", "failed": "red"}.get(r["status"], "yellow")),
            (f"v{r['version']}" if r["version"] else "-", ""),
            (r["source"], ""),
            (ago(r["finished_at"]) if r["finished_at"] else "-", ""),
        ]
        for r in data
    ]
    notes = [f"error: {clip(r['error'], 300)}" if r["error"] else None for r in data]
    headers = ["id", "component", "sha", "status", "version", "source", "finished"]
    sys.stdout.write(grid(headers, cells, notes) + "\n")


@commands.command("build-log")
def build_log(
    build_id: Annotated[int, typer.Argument(help="Build id (see `deployd builds`).")],
    config: ConfigOpt = None,
) -> None:
    """Print the full log of one build."""
    from ..status import open_reader

    cfg = load_config(config)
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


@commands.command()
def poll(
    component: Annotated[str | None, typer.Argument(help="Only this component.")] = None,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Ask the running daemon to check remote repositories now (all polled ones, or one)."""
    from .client import call

    cfg = load_config(config)
    if component:
        _known_component(cfg, component)
    data = call(cfg, "POST", "/api/v1/poll", json={"component": component})
    if as_json:
        print_json(data)
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
    from ..paths import Paths
    from ..toolchains import git as gitops

    cfg = load_config(config)
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
        from ..config import local_path

        expected = local_path(comp.url).resolve()
    if expected is not None and expected.resolve() != repo:
        raise DeploydError(
            f"component {component} deploys from {expected}, not {repo}; "
            f"set url = {str(repo)!r} for it in the config first"
        )
    paths.inbox.mkdir(parents=True, exist_ok=True)
    gitops.install_hook(repo, component, paths.inbox, cfg.daemon.push_feedback_wait)
    typer.echo(f"installed deployd post-receive hook in {bare_repo} for component {component}")


@hook_app.command("feedback")
def hook_feedback(
    push: Annotated[str, typer.Argument(help="The push's record in the inbox (push.<stamp>).")],
    inbox: Annotated[Path, typer.Option("--inbox", help="The daemon's inbox folder.")],
    wait: Annotated[float, typer.Option("--wait", help="Seconds to follow it at most.")] = 60.0,
) -> None:
    """Print what the daemon does with PUSH (run by the post-receive hook; always exits 0)."""
    from .feedback import follow

    follow(inbox, push, wait)


# -- component call -------------------------------------------------------------------------


def _read_cfg(path: Path) -> dict[str, Any]:
    """The cfg of `--cfg FILE`: a JSON object (a .toml file: a TOML table); `${VAR}` stays as
    written here, the daemon expands it from its own environment."""
    import json
    import tomllib

    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise typer.BadParameter(f"{path} does not exist", param_hint="--cfg") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise typer.BadParameter(f"{path} cannot be read: {exc}", param_hint="--cfg") from None
    try:
        data = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    except (ValueError, RecursionError) as exc:
        kind = "TOML" if path.suffix == ".toml" else "JSON (or name it *.toml)"
        raise typer.BadParameter(f"{path} is not valid {kind}: {exc}", param_hint="--cfg") from None
    if not isinstance(data, dict):
        raise typer.BadParameter(
            f'{path} must hold an object (the step\'s cfg, e.g. {{"region": "eu"}})',
            param_hint="--cfg",
        )
    return data


@component_app.command("call")
def component_call(
    component: Annotated[str, typer.Argument(help="Component name.")],
    method: Annotated[
        str,
        typer.Argument(
            help="getMetaModel, selectModel (with --field) or a model method named by a field's "
            '"model" in component.json.'
        ),
    ],
    function: Annotated[
        str, typer.Option("--function", "-f", help="The trigger or action whose method it is.")
    ],
    cfg_file: Annotated[
        Path | None,
        typer.Option(
            "--config",
            "--cfg",
            help="The step's configuration: a JSON object file (or *.toml); ${VAR} is read "
            "from the daemon's environment, as in flow files. (Here --config is the step's, "
            "as on the platform; deployd's own config file is --daemon-config.)",
            show_default=False,
        ),
    ] = None,
    version: Annotated[
        int | None, typer.Option("--version", help="This version (default: the recent one).", min=1)
    ] = None,
    field: Annotated[
        str | None,
        typer.Option("--field", help='selectModel: the field whose "model" method to call.'),
    ] = None,
    timeout: Annotated[
        float, typer.Option("--timeout", help="Seconds the call may take.", min=0.1, max=300)
    ] = 30.0,
    credential: Annotated[
        str | None,
        typer.Option(
            "--credential",
            help="A [[credentials]] of the daemon config merged into the cfg, as for a step.",
        ),
    ] = None,
    daemon_config: Annotated[
        Path | None,
        typer.Option(
            "--daemon-config",
            help="deployd's config file (default: $DEPLOYD_CONFIG, ./config.toml, "
            "/etc/deployd/config.toml).",
            show_default=False,
        ),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Run METHOD of a component version's FUNCTION once in a step process; print its result."""
    from .client import call

    cfg = load_config(daemon_config)
    step_cfg = _read_cfg(cfg_file) if cfg_file is not None else {}
    body = {
        "method": method,
        "function": function,
        "config": step_cfg,
        "version": version,
        "field": field,
        "timeout": timeout,
        "credential": credential,
    }
    data = call(
        cfg, "POST", f"/api/v1/components/{component}/call", json=body, timeout=timeout + 30
    )
    if as_json:
        print_json(data)
        return
    result = data.get("result")
    if (
        data.get("method") != "getMetaModel"
        and isinstance(result, dict)
        and result
        and all(not isinstance(v, dict | list) for v in result.values())
    ):
        width = max(len(str(k)) for k in result)
        for key, label in result.items():  # a select model: value and label
            typer.echo(f"{key:<{width}}  {label}")
        return
    import json

    typer.echo(json.dumps(result, indent=2, ensure_ascii=False))
