"""Commit statuses and notifications, end to end: real pushes to a real daemon, whose outbox
sends to a loopback server standing in for GitHub, GitLab, Gitea, Bitbucket and the chat
webhooks (`report_api` and the notify urls point at it). The server checks nothing itself:
each test asserts the method, path, auth header and body against the provider's documented
shape (see daemon/deployd/outbox/providers.py for the sources).

One daemon serves the whole module (a start and four builds cost seconds on a small
machine); the restart test runs last.
"""

from __future__ import annotations

import copy
import hashlib
import hmac
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Daemon, Work, db_rows, free_port, make_component, wait_until
from tests.flows.conftest import COUNTER_DESC, counter_files, flow_toml, read_out
from tests.outbox.receiver import Receiver

pytestmark = pytest.mark.timeout(180)

TOKENS = {
    "gh": "ghp_SeCrEtGitHubToken0123456789",
    "gl": "glpat-SeCrEtGitLabToken98765",
    "gitea": "SeCrEtGiteaToken5555aaaa",
    "bb": "SeCrEtBitbucketTokenZZ42",
}
PROVIDERS = {"gh": "github", "gl": "gitlab", "gitea": "gitea", "bb": "bitbucket"}
REPOS = {"gh": "acme/gh", "gl": "acme/sub/gl", "gitea": "acme/gitea", "bb": "acme/bb"}
SLACK_PATH = "/slack/T000/B000/SeCrEtSlackHookPath"
JSON_SECRET = "SeCrEtNotifySigningKey-77"
PUBLIC = "https://deployd.example.com"
SECRETS = [*TOKENS.values(), "SeCrEtSlackHookPath", JSON_SECRET]


class Env:
    def __init__(self, daemon: Daemon, receiver: Receiver, works: dict[str, Work], tmp: Path):
        self.daemon = daemon
        self.receiver = receiver
        self.works = works
        self.tmp = tmp

    def push(self, name: str, files: dict[str, Any] | None = None, msg: str = "change") -> str:
        work = self.works[name]
        sha = work.commit(msg, files)
        work.push(self.daemon.hosted(name))
        return sha

    def statuses(self, name: str, sha: str, **match: Any) -> list[Any]:
        prefix = f"/{name}/"
        return [r for r in self.receiver.received(prefix, **match) if sha in r.path]

    def outbox(self) -> list[dict[str, Any]]:
        return db_rows(self.daemon.state_dir, "SELECT * FROM outbox ORDER BY id")


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    tmp = tmp_path_factory.mktemp("outbox")
    receiver = Receiver().start()
    with pytest.MonkeyPatch.context() as mp:
        (tmp / "home").mkdir()
        mp.setenv("HOME", str(tmp / "home"))
        mp.delenv("DEPLOYD_CONFIG", raising=False)
        works = {name: make_component(tmp / "work" / name) for name in PROVIDERS}
        works["gh"].commit("counter component", counter_files())
        components = [
            {
                "name": name,
                "report": provider,
                "report_token": "${" + name.upper() + "_TOKEN}",
                "report_api": f"{receiver.url}/{name}",
                "report_repo": REPOS[name],
            }
            for name, provider in PROVIDERS.items()
        ]
        notify = f"""
[[notify]]
url = "${{CHAT_HOOK}}"
format = "slack"
events = ["build.failed", "deploy.done", "flow.needs_attention"]

[[notify]]
url = "{receiver.url}/json"
format = "json"
secret = "${{NOTIFY_SECRET}}"
events = ["build.succeeded", "build.failed", "deploy.done"]
"""
        root = tmp / "deployd"
        root.mkdir()
        daemon = Daemon(
            root=root,
            port=free_port(),
            components=components,
            daemon_extra={"public_url": PUBLIC, "outbox_retry": "200ms"},
            extra_toml="",
        )
        daemon.env = {
            **{f"{n.upper()}_TOKEN": t for n, t in TOKENS.items()},
            "CHAT_HOOK": receiver.url + SLACK_PATH,
            "NOTIFY_SECRET": JSON_SECRET,
            "HOME": str(tmp / "home"),
        }
        # [[notify]] goes after the components (a table array after [daemon]'s keys).
        daemon.write_config()
        original = daemon.write_config

        def write_config() -> None:
            original()
            with daemon.config_path.open("a") as fh:
                fh.write(notify)

        daemon.write_config = write_config  # type: ignore[method-assign]
        daemon.start()
        try:
            yield Env(daemon, receiver, works, tmp)
        finally:
            if daemon.proc is not None and daemon.proc.poll() is None:
                daemon.stop()
            receiver.stop()


