"""Printing: JSON, the plain aligned tables `status` and `flow list` use, and rich's console.

`deployd status` has a 300 ms budget, so its tables are laid out here by hand (`grid`);
rich is imported only when a rich table or console is printed.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any


def print_json(data: Any) -> None:
    """`data` as indented JSON on stdout (dates and paths as strings)."""
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def console() -> Any:
    """A rich console on stdout."""
    from rich.console import Console

    # soft_wrap: a line longer than the terminal (or than 80 columns when piped) stays one
    # line, so paths and messages can be copied and grepped.
    return Console(soft_wrap=True)


_ANSI = {"bold": "1", "red": "31", "green": "32", "yellow": "33"}


def paint(text: str, style: str) -> str:
    """`text` in an ANSI style when stdout is a terminal (and NO_COLOR is unset)."""
    if not style or not sys.stdout.isatty() or os.environ.get("NO_COLOR"):
        return text
    return f"\033[{_ANSI[style]}m{text}\033[0m"


def grid(headers: list[str], rows: list[list[tuple[str, str]]]) -> str:
    """(text, style) cells as aligned columns: a table without rich.

    rich's layout and markup passes cost ~150 ms for a few hundred rows, and `deployd status`
    has a 300 ms budget. Cell text is printed as written (no markup to escape).
    """
    widths = [max([len(h)] + [len(row[i][0]) for row in rows]) for i, h in enumerate(headers)]

    def line(cells: list[tuple[str, str]]) -> str:
        parts = []
        for i, (text, style) in enumerate(cells):
            pad = " " * (widths[i] - len(text)) if i < len(cells) - 1 else ""
            parts.append(paint(text, style) + pad)
        return "  ".join(parts).rstrip()

    return "\n".join([line([(h, "bold") for h in headers]), *(line(row) for row in rows)])


def print_flows_table(flows: list[dict[str, Any]]) -> None:
    """The flows of a status object as aligned columns."""
    if not flows:
        return
    rows: list[list[tuple[str, str]]] = []
    for f in flows:
        state, style = f["state"], {"running": "green", "failed": "red"}.get(f["state"], "")
        if f.get("runtime") not in (None, "embedded"):
            state += f" on {f['runtime']}"
        if f.get("dead_letters"):
            state += f", {f['dead_letters']} dead letter{'s' if f['dead_letters'] != 1 else ''}"
            style = style if style == "red" else "yellow"
        if f.get("held"):
            state += f", {f['held']}"
            style = style if style == "red" else "yellow"
        elif f.get("freeze"):
            state += f", frozen until {f['freeze']['until']} ({f['freeze']['reason']})"
        if f.get("quarantined"):
            state += ", quarantined: " + ", ".join(
                f"{q['component']} v{q['version']}" for q in f["quarantined"]
            )
            style = style if style == "red" else "yellow"
        if f.get("canary"):
            c = f["canary"]
            state += f", canary v{c['version']} ({c['share'] * 100:.4g}%)"
            style = style if style == "red" else "yellow"
        if f.get("needs_attention"):
            state, style = f"{state} needs attention: {f['needs_attention']}", "red"
        elif f.get("stale"):
            state, style = f"{state} (stale)", "yellow"
        last = f.get("last_deploy")
        last_s = "-"
        if f.get("type") == "ordinary":
            last_s = _runs_cell(f.get("last_run"), f.get("next_run_at"))
        elif last:
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
    sys.stdout.write(grid(["flow", "state", "version", "steps", "update", "last deploy"], rows))
    sys.stdout.write("\n")
    for f in flows:
        if f.get("canary"):
            from ..flows.canary import describe

            sys.stdout.write(f"flow {f['name']}: {describe(f['canary'])}\n")
        if f.get("url"):
            http = f.get("http") or {}
            sys.stdout.write(
                f"flow {f['name']} takes requests at POST {f['url']} "
                f"(auth {http.get('auth')}, reply {http.get('reply')})\n"
            )


def _runs_cell(last: dict[str, Any] | None, next_at: str | None) -> str:
    """An ordinary flow's last run and next due time, for the flows table."""
    out = f"run {last['id']} {last['status']}" if last else "no run yet"
    return out + (f", next {next_at[:19].replace('T', ' ')} UTC" if next_at else ", not scheduled")


