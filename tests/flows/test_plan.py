"""`deployd plan`: a trial build of a pushed commit (or a working tree) and what a push of
it would do to each flow — registering nothing. Real pushes, a real daemon, real builds."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from tests.conftest import db_rows, git, wait_until
from tests.flows.conftest import FlowEnv, read_out
from tests.flows.schemas import MAPPING, TICK_OUT, files, flow, retyped, without

pytestmark = pytest.mark.timeout(240)


def setup(env: FlowEnv) -> None:
    """hello v1 (with schemas) runs in `mapped` (auto, with a mapping), `plain` (auto) and
    `manual` (update = manual)."""
    for name, mapping, update in (
        ("mapped", MAPPING, "auto"),
        ("plain", None, "auto"),
        ("manual", None, "manual"),
    ):
        out = env.out(name)
        env.apply(flow(name, out, mapping=mapping, update=update))
        wait_until(lambda out=out: read_out(out), timeout=60)


def side_branch(env: FlowEnv, tag: str, **kw: Any) -> str:
    """Commit a change and push it to branch `feature` (not deployed): a pull request head."""
    sha = env.work.commit(tag, files(tag, **kw))
    env.work.push(env.daemon.hosted("hello"), "HEAD:refs/heads/feature")
    return sha


def plan(env: FlowEnv, *args: str) -> tuple[int, dict[str, Any]]:
    proc = env.daemon.cli("plan", "hello", *args, "--json", check=False)
    assert proc.stdout, proc.stderr
    return proc.returncode, json.loads(proc.stdout)


def nothing_registered(env: FlowEnv, sha: str) -> None:
    d = env.daemon.state_dir
    assert db_rows(d, "SELECT version FROM versions WHERE component = 'hello'") == [{"version": 1}]
    assert db_rows(d, "SELECT id FROM builds WHERE sha = ?", sha) == []
    assert db_rows(d, "SELECT flow FROM drafts") == []
    assert list((d / "builds").iterdir()) == []  # the scratch folder is gone


@pytest.fixture
def planned(make_env: Any) -> FlowEnv:
    env = make_env(files())
    setup(env)
    return env


def test_plan_of_a_compatible_change_would_publish_and_registers_nothing(
    planned: FlowEnv,
) -> None:
    env = planned
    sha = side_branch(env, "v2")
    code, res = plan(env, "--sha", sha[:10])  # an abbreviated sha names it too
    assert code == 0, res
    assert res["sha"] == sha and res["build"]["ok"]
    assert res["result"] == "no flow needs attention"  # manual is "draft only"
    flows = {f["flow"]: f for f in res["flows"]}
    assert set(flows) == {"mapped", "plain", "manual"}
    assert flows["mapped"]["action"] == "publish"
    assert flows["plain"]["action"] == "publish"
    assert flows["manual"]["action"] == "draft only"
    assert [(c["step"], c["from"], c["to"]) for c in flows["mapped"]["changes"]] == [
        ("tick", 1, None),
        ("write", 1, None),
    ]
    assert flows["mapped"]["problems"] == []
    edge = flows["mapped"]["schema"][0]
    assert (edge["producer"], edge["consumer"], edge["checked"]) == ("tick", "write", True)
    assert "write's mapping" in edge["note"]
    assert "write's metadata.in" in flows["plain"]["schema"][0]["note"]
    nothing_registered(env, sha)
    # The text form says the same.
    text = env.daemon.cli("plan", "hello", "--sha", sha).stdout
    assert "write: hello v1 → (new)" in text
    assert "flow mapped (v1, update auto): publish" in text
    assert "schema tick → write: compatible" in text
    # The default is the branch head (v1's commit: the flows would be moved to a new build).
    code, head = plan(env)
    assert code == 0 and head["sha"] == env.daemon.recent_sha("hello")


def test_plan_of_a_removed_function_or_an_incompatible_schema_needs_attention(
    planned: FlowEnv,
) -> None:
    env = planned
    removed = dict(files("v2"))
    desc = json.loads(json.dumps(removed["component.json"]))
    del desc["actions"]["write"]
    removed["component.json"] = desc
    env.work.write(removed)
    git("rm", "-qf", "lib/write.py", cwd=env.work.path)
    sha = env.work.commit("remove write")
    env.work.push(env.daemon.hosted("hello"), "HEAD:refs/heads/feature")
    code, res = plan(env, "--sha", sha)
    assert code == 3, res
    assert res["result"] == "needs attention"
    for f in res["flows"]:
        assert f["action"] == "needs attention"
        assert 'step write: action "write" no longer exists in hello (new)' in f["problems"]
    nothing_registered(env, sha)

    # The trigger stops producing "text" and makes "n" a string: the mapped flow's mapping
    # reads "text"; the plain flow's write requires an integer "n".
    broken = retyped(without(TICK_OUT, "text"), "n", "string")
    sha = side_branch(env, "v3", tick_out=broken)
    code, res = plan(env, "--sha", sha)
    assert code == 3, res
    flows = {f["flow"]: f for f in res["flows"]}
    assert flows["mapped"]["problems"] == [
        'step write: hello (new) trigger "ticker" no longer outputs "text" '
        "(write's mapping reads it)"
    ]
    assert flows["plain"]["problems"] == [
        'step write: hello (new) trigger "ticker" outputs "n" as string, but '
        "write's metadata.in requires integer"
    ]
    assert flows["manual"]["action"] == "needs attention"
    text = env.daemon.cli("plan", "hello", "--sha", sha, check=False)
    assert text.returncode == 3
    assert "schema tick → write: incompatible" in text.stdout

    # The same over HTTP, for a CI job: the same object, with the bearer token.
    token = (env.daemon.state_dir / "api-token").read_text().strip()
    url = f"{env.daemon.url}/api/v1/plan/hello"
    resp = httpx.post(
        url, json={"sha": sha}, headers={"Authorization": f"Bearer {token}"}, timeout=120
    )
    assert resp.status_code == 200
    over_http = resp.json()
    assert over_http["exit_code"] == 3
    assert over_http["flows"] == res["flows"]
    assert httpx.post(url, json={"sha": sha}, timeout=30).status_code == 401
    bad = httpx.post(
        url, json={"sha": "not a sha"}, headers={"Authorization": f"Bearer {token}"}, timeout=30
    )
    assert bad.status_code == 400 and "names no commit" in bad.json()["detail"]
    gone = httpx.post(
        f"{env.daemon.url}/api/v1/plan/nope",
        json={},
        headers={"Authorization": f"Bearer {token}"},
        timeout=30,
    )
    assert gone.status_code == 404
    nothing_registered(env, sha)
    # The running flows never moved.
    assert {f["name"]: f["version"] for f in env.daemon.status()["flows"]} == {
        "mapped": 1,
        "plain": 1,
        "manual": 1,
    }


def test_plan_of_a_failing_build_exits_1_and_a_working_tree_is_planned_locally(
    planned: FlowEnv,
) -> None:
    env = planned
    failing = files("v2")
    failing["component.json"] = {**failing["component.json"], "build": "echo broken; exit 7"}
    sha = side_branch(env, "v2", **{"component.json": failing["component.json"]})
    code, res = plan(env, "--sha", sha)
    assert code == 1, res
    assert res["result"] == "build failed" and res["flows"] == []
    assert "exited with code 7" in res["build"]["error"] and "broken" in res["build"]["error"]
    nothing_registered(env, sha)

    # A working tree with an uncommitted change: built by the CLI itself, not registered.
    env.work.write(files("v3", tick_out=without(TICK_OUT, "text")))
    proc = env.daemon.cli("plan", "hello", "--dir", str(env.work.path), "--json", check=False)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    res = json.loads(proc.stdout)
    assert res["dir"] == str(env.work.path) and res["sha"] is None
    mapped = {f["flow"]: f for f in res["flows"]}["mapped"]
    assert mapped["problems"] == [
        'step write: hello (new) trigger "ticker" no longer outputs "text" '
        "(write's mapping reads it)"
    ]
    assert db_rows(env.daemon.state_dir, "SELECT count(*) AS n FROM versions") == [{"n": 1}]
    both = env.daemon.cli("plan", "hello", "--sha", sha, "--dir", ".", check=False)
    assert both.returncode == 2 and "not both" in both.stderr
    bad = env.daemon.cli("plan", "hello", "--sha", "main", check=False)
    assert bad.returncode == 2 and "not a commit sha" in bad.stderr


DYNAMIC_WRITE = """\
import json