def build_states(env: Env, name: str, sha: str, key: str = "state") -> list[str]:
    ctx = "key" if PROVIDERS[name] == "bitbucket" else "context"
    ctx = "name" if PROVIDERS[name] == "gitlab" else ctx
    return [r.json()[key] for r in env.statuses(name, sha) if r.json()[ctx] == "deployd/build"]


def test_github_build_statuses_pending_then_success(env: Env) -> None:
    sha = env.push("gh", msg="first for github")
    wait_until(lambda: build_states(env, "gh", sha)[-1:] == ["success"], timeout=90)
    reqs = [r for r in env.statuses("gh", sha) if r.json()["context"] == "deployd/build"]
    # pending, then success; a pending one not sent yet when the build ends is superseded.
    assert [r.json()["state"] for r in reqs] in (["pending", "success"], ["success"])
    for req in reqs:
        assert req.method == "POST"
        assert req.path == f"/gh/repos/acme/gh/statuses/{sha}"
        assert req.headers["authorization"] == f"Bearer {TOKENS['gh']}"
        assert req.headers["accept"] == "application/vnd.github+json"
        assert req.headers["x-github-api-version"] == "2022-11-28"
        assert req.headers["content-type"] == "application/json"
        body = req.json()
        assert set(body) == {"state", "context", "description", "target_url"}
        assert body["target_url"] == f"{PUBLIC}/ui/components/gh"
        assert 0 < len(body["description"]) <= 140
    assert "v" in reqs[-1].json()["description"]


def test_gitlab_request_shape(env: Env) -> None:
    sha = env.push("gl", msg="first for gitlab")
    wait_until(lambda: build_states(env, "gl", sha)[-1:] == ["success"], timeout=90)
    reqs = env.statuses("gl", sha)
    assert [r.json()["state"] for r in reqs] in (["running", "success"], ["success"])
    for req in reqs:
        # The project id is the URL-encoded path of the project.
        assert req.path == f"/gl/projects/acme%2Fsub%2Fgl/statuses/{sha}"
        assert req.headers["private-token"] == TOKENS["gl"]
        assert "authorization" not in req.headers
        assert set(req.json()) == {"state", "name", "description", "target_url"}
        assert req.json()["name"] == "deployd/build"


def test_gitea_request_shape_and_retries_after_500s(env: Env) -> None:
    env.receiver.script("/gitea/", [500, 502, 500])
    sha = env.push("gitea", msg="first for gitea")
    wait_until(
        lambda: [r for r in env.statuses("gitea", sha, state="success") if r.answered == 201],
        timeout=90,
    )
    reqs = env.statuses("gitea", sha)
    answered = [r.answered for r in reqs]
    assert answered[:3] == [500, 502, 500] and answered[-1] == 201, answered
    final = [r for r in reqs if r.answered == 201]
    # Each status is delivered once; a newer one supersedes an older one still pending.
    assert [r.json()["state"] for r in final][-1] == "success"
    assert len([r for r in final if r.json()["state"] == "success"]) == 1
    for req in reqs:
        assert req.path == f"/gitea/repos/acme/gitea/statuses/{sha}"
        assert req.headers["authorization"] == f"token {TOKENS['gitea']}"
        assert set(req.json()) == {"state", "context", "description", "target_url"}
    # The server answered; the daemon records it a moment later.
    rows = wait_until(
        lambda: (
            (rows := [r for r in env.outbox() if r["target"] == "component:gitea"])
            and all(r["state"] != "pending" for r in rows)
            and rows
        )
    )
    assert {r["state"] for r in rows} <= {"delivered", "superseded"}
    assert any(r["attempts"] > 1 and r["state"] == "delivered" for r in rows)
    assert re.search(
        r"outbox: commit status deployd/build \w+ of gitea .*failed \(HTTP 50", env.daemon.log()
    )


