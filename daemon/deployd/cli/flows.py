"""`deployd flow …`, `deployd deploys` and `deployd logs`.

Commands that change running flows go through the daemon's HTTP API (with the bearer
token); commands that only read use the state database and the step logs directly, so they
work while the daemon is down.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from ..errors import DeploydError, FlowError, UnknownFlow
from .common import ConfigOpt, JsonOpt, load_config
from .render import (
    console,
    grid,
    print_deploys,
    print_flows_table,
    print_json,
    print_letter,
    print_letters,
    print_runs,
)

commands = typer.Typer()  # `deploys` and `logs`; `deployd.cli` adds them to its app
flow_app = typer.Typer(
    help="Flows: apply, publish, start, stop, inspect, roll back; run ordinary (scheduled) ones."
)

NameArg = Annotated[str, typer.Argument(help="Flow name.")]
StepOpt = Annotated[
    str | None, typer.Option("--step", help="Only this step (ID also means its mapper, ID:mapper).")
]
IdsOpt = Annotated[
    list[int] | None,
    typer.Option("--id", help="A dead letter id (repeat for more); see `deployd flow errors`."),
]
AllOpt = Annotated[bool, typer.Option("--all", help="Every dead letter (of --step, if given).")]


def _call(cfg: Any, method: str, path: str, body: Any = None) -> Any:
    from .client import call

    return call(cfg, method, path, json=body)


def _flow_path(name: str, action: str) -> str:
    """The API path of `action` on flow `name`; a name no flow can have is refused here."""
    from ..config import NAME_RE

    if not NAME_RE.match(name):
        raise UnknownFlow(
            name,
            f"unknown flow {name!r}: flow names are 1-63 lowercase letters, digits and '-' "
            "(see `deployd flow list`)",
        )
    return f"/api/v1/flows/{name}/{action}"


def _reader(cfg: Any) -> Any:
    from ..status import open_reader

    store = open_reader(cfg)
    if store is None:
        raise DeploydError("no state yet: the daemon has never run with this config")
    return store


def _print_result(res: dict[str, Any]) -> None:
    if res.get("type") == "ordinary":
        line = f"{res['flow']} v{res['version']}: {res['status']}"
        if res.get("next_run_at"):
            line += f", next run at {res['next_run_at']}"
        typer.echo(line)
        if res.get("needs_attention"):
            typer.echo(f"  needs attention: {res['needs_attention']}")
        return
    if res.get("draft"):
        probs = res.get("problems") or []
        typer.echo(
            f"draft of {res['flow']} saved" + (" — needs attention:" if probs else " (valid)")
        )
        for p in probs:
            typer.echo(f"  {p}")
        return
    status = res.get("status")
    line = f"{res['flow']} v{res.get('version')}: {status}"
    if status == "canary":
        from ..flows.canary import Plan, Settings

        c = res["canary"]
        plan = Plan(
            Settings(c["share"], c["duration"], c["min_messages"], c["max_error_rate"]),
            tuple(c["steps"]),
        )
        line += f" beside v{res['from_version']} (warm-up {res['warmup_ms']:.0f} ms), {plan.text()}"
        typer.echo(line)
        typer.echo(
            f"  `deployd flow show {res['flow']}` follows it; `deployd flow promote {res['flow']}`"
            f" or `deployd flow rollback {res['flow']}` ends it now"
        )
        return
    if res.get("warmup_ms") is not None:
        line += f" (warm-up {res['warmup_ms']:.0f} ms"
        line += f", gap {res['gap_ms']:.1f} ms)" if res.get("gap_ms") is not None else ")"
    if status == "promoted" and res.get("gap_ms") is not None:
        line += f" (gap {res['gap_ms']:.1f} ms)"
    if res.get("reason"):
        line += f": {res['reason']}"
    typer.echo(line)
    if status == "failed":
        raise typer.Exit(1)


@flow_app.command("apply")
def flow_apply(
    file: Annotated[Path, typer.Argument(help="Flow file (TOML).")],
    draft: Annotated[bool, typer.Option("--draft", help="Only create the draft.")] = False,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Create the flow (or a new draft of it) from FILE, then publish unless --draft."""
    from ..flows import model

    cfg = load_config(config)
    model.load(file)  # the same checks the daemon makes, before anything is sent
    res = _call(cfg, "POST", "/api/v1/flows/apply", {"text": file.read_text(), "draft": draft})
    print_json(res) if as_json else _print_result(res)