def print_runs(runs: list[dict[str, Any]]) -> None:
    """The runs of an ordinary flow, newest first."""
    from rich.table import Table

    table = Table("id", "status", "cause", "started", "finished", "steps", "handled", "errors")
    for r in runs:
        steps = ", ".join(f"{s['id']}={s['component']} v{s['version']}" for s in r["steps"])
        errors = r["errors"] or []
        table.add_row(
            str(r["id"]),
            r["status"],
            r["cause"],
            (r["started_at"] or "")[:19],
            (r["finished_at"] or "")[:19],
            steps or "-",
            str(r["handled"]),
            (errors[0][:80] + (f" (+{len(errors) - 1})" if len(errors) > 1 else ""))
            if errors
            else "-",
        )
    console().print(table)


def print_status(data: dict[str, Any]) -> None:
    """A status object (`deployd status --json`) as the human-readable summary."""
    say = sys.stdout.write
    d = data["daemon"]
    if d["running"]:
        say(f"{paint('daemon running', 'green')} (pid {d['pid']}) on {d['listen']}\n")
    else:
        say(f"{paint('daemon not running', 'yellow')} (would listen on {d['listen']})\n")
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
    say(grid(["component", "branch", "recent", "sha", "built", "last build"], rows) + "\n")
    rts = data.get("runtimes") or {}
    node = rts.get("node") or "not available (see `deployd check-config`)"
    say(f"runtimes: python {rts.get('python')}, node {node}\n")
    broker = data.get("broker")
    if broker:
        error = f": {broker['error']}" if broker.get("error") else ""
        say(f"broker: {broker['state']} ({broker['url']}){error}\n")
    print_flows_table(data.get("flows", []))
    paused = data.get("paused") or {}
    names = [f"flow {n}" for n in paused.get("flow", [])] + [
        f"component {n}" for n in paused.get("component", [])
    ]
    if names:
        say(paint("paused: ", "yellow") + ", ".join(names) + "\n")
    disk = (data.get("disk") or {}).get("state_dir_bytes")
    if disk is not None:
        say(f"state_dir uses {disk / 1e6:.1f} MB\n")
    for part, err in (data.get("last_errors") or {}).items():
        if err:
            say(f"last {part[:-1]} error ({err['at'][:19]}): {err['message'][:150]}\n")


def _when(iso: str) -> str:
    return iso[:19].replace("T", " ")


def print_letters(rows: list[dict[str, Any]], limit: int) -> None:
    """Dead letters (newest first) as aligned columns: id, step, time, attempts, error."""
    shown = rows[:limit]
    table = [
        [
            (str(r["id"]), ""),
            (r["step"], ""),
            (_when(r["created_at"]), ""),
            (str(r["attempts"]), ""),
            (r["error"][:200], "red"),
        ]
        for r in shown
    ]
    sys.stdout.write(grid(["id", "step", "time", "attempts", "error"], table) + "\n")
    if len(rows) > len(shown):
        sys.stdout.write(f"… and {len(rows) - len(shown)} older (--limit N, or --json for all)\n")