def get_meta_model(cfg):
    return {"in": {"type": "object", "properties": {"sku": {"type": "string"}},
                   "required": ["n", "sku"]}, "out": {}}

def process(msg, cfg):
    with open(cfg["out"], "a") as fh:
        fh.write(json.dumps({**msg["body"], "by": "dyn"}) + "\\n")
"""


def test_a_plan_through_the_daemon_asks_the_built_code_for_its_dynamic_metadata(
    make_env: Any,
) -> None:
    env: FlowEnv = make_env(files())
    out = env.out("plain")
    env.apply(flow("plain", out))
    wait_until(lambda: read_out(out), timeout=60)
    dynamic = files("v2", **{"lib/write.py": DYNAMIC_WRITE})
    dynamic["component.json"]["actions"]["write"]["dynamicMetadata"] = True
    sha = side_branch(env, "v2", **dynamic)
    code, res = plan(env, "--sha", sha)
    assert code == 3, res
    (plain,) = res["flows"]
    assert any(
        "input field 'sku' is required by the dynamic metadata of hello (new) write" in p
        for p in plain["problems"]
    ), plain["problems"]
    # The edge into a dynamic function is left to that check, and says so.
    assert "dynamic" in plain["schema"][0]["note"]
    nothing_registered(env, sha)


def test_plan_of_a_frozen_flow_says_held_by_freeze_until_the_window_ends(
    make_env: Any,
) -> None:
    """A flow a freeze window holds now: the plan says `held by freeze until … (reason)`,
    exits 0 (nothing needs attention), and the other flows still publish."""
    from datetime import UTC, datetime, timedelta

    from tests.flows.test_freeze import one_off

    now = datetime.now(UTC)
    end = (now + timedelta(hours=2)).replace(microsecond=0)
    env = make_env(files(), extra_toml=one_off(now - timedelta(minutes=1), end, reason="audit"))
    for name in ("billing", "plain"):
        out = env.out(name)
        env.apply(flow(name, out))
        wait_until(lambda out=out: read_out(out), timeout=60)
    sha = side_branch(env, "v2")
    code, res = plan(env, "--sha", sha)
    assert code == 0, res
    flows = {f["flow"]: f for f in res["flows"]}
    assert flows["plain"]["action"] == "publish"
    held = flows["billing"]
    assert held["action"] == "held by freeze", held
    assert held["why"] == f"until {end.strftime('%Y-%m-%dT%H:%M:%SZ')} (audit)"
    text = env.daemon.cli("plan", "hello", "--sha", sha, check=False)
    assert text.returncode == 0, text.stderr
    assert f"held by freeze until {end.strftime('%Y-%m-%dT%H:%M:%SZ')} (audit)" in text.stdout
    nothing_registered(env, sha)