def test_build_failure_reports_failure_and_notifies(env: Env) -> None:
    sha = env.push("gh", {"component.json": "{ not json"}, msg="broken descriptor")
    wait_until(lambda: build_states(env, "gh", sha)[-1:] == ["failure"], timeout=90)
    failure = [r for r in env.statuses("gh", sha) if r.json()["state"] == "failure"][-1]
    assert failure.json()["description"].startswith("build failed")
    assert len(failure.json()["description"]) <= 140
    # Slack: incoming-webhook JSON with text and a section block; the path is the secret url.
    slack = wait_until(
        lambda: [r for r in env.receiver.received(SLACK_PATH) if sha[:12] in r.json()["text"]]
    )
    body = slack[0].json()
    assert body["text"].startswith(":x: deployd build.failed:")
    assert body["blocks"][0]["type"] == "section"
    assert body["blocks"][0]["text"]["type"] == "mrkdwn"
    assert f"<{PUBLIC}/ui/components/gh|open in deployd>" in body["text"]
    # json: signed, with a delivery id and a timestamp.
    signed = wait_until(
        lambda: [
            r
            for r in env.receiver.received("/json", event="build.failed")
            if r.json()["sha"] == sha
        ]
    )
    req = signed[0]
    mac = hmac.new(JSON_SECRET.encode(), req.body, hashlib.sha256).hexdigest()
    assert hmac.compare_digest(req.headers["x-deployd-signature"], f"sha256={mac}")
    doc = req.json()
    assert req.headers["x-deployd-delivery"] == doc["id"]
    assert req.headers["x-deployd-timestamp"] == str(doc["timestamp"])
    assert req.headers["x-deployd-event"] == "build.failed"
    assert doc["component"] == "gh" and doc["flow"] is None
    assert "error" in doc["detail"]
    assert set(doc) == {
        "id",
        "event",
        "ts",
        "timestamp",
        "component",
        "flow",
        "sha",
        "message",
        "detail",
        "url",
    }
    # The daemon's log says the build failed, and why.
    wait_until(
        lambda: re.search(rf"build failed: build \d+ of gh {sha[:12]} failed", env.daemon.log())
    )


def test_flow_status_success_with_the_gap(env: Env) -> None:
    # The component's last push was broken: a good one, then a flow using it.
    fixed = env.push("gh", counter_files("v1"), msg="fixed again")
    env.daemon.wait_recent("gh", fixed, timeout=90)
    out = env.tmp / "counter.jsonl"
    path = env.tmp / "counter.toml"
    path.write_text(flow_toml("counter", out, component="gh"))
    env.daemon.cli("flow", "apply", str(path))
    wait_until(lambda: read_out(out), timeout=60)
    sha = env.push("gh", counter_files("v2"), msg="v2 of the counter")
    ctx = "deployd/flow/counter"
    wait_until(
        lambda: [r for r in env.statuses("gh", sha, context=ctx) if r.json()["state"] == "success"],
        timeout=90,
    )
    reqs = env.statuses("gh", sha, context=ctx)
    assert [r.json()["state"] for r in reqs] in (["pending", "success"], ["success"])
    done = reqs[-1].json()
    assert done["target_url"] == f"{PUBLIC}/ui/flows/counter"
    assert re.search(r"counter v\d+ published, gap \d+\.\d ms", done["description"]), done
    # The json notification of the deploy carries the gap in its detail.
    sent = wait_until(
        lambda: [
            r for r in env.receiver.received("/json", event="deploy.done") if r.json()["sha"] == sha
        ]
    )
    assert isinstance(sent[0].json()["detail"]["gap_ms"], float)
    assert sent[0].json()["url"] == f"{PUBLIC}/ui/flows/counter"
    wait_until(lambda: "deploy done: counter v" in env.daemon.log())


def test_needs_attention_sets_the_flow_status_to_failure_and_notifies(env: Env) -> None:
    # A version without the `write` action the flow uses: its draft needs attention.
    desc = copy.deepcopy(COUNTER_DESC)
    del desc["actions"]["write"]
    sha = env.push("gh", counter_files("v3", **{"component.json": desc}), msg="drop write")
    ctx = "deployd/flow/counter"
    wait_until(
        lambda: [r for r in env.statuses("gh", sha, context=ctx) if r.json()["state"] == "failure"],
        timeout=90,
    )
    failure = env.statuses("gh", sha, context=ctx)[-1].json()
    assert failure["description"].startswith("counter needs attention: ")
    assert len(failure["description"]) <= 140
    assert failure["target_url"] == f"{PUBLIC}/ui/flows/counter"
    slack = wait_until(
        lambda: [
            r
            for r in env.receiver.received(SLACK_PATH)
            if "flow.needs_attention" in r.json()["text"] and sha[:12] in r.json()["text"]
        ]
    )
    assert slack[0].json()["text"].startswith(":warning: deployd flow.needs_attention: ")
    wait_until(lambda: "needs attention: draft of counter for gh v" in env.daemon.log())