@flow_app.command("publish")
def flow_publish(
    name: NameArg,
    version: Annotated[
        str | None,
        typer.Option(
            "--version",
            help="COMPONENT@N: publish the active version with COMPONENT's steps moved to vN"
            " (also a quarantined version, on purpose) instead of the draft.",
        ),
    ] = None,
    force: Annotated[
        bool,
        typer.Option("--force", help="Publish even during a freeze window (recorded as forced)."),
    ] = False,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Publish the flow's draft as its next version (zero-downtime if it runs)."""
    from ..flows.deployer import parse_component_version

    body: dict[str, Any] = {}
    if version is not None:
        try:
            parse_component_version(version)
        except FlowError as exc:
            raise typer.BadParameter(str(exc), param_hint="--version") from None
        body["version"] = version
    if force:
        body["force"] = True
    res = _call(load_config(config), "POST", _flow_path(name, "publish"), body or None)
    print_json(res) if as_json else _print_result(res)


@flow_app.command("start")
def flow_start(name: NameArg, config: ConfigOpt = None) -> None:
    """Start a stopped flow at its active version."""
    res = _call(load_config(config), "POST", _flow_path(name, "start"))
    if res["state"] == "scheduled":
        typer.echo(f"{res['flow']}: scheduled, next run at {res['next_run_at']}")
        return
    typer.echo(f"{res['flow']}: running v{res['version']}")


@flow_app.command("stop")
def flow_stop(name: NameArg, config: ConfigOpt = None) -> None:
    """Stop a flow (in-flight messages finish; queued ones wait for the next start)."""
    res = _call(load_config(config), "POST", _flow_path(name, "stop"))
    typer.echo(f"{res['flow']}: stopped")


@flow_app.command("run")
def flow_run(
    name: NameArg,
    wait: Annotated[
        bool,
        typer.Option("--wait", help="Wait until the run finishes; exit 1 unless it succeeded."),
    ] = False,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Run an ordinary (scheduled) flow now, whatever its schedule."""
    cfg = load_config(config)
    res = _call(cfg, "POST", _flow_path(name, "run"))
    if wait:
        from ..store.runs import RunStore

        runs = RunStore(_reader(cfg))
        while (row := runs.run(int(res["run"]))) is not None and row["status"] == "running":
            time.sleep(0.1)
        from ..flows.runs import run_json

        res = run_json(row) if row is not None else res
    failed = wait and res["status"] != "succeeded"
    if as_json:
        print_json(res)
        if failed:
            raise typer.Exit(1)
        return
    line = f"{name}: run {res.get('id', res.get('run'))} {res['status']}"
    if res.get("finished_at"):
        line += f" ({res['handled']} message(s) handled)"
    typer.echo(line)
    for error in res.get("errors") or []:
        typer.echo(f"  {error}")
    if failed:
        raise typer.Exit(1)


@flow_app.command("runs")
def flow_runs(
    name: NameArg,
    limit: Annotated[int, typer.Option("--limit", min=1, max=1000, help="At most N runs.")] = 50,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """The runs of an ordinary (scheduled) flow, newest first."""
    from ..flows.runs import run_json
    from ..store import FlowStore
    from ..store.runs import RunStore

    store = _reader(load_config(config))
    if FlowStore(store).flow(name) is None:
        raise UnknownFlow(name)
    runs = [run_json(r) for r in RunStore(store).runs(name, limit)]
    if as_json:
        print_json(runs)
    elif not runs:
        typer.echo(f"{name} has no runs yet (`deployd flow run {name}` runs it now)")
    else:
        print_runs(runs)


@flow_app.command("rollback")
def flow_rollback(
    name: NameArg,
    to: Annotated[int | None, typer.Option("--to", help="Flow version to go back to.")] = None,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Publish an earlier flow version's steps as a new version (default: the previous one);
    during a canary, end it instead (the new version stops, the old one keeps running)."""
    res = _call(load_config(config), "POST", _flow_path(name, "rollback"), {"to": to})
    print_json(res) if as_json else _print_result(res)


@flow_app.command("promote")
def flow_promote(name: NameArg, config: ConfigOpt = None, as_json: JsonOpt = False) -> None:
    """End a canary in progress now: its new version takes over (recorded as promoted); fails
    when the flow has no canary in progress."""
    res = _call(load_config(config), "POST", _flow_path(name, "canary/promote"))
    print_json(res) if as_json else _print_result(res)


@flow_app.command("move")
def flow_move(
    name: NameArg,
    runtime: Annotated[str, typer.Option("--runtime", help="Where it goes: embedded or rabbitmq.")],
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Publish the active version onto another runtime, its queued messages carried across."""
    from ..types import RUNTIME_NAMES

    if runtime not in RUNTIME_NAMES:
        raise typer.BadParameter(
            f"{runtime!r} is not a runtime; use embedded or rabbitmq", param_hint="--runtime"
        )
    res = _call(load_config(config), "POST", _flow_path(name, "move"), {"runtime": runtime})
    print_json(res) if as_json else _print_result(res)


def _flow_data(cfg: Any, name: str) -> dict[str, Any]:
    from ..status import build_status
    from ..store import FlowStore
    from .client import live_status

    store = _reader(cfg)
    fs = FlowStore(store)
    flow = fs.flow(name)
    if flow is None:
        raise UnknownFlow(name)
    data = live_status(cfg) or build_status(cfg, store)
    summary = next(f for f in data["flows"] if f["name"] == name)
    draft = fs.draft(name)
    stats = fs.stats(name)
    return {
        **summary,
        "step_count": len(summary["steps"]),
        "draft": {
            "reason": draft["reason"],
            "problems": draft["problems"],
            "created_at": draft["created_at"],
            "steps": draft["steps"],
        }
        if draft
        else None,
        "stats": {
            k: {x: v[x] for x in ("processed", "failed", "restarts", "last_error")}
            for k, v in stats.items()
        },
    }


@flow_app.command("show")
def flow_show(name: NameArg, config: ConfigOpt = None, as_json: JsonOpt = False) -> None:
    """Show a flow: state, version, every step (mapper steps included), draft, queues."""
    data = _flow_data(load_config(config), name)
    if as_json:
        print_json(data)
        return

    out = console()
    state = data["state"] + (" (stale)" if data["stale"] else "")
    out.print(f"flow [bold]{name}[/] v{data['version']} — {state}, update={data['update']}")
    out.print(f"{data['step_count']} steps (mapper steps included)")
    if data["type"] == "ordinary":
        run = data.get("last_run")
        out.print(
            (f"last run: {run['id']} {run['status']}" if run else "no run yet")
            + f"; next run: {data.get('next_run_at') or 'not scheduled'}"
            + f" — `deployd flow runs {name}`",
            markup=False,
            highlight=False,
        )
    if data["needs_attention"]:
        out.print(f"[red]needs attention:[/] {data['needs_attention']}")
    if data.get("canary"):
        from ..flows.canary import describe

        out.print(describe(data["canary"]), markup=False, highlight=False)
    if data.get("url"):
        http = data.get("http") or {}
        out.print(
            f"url: POST {data['url']} (auth {http.get('auth')}, reply {http.get('reply')})",
            markup=False,
            highlight=False,
        )
    rows = [
        [
            (s["id"], ""),
            (s["kind"], ""),
            (s["component"] or "-", ""),
            (s["function"] or "-", ""),
            (f"v{s['version']}" if s["version"] else "-", ""),
            (s["state"], ""),
            (str(s["pid"] or "-"), ""),
            (str(data["queues"].get(s["id"], 0)), ""),
        ]
        for s in data["steps"]
    ]
    headers = ["step", "kind", "component", "function", "version", "state", "pid", "queued"]
    out.print(grid(headers, rows), markup=False, highlight=False)
    held = [s["id"] for s in data["steps"] if s.get("backpressure")]
    if held:
        out.print(f"held back (the next step's queue is full): {', '.join(held)}", markup=False)
    failed = [f"{s['id']} {s['dead_letters']}" for s in data["steps"] if s.get("dead_letters")]
    if data.get("dead_letters"):
        out.print(
            f"dead letters: {data['dead_letters']}"
            + (f" ({', '.join(failed)})" if failed else "")
            + f" — `deployd flow errors {name}`",
            markup=False,
            highlight=False,
        )
    if data.get("held"):
        out.print(data["held"], markup=False, highlight=False)
    elif data.get("freeze"):
        fz = data["freeze"]
        out.print(f"frozen until {fz['until']} ({fz['reason']})", markup=False, highlight=False)
    for q in data.get("quarantined") or []:
        out.print(
            f"quarantined: {q['component']} v{q['version']} since {q['created_at'][:19]}:"
            f" {q['reason']} (`deployd flow publish {name} --version"
            f" {q['component']}@{q['version']}` publishes it on purpose)",
            markup=False,
            highlight=False,
        )
    if data["draft"]:
        d = data["draft"]
        out.print(f"draft ({d['reason']}): " + ("; ".join(d["problems"]) or "valid"))
    last = data["last_deploy"]
    if last:
        when = f"at {last['finished_at']}" if last["finished_at"] else "in progress"
        out.print(f"last deploy: {last['status']} → v{last['to_version']} {when}")


@flow_app.command("errors")
def flow_errors(
    name: NameArg,
    step: StepOpt = None,
    letter_id: Annotated[
        int | None, typer.Option("--id", help="Show this dead letter whole.", min=1)
    ] = None,
    limit: Annotated[
        int | None,
        typer.Option("--limit", help="Show at most N (default: 100; --json: all).", min=1),
    ] = None,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """List a flow's dead letters (messages whose handling failed), newest first; --id shows
    one whole: its input, the versions that failed it, the error with its traceback."""
    from ..flows.letters import Letters

    letters = Letters(_reader(load_config(config)))
    if letter_id is not None:
        one = letters.one(name, letter_id, step)
        print_json(one) if as_json else print_letter(one)
        return
    rows = letters.listing(name, step)
    if as_json:
        print_json(rows[:limit] if limit else rows)
        return
    if not rows:
        where = f" step {step}" if step else ""
        typer.echo(f"flow {name}{where} has no dead letters")
        return
    print_letters(rows, limit or 100)


def _which(ids: list[int] | None, all_: bool, verb: str) -> list[int] | None:
    """The ids a retry or discard names (None: --all); exactly one of --id and --all."""
    if bool(ids) == all_:
        raise FlowError(
            f"flow {verb}: give either --id N (repeatable) or --all, "
            + ("not both" if all_ else "one of them is required")
        )
    return None if all_ else ids


def _errors_body(step: str | None, ids: list[int] | None) -> dict[str, Any]:
    return {"step": step, "ids": ids, "all": ids is None}


@flow_app.command("retry")
def flow_retry(
    name: NameArg,
    step: StepOpt = None,
    ids: IdsOpt = None,
    all_: AllOpt = False,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Put dead letters back at the end of their step's input queue, to be handled by the
    flow's current version (running or not); one that fails again comes back."""
    chosen = _which(ids, all_, "retry")
    res = _call(
        load_config(config), "POST", _flow_path(name, "errors/retry"), _errors_body(step, chosen)
    )
    if as_json:
        print_json(res)
        return
    line = f"{res['flow']}: {res['retried']} dead letter(s) put back for v{res['version']}"
    if res["failed"]:
        line += f"; {res['failed']} failed their mapping again"
    if res["skipped"]:
        skipped = ", ".join(map(str, res["skipped"]))
        line += f"; {len(res['skipped'])} left, their step is not in v{res['version']} ({skipped})"
    typer.echo(line)


@flow_app.command("discard")
def flow_discard(
    name: NameArg,
    step: StepOpt = None,
    ids: IdsOpt = None,
    all_: AllOpt = False,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Delete dead letters for good (recorded in `deployd history`)."""
    chosen = _which(ids, all_, "discard")
    res = _call(
        load_config(config), "POST", _flow_path(name, "errors/discard"), _errors_body(step, chosen)
    )
    if as_json:
        print_json(res)
        return
    typer.echo(f"{res['flow']}: {res['discarded']} dead letter(s) discarded")


@flow_app.command("manifests")
def flow_manifests(
    name: NameArg,
    version: Annotated[
        int | None,
        typer.Option("--version", min=1, help="Flow version (default: the active one)."),
    ] = None,
    config: ConfigOpt = None,
) -> None:
    """Print the Kubernetes YAML deployd applies for a flow version (Secret values hidden)."""
    import yaml

    from ..flows.manifests import manifests

    cfg = load_config(config)
    docs = manifests(cfg, _reader(cfg), name, version)
    typer.echo(yaml.safe_dump_all(docs, sort_keys=False, default_flow_style=False), nl=False)


@flow_app.command("list")
def flow_list(config: ConfigOpt = None, as_json: JsonOpt = False) -> None:
    """List the flows with their state and version."""
    from ..status import build_status
    from .client import live_status

    cfg = load_config(config)
    data = live_status(cfg) or build_status(cfg, _reader(cfg))
    if as_json:
        print_json(data["flows"])
        return
    if not data["flows"]:
        typer.echo("no flows yet (`deployd flow apply FILE`)")
        return
    print_flows_table(data["flows"])


@flow_app.command("history")
def flow_history(name: NameArg, config: ConfigOpt = None, as_json: JsonOpt = False) -> None:
    """A flow's versions and deployments, newest first."""
    from ..store import FlowStore

    fs = FlowStore(_reader(load_config(config)))
    if fs.flow(name) is None:
        raise UnknownFlow(name)
    versions = [
        {
            "version": v["version"],
            "created_at": v["created_at"],
            "reason": v["reason"],
            "steps": [
                {k: s[k] for k in ("id", "component", "function", "version")} for s in v["steps"]
            ],
        }
        for v in fs.flow_versions(name)
    ]
    deps = fs.deployments(name)
    if as_json:
        print_json({"versions": versions, "deployments": deps})
        return
    out = console()
    for v in versions:
        steps = ", ".join(f"{s['id']}={s['component']} v{s['version']}" for s in v["steps"])
        line = f"v{v['version']}  {v['created_at'][:19]}  {v['reason'] or ''}  [{steps}]"
        out.print(line, markup=False, highlight=False)  # "[...]" is data, not rich markup
    print_deploys(deps)


@commands.command("deploys")
def deploys(
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
    limit: Annotated[int, typer.Option(help="How many to show.", min=1)] = 50,
) -> None:
    """List deployments (publishes) of all flows, newest first, with warm-up and gap."""
    from ..store import FlowStore

    deps = FlowStore(_reader(load_config(config))).deployments(limit=limit)
    if as_json:
        print_json(deps)
    else:
        print_deploys(deps)


@commands.command("logs")
def logs(
    flow: Annotated[str, typer.Argument(help="Flow name.")],
    step: Annotated[str | None, typer.Option("--step", help="Only this step.")] = None,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing.")] = False,
    lines: Annotated[int, typer.Option("--lines", "-n", help="Lines to show first.")] = 50,
    config: ConfigOpt = None,
) -> None:
    """Print a flow's step logs (the output of its component code)."""
    from ..paths import Paths

    cfg = load_config(config)
    folder = Paths(cfg.state_dir).step_logs / flow
    if not folder.is_dir():
        raise UnknownFlow(flow, f"no logs for flow {flow!r} (unknown flow, or it never ran)")
    files = sorted(folder.glob("*.log"))
    if step:
        files = [f for f in files if f.stem == step]
        if not files:
            known = ", ".join(f.stem for f in sorted(folder.glob("*.log")))
            raise FlowError(f"flow {flow} has no step {step!r} with logs (steps: {known})")
    prefix = len(files) > 1
    offsets = {}
    for f in files:
        text = f.read_text(errors="replace").splitlines()[-lines:]
        for line in text:
            sys.stdout.write((f"[{f.stem}] " if prefix else "") + line + "\n")
        offsets[f] = f.stat().st_size
    sys.stdout.flush()
    while follow:
        time.sleep(0.25)  # a human-facing tail loop, not a test wait
        for f in files:
            size = f.stat().st_size
            if size > offsets[f]:
                with f.open("rb") as fh:
                    fh.seek(offsets[f])
                    chunk = fh.read().decode("utf-8", "replace")
                offsets[f] = size
                for line in chunk.splitlines():
                    sys.stdout.write((f"[{f.stem}] " if prefix else "") + line + "\n")
                sys.stdout.flush()
