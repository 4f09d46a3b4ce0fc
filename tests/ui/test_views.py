"""The dashboard's templates render every part of their data (the parts the daemon tests do
not reach: an ordinary flow's runs, a draft with problems, quarantine, a freeze, a step
placed elsewhere, a failed build), with every value escaped."""

from __future__ import annotations

from typing import Any

from deployd.api.ui.data import age
from deployd.api.ui.views import render

EVIL = "<script>alert(1)</script>"
TS = "2026-01-02T03:04:05.000+00:00"


class Viewer:
    def __init__(self, logged_in: bool) -> None:
        self.session = object() if logged_in else None
        self.open = not logged_in
        self.csrf = "CSRF" if logged_in else None


def base(logged_in: bool = True) -> dict[str, Any]:
    return {
        "viewer": Viewer(logged_in),
        "flash": f"done {EVIL}",
        "title": "t",
        "fragment_url": "/ui?fragment=1",
        "last_event_id": 7,
        "path": "/ui",
    }


def step(id_: str, kind: str, **extra: Any) -> dict[str, Any]:
    return {
        "id": id_,
        "kind": kind,
        "component": "hello" if kind != "mapper" else None,
        "function": "f" if kind != "mapper" else None,
        "version": 3 if kind != "mapper" else None,
        "state": "running",
        "pid": 42,
        "backpressure": True,
        "dead_letters": 2,
        **extra,
    }


def flow_ctx(type_: str) -> dict[str, Any]:
    return {
        "flow": {
            "name": "counter",
            "type": type_,
            "update": "auto",
            "state": "scheduled" if type_ == "ordinary" else "running",
            "version": 4,
            "stale": True,
            "needs_attention": f"broken {EVIL}",
            "dead_letters": 2,
            "quarantined": [{"component": "hello", "version": 5, "reason": EVIL, "created_at": TS}],
            "freeze": {"until": TS, "reason": "release"},
            "held": None,
            "runtime": "rabbitmq",
            "queues": {"write": 3},
            "steps": [
                step("tick", "trigger", location="pod counter-tick-abc"),
                step("write:mapper", "mapper"),
                step("write", "action"),
            ],
            "next_run_at": TS,
            "last_deploy": {
                "status": "done",
                "to_version": 4,
                "warmup_ms": 12.0,
                "gap_ms": 0.6,
                "finished_at": TS,
            },
            "url": "http://127.0.0.1:8787/flows/counter/in",
        },
        "paused": True,
        "draft": {"reason": EVIL, "created_at": TS, "problems": [f"step write: {EVIL}"]},
        "stats": {"write": {"processed": 10, "failed": 1}},
        "versions": [],
        "can_roll_back": True,
        "deployments": [
            {
                "id": 2,
                "from_version": 3,
                "to_version": 4,
                "trigger": "component version",
                "component": "hello",
                "component_version": 3,
                "status": "rolled_back",
                "reason": EVIL,
                "log_tail": EVIL,
                "warmup_ms": 12.0,
                "gap_ms": 0.6,
                "started_at": TS,
                "finished_at": TS,
            }
        ],
        "runs": [
            {
                "id": 9,
                "flow": "counter",
                "status": "failed",
                "cause": "schedule",
                "started_at": TS,
                "finished_at": TS,
                "flow_version": 4,
                "steps": [],
                "handled": 3,
                "errors": [EVIL],
                "reason": EVIL,
            }
        ],
        "events": [{"ts": TS, "kind": "deploy.failed", "message": EVIL}],
    }


def assert_escaped(html: str) -> None:
    assert EVIL not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html


def test_flow_page_of_an_ordinary_flow_renders_everything() -> None:
    html = render("flow.html", {**base(), **flow_ctx("ordinary")})
    assert_escaped(html)
    for text in ("Runs", "pod counter-tick-abc", "write:mapper", "needs attention", "0.6 ms"):
        assert text in html, text
    assert 'action="/ui/flows/counter/resume"' in html
    assert 'action="/ui/flows/counter/retry"' in html
    assert 'name="step" value="write"' in html


def test_flow_page_of_a_realtime_flow_has_publish_and_rollback_buttons() -> None:
    html = render("flow.html", {**base(), **flow_ctx("realtime")}, fragment=True)
    assert_escaped(html)
    assert "<html" not in html  # a fragment
    assert 'action="/ui/flows/counter/publish"' in html
    assert 'action="/ui/flows/counter/rollback"' in html
    assert 'data-confirm="Roll flow counter back to its previous version?"' in html


def test_read_only_pages_have_no_buttons() -> None:
    html = render("flow.html", {**base(logged_in=False), **flow_ctx("realtime")})
    assert '<form method="post"' not in html
    assert "read-only (loopback)" in html


def test_component_and_overview_pages_render_failures_escaped() -> None:
    build = {
        "id": 3,
        "status": "failed",
        "sha": "a" * 40,
        "version": None,
        "source": "hook",
        "error": EVIL,
        "started_at": TS,
        "finished_at": TS,
        "queued_at": TS,
        "commit": {"subject": EVIL, "author": EVIL},
        "log": EVIL,
        "log_cut": True,
    }
    comp = {
        "name": "hello",
        "branch": "main",
        "url": "/srv/git/hello.git",
        "recent": {"version": 2, "sha": "b" * 40, "semver": "1.0.0", "built_at": TS},
        "last_build": {"id": 3, "sha": "a" * 40, "status": "failed", "error": EVIL},
        "commit": {"subject": EVIL, "author": "Ada"},
    }
    html = render(
        "component.html",
        {
            **base(),
            "component": comp,
            "paused": False,
            "flows": ["counter"],
            "versions": [
                {
                    "version": 2,
                    "sha": "b" * 40,
                    "semver": "1.0.0",
                    "built_at": TS,
                    "warnings": [EVIL],
                    "commit": {"subject": EVIL, "author": "Ada"},
                }
            ],
            "builds": [build],
            "ignored": [{"ts": TS, "sha": None, "message": EVIL}],
        },
    )
    assert_escaped(html)
    assert "the whole log" in html
    status = {
        "daemon": {"running": False, "pid": None, "listen": "127.0.0.1:8787"},
        "components": [comp],
        "flows": [flow_ctx("realtime")["flow"]],
        "paused": {"flow": ["counter"], "component": []},
    }
    html = render("overview.html", {**base(), "status": status})
    assert_escaped(html)
    assert "needs attention" in html


def test_ages() -> None:
    from datetime import UTC, datetime

    now = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    assert age("2026-01-02T03:04:00.000+00:00", now) == "5 s ago"
    assert age("2026-01-02T02:04:05.000+00:00", now) == "1 h ago"
    assert age("2025-12-30T03:04:05.000+00:00", now) == "3 d ago"
    assert age("2026-01-02T03:05:05.000+00:00", now) == "just now"
    assert age(None) == ""
    assert age("not a time") == "not a time"