def test_status_counts_and_a_refused_status_is_given_up(env: Env) -> None:
    env.receiver.always["/gl/"] = 401
    sha = env.push("gl", msg="token revoked")
    wait_until(
        lambda: [
            r for r in env.outbox() if r["target"] == "component:gl" and r["state"] == "failed"
        ],
        timeout=90,
    )
    del env.receiver.always["/gl/"]
    failed = [r for r in env.outbox() if r["target"] == "component:gl" and r["state"] == "failed"]
    assert failed[0]["attempts"] == 1  # a 401 is not tried again
    assert "HTTP 401" in failed[0]["last_error"]
    status = json.loads(env.daemon.cli("status", "--json").stdout)
    assert status["outbox"]["failed"] >= 1
    assert status["outbox"]["last_failure"]["target"] == "component:gl"
    text = env.daemon.cli("status").stdout
    assert re.search(r"outbox: \d+ pending, \d+ failed", text), text
    assert re.search(
        r"outbox: commit status deployd/build \w+ of gl .* given up: refused: HTTP 401",
        env.daemon.log(),
    )
    assert sha


def test_the_log_says_which_push_was_ignored_and_which_branch_deploys(env: Env) -> None:
    env.works["gl"].push(env.daemon.hosted("gl"), "HEAD:refs/heads/feature-x")
    wait_until(
        lambda: (
            "push ignored: push to 'refs/heads/feature-x' ignored: gl deploys branch 'main'"
            in env.daemon.log()
        )
    )


def test_nothing_secret_in_the_log_the_database_or_status(env: Env) -> None:
    log = env.daemon.log()
    for secret in SECRETS:
        assert secret not in log, f"{secret} in the daemon's log"
    db = (env.daemon.state_dir / "deployd.db").read_bytes()
    wal = env.daemon.state_dir / "deployd.db-wal"
    db += wal.read_bytes() if wal.exists() else b""
    for secret in SECRETS:
        assert secret.encode() not in db, f"{secret} in the state database"
    status = env.daemon.cli("status", "--json").stdout
    for secret in SECRETS:
        assert secret not in status


def test_pending_deliveries_survive_a_restart(env: Env) -> None:
    """Stop the daemon while Bitbucket answers 500, start it again, then Bitbucket answers
    201: each status is delivered once."""
    env.receiver.always["/bb/"] = 500
    sha = env.push("bb", msg="first for bitbucket")
    wait_until(lambda: len(env.statuses("bb", sha)) >= 2, timeout=90)  # tried, and failing
    env.daemon.wait_build("bb", sha, timeout=90)
    env.daemon.stop()
    pending = [r for r in env.outbox() if r["target"] == "component:bb" and r["state"] == "pending"]
    assert pending, env.outbox()
    del env.receiver.always["/bb/"]
    before = len(env.statuses("bb", sha))
    env.daemon.start()
    wait_until(
        lambda: (
            not [
                r for r in env.outbox() if r["target"] == "component:bb" and r["state"] == "pending"
            ]
        ),
        timeout=60,
    )
    after = env.statuses("bb", sha)[before:]
    ok = [r for r in after if r.answered == 201]
    assert [r.json()["state"] for r in ok] == ["SUCCESSFUL"]  # the pending one was superseded
    req = ok[0]
    assert req.path == f"/bb/2.0/repositories/acme/bb/commit/{sha}/statuses/build"
    assert req.headers["authorization"] == f"Bearer {TOKENS['bb']}"
    body = req.json()
    assert set(body) == {"key", "state", "name", "description", "url"}
    assert body["key"] == "deployd/build" and body["url"] == f"{PUBLIC}/ui/components/bb"
    for secret in SECRETS:
        assert secret not in env.daemon.log()