def print_letter(letter: dict[str, Any]) -> None:
    """One dead letter whole: where it failed, its input, the error, what it emitted first."""
    say = sys.stdout.write
    version = (
        f"{letter['component']} v{letter['component_version']}" if letter["component"] else "-"
    )
    say(f"dead letter {letter['id']} of flow {letter['flow']}, step {letter['step']}\n")
    say(f"  message id:  {letter['msg_id']}\n")
    say(f"  failed at:   {_when(letter['created_at'])} (attempts: {letter['attempts']})\n")
    say(f"  by:          flow v{letter['flow_version']}, {version}\n")
    say("error:\n")
    for line in letter["error"].splitlines():
        say(f"  {line}\n")
    say("body:\n" + _indent(letter["body"]))
    say("headers:\n" + _indent(letter["headers"]))
    if letter.get("passthrough"):
        say("passthrough (earlier steps' outputs):\n" + _indent(letter["passthrough"]))
    if letter.get("attachments"):
        say("attachments:\n" + _indent(letter["attachments"]))
    emitted = letter.get("emitted") or []
    if emitted:
        say(f"emitted before failing ({len(emitted)}, delivered all the same):\n")
        for out in emitted:
            say(_indent(out))


def _indent(data: Any) -> str:
    text = json.dumps(data, indent=2, default=str)
    return "".join(f"  {line}\n" for line in text.splitlines())


def print_deploys(deps: list[dict[str, Any]]) -> None:
    """Deployments (publishes) as a table, with warm-up and switch-over gap."""
    from rich.table import Table

    table = Table("id", "flow", "from", "to", "status", "trigger", "warm-up", "gap", "finished")
    for d in deps:
        trig = d["trigger"] or ""
        if d["component"]:
            trig += f" ({d['component']} v{d['component_version']})"
        table.add_row(
            str(d["id"]),
            d["flow"],
            f"v{d['from_version']}" if d["from_version"] else "-",
            f"v{d['to_version']}",
            d["status"]
            + (f": {d['reason'][:60]}" if d["reason"] else "")
            + (f", {d['redriven']} re-driven" if d.get("redriven") else ""),
            trig,
            f"{d['warmup_ms']:.0f} ms" if d["warmup_ms"] is not None else "-",
            f"{d['gap_ms']:.1f} ms" if d["gap_ms"] is not None else "-",
            (d["finished_at"] or "")[:19],
        )
    console().print(table)


def print_plan(res: dict[str, Any]) -> None:
    """`deployd plan`: the build, then each affected flow's step changes, problems, schema
    check and action."""
    what = (res.get("sha") or "")[:12] or f"working tree {res.get('dir')}"
    build = res.get("build") or {}
    if not build.get("ok"):
        print(f"{res['component']} at {what}: {paint('build failed', 'red')}: {build.get('error')}")
        tail = (res.get("log_tail") or "").strip().splitlines()[-15:]
        for line in tail:
            print(f"  | {line}")
        return
    semver = f", version {res['semver']}" if res.get("semver") else ""
    print(f"{res['component']} at {what}: built in {build.get('seconds')} s{semver}")
    for warning in build.get("warnings") or []:
        print(f"  warning: {warning}")
    if not res.get("flows"):
        print("no flow would be redeployed")
    for flow in res.get("flows") or []:
        colour = {"publish": "green", "needs attention": "red"}.get(flow["action"], "yellow")
        why = flow.get("why") or ""
        if why and flow["action"] == "held by freeze":  # held by freeze until <time> (reason)
            action = paint(f"{flow['action']} {why}", colour)
        else:
            action = paint(flow["action"], colour) + (f" ({why})" if why else "")
        print(f"\nflow {flow['flow']} (v{flow['version']}, update {flow['update']}): {action}")
        for ch in flow["changes"]:
            print(f"  {ch['step']}: {ch['component']} v{ch['from']} → (new)")
        if flow["problems"]:
            for problem in flow["problems"]:
                print(f"  problem: {problem}")
        else:
            print("  validation: ok")
        for edge in flow["schema"]:
            verdict = (
                "incompatible"
                if edge["problems"]
                else ("compatible" if edge["checked"] else "not checked")
            )
            note = edge["note"].removeprefix("not checked: ")
            print(f"  schema {edge['producer']} → {edge['consumer']}: {verdict} ({note})")
    for note in res.get("notes") or []:
        print(f"\nnote: {note}")
