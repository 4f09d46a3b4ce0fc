"""Printing: JSON, the plain aligned tables `status` and `flow list` use, and rich's console.

`deployd status` has a 300 ms budget, so its tables are laid out here by hand (`grid`);
rich is imported only when a rich table or console is printed.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
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


def grid(
    headers: list[str],
    rows: list[list[tuple[str, str]]],
    notes: Sequence[str | None] | None = None,
) -> str:
    """(text, style) cells as aligned columns: a table without rich.

    rich's layout and markup passes cost ~150 ms for a few hundred rows, and `deployd status`
    has a 300 ms budget; and rich cuts cells to fit (`compone…`), a grid never does. Cell text
    is printed as written (no markup to escape). `notes`: per row, a longer text (an error)
    printed wrapped under it, so the columns stay narrow.
    """
    widths = [max([len(h)] + [len(row[i][0]) for row in rows]) for i, h in enumerate(headers)]

    def line(cells: list[tuple[str, str]]) -> str:
        parts = []
        for i, (text, style) in enumerate(cells):
            pad = " " * (widths[i] - len(text)) if i < len(cells) - 1 else ""
            parts.append(paint(text, style) + pad)
        return "  ".join(parts).rstrip()

    out = [line([(h, "bold") for h in headers])]
    for i, row in enumerate(rows):
        out.append(line(row))
        note = notes[i] if notes is not None and i < len(notes) else None
        if note:
            out.append(wrapped(note, "    "))
    return "\n".join(out)


WIDTH = 80  # `status` and `flow list` fit a terminal of this many columns
STALE_NOTE = (
    "(stale): a component the flow uses has a newer version than the one the flow runs, and"
    ' no automatic redeploy took it (update = "manual", a pinned step, a paused flow or one'
    " that needs attention); `deployd plan COMPONENT` shows what a publish would do,"
    " `deployd flow publish NAME` publishes the draft"
)


def clip(text: str, limit: int) -> str:
    """`text` on one line, at most `limit` characters, cut at a word boundary (with …)."""
    text = " ".join(text.split())
    if len(text) <= limit:
        return text
    cut = text[: limit - 1]
    space = cut.rfind(" ")
    if space > limit // 2:
        cut = cut[:space]
    return cut.rstrip(" ,;:") + "…"


def wrapped(text: str, indent: str = "  ", width: int = WIDTH) -> str:
    """`text` wrapped to `width` columns under `indent`, words kept whole."""
    import textwrap

    return "\n".join(
        textwrap.wrap(
            " ".join(text.split()),
            width,
            initial_indent=indent,
            subsequent_indent=indent + "  ",
            break_long_words=False,
            break_on_hyphens=False,
        )
    )


def ago(iso: str | None, now: float | None = None) -> str:
    """How long ago ISO time `iso` was, short ("12 s ago", "5 min ago", "3 h ago", "2 d ago")."""
    import time
    from datetime import datetime

    if not iso:
        return "-"
    try:
        then = datetime.fromisoformat(iso).timestamp()
    except ValueError:
        return iso
    secs = max(0.0, (time.time() if now is None else now) - then)
    if secs < 1:
        return "just now"
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if secs >= size:
            return f"{int(secs // size)} {unit} ago"
    return f"{int(secs)} s ago"


def when(iso: str | None) -> str:
    """ISO time `iso` (UTC) as "2026-12-02 03:10:05 UTC (5 min ago)"."""
    if not iso:
        return "-"
    return f"{iso[:19].replace('T', ' ')} UTC ({ago(iso)})"


def print_flows_table(flows: list[dict[str, Any]]) -> None:
    """The flows of a status object as aligned columns (within 80), what needs words below."""
    if not flows:
        return
    rows: list[list[tuple[str, str]]] = []
    notes: list[str] = []
    stale = False
    for f in flows:
        name = f["name"]
        state, style = f["state"], {"running": "green", "failed": "red"}.get(f["state"], "")
        if f.get("runtime") not in (None, "embedded"):
            state += f" on {f['runtime']}"
        if f.get("dead_letters"):
            state += f", {f['dead_letters']} dead letter{'s' if f['dead_letters'] != 1 else ''}"
            style = style if style == "red" else "yellow"
        if f.get("held"):
            notes.append(f"{name}: {f['held']}")
            state += ", held"
            style = style if style == "red" else "yellow"
        elif f.get("freeze"):
            notes.append(f"{name}: frozen until {f['freeze']['until']} ({f['freeze']['reason']})")
            state += ", frozen"
        if f.get("quarantined"):
            notes.append(
                f"{name}: quarantined: "
                + ", ".join(f"{q['component']} v{q['version']}" for q in f["quarantined"])
            )
            style = style if style == "red" else "yellow"
        if f.get("canary"):
            c = f["canary"]
            state += f", canary v{c['version']} ({c['share'] * 100:.4g}%)"
            style = style if style == "red" else "yellow"
        if f.get("needs_attention"):
            notes.append(f"{name} needs attention: {clip(f['needs_attention'], 300)}")
            state, style = f"{state}, needs attention", "red"
        elif f.get("stale"):
            state, style = f"{state} (stale)", "yellow"
            stale = True
        last = f.get("last_deploy")
        last_s = "-"
        if f.get("type") == "ordinary":
            last_s = _runs_cell(f.get("last_run"), f.get("next_run_at"))
        elif last:
            last_s = f"{last['status']} -> v{last['to_version']}"
            if last.get("gap_ms") is not None:
                last_s += f" gap {last['gap_ms']:.1f} ms"
            if last.get("finished_at"):
                last_s += f", {ago(last['finished_at'])}"
        rows.append(
            [
                (name, ""),
                (state, style),
                (f"v{f['version']}" if f["version"] else "-", ""),
                (str(len(f["steps"])), ""),
                (f["update"], ""),
                (last_s, ""),
            ]
        )
    sys.stdout.write(grid(["flow", "state", "version", "steps", "update", "last deploy"], rows))
    sys.stdout.write("\n")
    for note in notes:
        sys.stdout.write(wrapped(note) + "\n")
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
    if stale:
        sys.stdout.write(wrapped(STALE_NOTE, "") + "\n")


def _runs_cell(last: dict[str, Any] | None, next_at: str | None) -> str:
    """An ordinary flow's last run and next due time, for the flows table."""
    out = f"run {last['id']} {last['status']}" if last else "no run yet"
    return out + (f", next {next_at[:19].replace('T', ' ')} UTC" if next_at else ", not scheduled")


def print_runs(runs: list[dict[str, Any]]) -> None:
    """The runs of an ordinary flow, newest first (steps and errors under each run)."""
    rows, notes = [], []
    for r in runs:
        steps = ", ".join(f"{s['id']}={s['component']} v{s['version']}" for s in r["steps"])
        errors = r["errors"] or []
        rows.append(
            [
                (str(r["id"]), ""),
                (r["status"], {"succeeded": "green", "failed": "red"}.get(r["status"], "")),
                (r["cause"], ""),
                (ago(r["started_at"]), ""),
                (ago(r["finished_at"]) if r["finished_at"] else "-", ""),
                (str(r["handled"]), ""),
                (str(len(errors)), ""),
            ]
        )
        note = f"steps: {steps or '-'}"
        if errors:
            note += f"; first error: {clip(errors[0], 200)}"
        notes.append(note)
    headers = ["id", "status", "cause", "started", "finished", "handled", "errors"]
    sys.stdout.write(grid(headers, rows, notes) + "\n")


ERROR_LABELS = {
    "builds": "build",
    "pushes": "push",
    "deploys": "deploy",
    "rollbacks": "rollback",
    "flows": "flow",
    "config": "config",
}


def print_status(data: dict[str, Any]) -> None:
    """A status object (`deployd status --json`) as the human-readable summary: tables that
    fit 80 columns, with what needs words (commits, errors) on indented lines below them.
    Times are UTC, and said how long ago."""
    say = sys.stdout.write
    d = data["daemon"]
    if d["running"]:
        say(f"{paint('daemon running', 'green')} (pid {d['pid']}) on {d['listen']}\n")
    else:
        say(f"{paint('daemon not running', 'yellow')} (would listen on {d['listen']})\n")
    rows: list[list[tuple[str, str]]] = []
    details: list[str] = []
    for c in data["components"]:
        r, b = c["recent"], c["last_build"]
        last = ("-", "")
        if b:
            color = {"succeeded": "green", "failed": "red"}.get(b["status"], "yellow")
            text = f"#{b['id']} {b['status']}"
            if b.get("seconds") is not None and b["status"] in ("succeeded", "failed"):
                text += f" in {b['seconds']:.1f} s"
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
                (ago(r["built_at"]) if r else "-", ""),
                last,
            ]
        )
        if r and (r.get("subject") or r.get("author")):
            line = f'{c["name"]} v{r["version"]}: "{r.get("subject") or ""}"'
            if r.get("author"):
                line += f" by {r['author']}"
            line += f", built {when(r['built_at'])}"
            if r.get("build_seconds") is not None:
                line += f" in {r['build_seconds']:.1f} s"
            details.append(clip(line, 400))
        if b and b["status"] == "failed" and b["error"]:
            details.append(f"{c['name']} build #{b['id']} failed: {clip(b['error'], 200)}")
    say(grid(["component", "branch", "recent", "sha", "built", "last build"], rows) + "\n")
    for line in details:
        say(wrapped(line) + "\n")
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
    outbox = data.get("outbox") or {}
    if outbox.get("pending") or outbox.get("failed"):
        line = f"outbox: {outbox.get('pending', 0)} pending, {outbox.get('failed', 0)} failed"
        failure = outbox.get("last_failure")
        if failure:
            line += f" (last: {failure['target']}: {str(failure['message'])[:100]})"
        say(line + "\n")
    disk = (data.get("disk") or {}).get("state_dir_bytes")
    if disk is not None:
        say(f"state_dir uses {disk / 1e6:.1f} MB\n")
    for part, err in (data.get("last_errors") or {}).items():
        if not err or err.get("cleared_at"):
            continue  # none, or the part has worked since (`--json` still has it)
        label = ERROR_LABELS.get(part, part)
        say(
            wrapped(f"last {label} error, {when(err['at'])}: {clip(err['message'], 150)}", "")
            + "\n"
        )


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
    rows, notes = [], []
    for d in deps:
        rows.append(
            [
                (str(d["id"]), ""),
                (d["flow"], ""),
                (
                    (f"v{d['from_version']}" if d["from_version"] else "-")
                    + f"->v{d['to_version']}",
                    "",
                ),
                (
                    d["status"] + (f", {d['redriven']} re-driven" if d.get("redriven") else ""),
                    {"done": "green", "failed": "red", "rolled_back": "red"}.get(d["status"], ""),
                ),
                (f"{d['warmup_ms']:.0f} ms" if d["warmup_ms"] is not None else "-", ""),
                (f"{d['gap_ms']:.1f} ms" if d["gap_ms"] is not None else "-", ""),
                (ago(d["finished_at"]) if d["finished_at"] else "-", ""),
            ]
        )
        trig = d["trigger"] or ""
        if d["component"]:
            trig += f" ({d['component']} v{d['component_version']})"
        notes.append(trig + (f"; {clip(d['reason'], 300)}" if d["reason"] else ""))
    headers = ["id", "flow", "versions", "status", "warm-up", "gap", "finished"]
    sys.stdout.write(grid(headers, rows, notes) + "\n")


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
