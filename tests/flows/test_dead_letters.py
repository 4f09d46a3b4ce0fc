"""Failed messages (dead letters) end to end: a real daemon, real step processes, real pushes.

The trigger counts n = 1..LIMIT and then stays quiet; the `write` action refuses odd n (as
its code version decides) and appends the others to the out file, tagged with that version.
So the out file says exactly which message each version handled, and how often.
"""

from __future__ import annotations

import json
import signal
import textwrap
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import HTTP, dead_letter_rows, wait_until
from tests.flows.conftest import FlowEnv, counter_files, flow_toml, read_out

LIMITED_TICKER = """\
def process(msg, cfg, snapshot, ctx):
    n = snapshot.get("n", 0)
    if n >= int(cfg.get("limit", "1000000000")):
        return None
    n += 1
    ctx.emit("snapshot", {"n": n})
    return {"text": f"hi {n}", "n": n}
"""


def picky(tag: str, fail: str = "odd") -> str:
    """The `write` action of code version `tag`: raises for odd n ("odd"), every n ("all") or
    none ("none"); appends {**body, "by": tag} to cfg["out"] otherwise (after cfg["sleep"])."""
    return textwrap.dedent(
        f"""\
        import json, time
        TAG = {tag!r}
        FAIL = {fail!r}


        def refuse(n):
            raise ValueError(f"n={{n}} refused by {{TAG}}")


        def process(msg, cfg):
            time.sleep(float(cfg.get("sleep", "0")))
            n = msg["body"]["n"]
            if FAIL == "all" or (FAIL == "odd" and n % 2):
                refuse(n)
            line = {{**msg["body"], "by": TAG}}
            with open(cfg["out"], "a") as fh:
                fh.write(json.dumps(line) + "\\n")
            return line
        """
    )


def files(tag: str, fail: str = "odd") -> dict[str, Any]:
    return counter_files(tag, **{"lib/ticker.py": LIMITED_TICKER, "lib/write.py": picky(tag, fail)})


def limited_flow(
    env: FlowEnv,
    limit: int,
    *,
    mapping: str | None = None,
    retry_errors: str | None = None,
    write: dict[str, Any] | None = None,
    interval: str = "20ms",
) -> str:
    out = env.out("counter")
    step: dict[str, Any] = {
        "id": "write",
        "component": "hello",
        "function": "write",
        "config": {"out": out},
        **(write or {}),
    }
    if mapping:
        step["mapping"] = mapping
    tick = {
        "id": "tick",
        "component": "hello",
        "function": "ticker",
        "interval": interval,
        "config": {"limit": limit},
    }
    return flow_toml("counter", out, steps=[tick, step], retry_errors=retry_errors)


def errors(env: FlowEnv, *args: str) -> Any:
    return json.loads(env.daemon.cli("flow", "errors", "counter", *args, "--json").stdout)


def wait_errors(env: FlowEnv, count: int, *args: str) -> list[dict[str, Any]]:
    # Wait on the database first (a CLI call per poll round is a Python start, ~0.5 s of CPU
    # taken from the daemon); the CLI lists a subset of these rows, so it can only match after.
    wait_until(lambda: len(dead_letter_rows(env.daemon.state_dir, "counter")) >= count)
    return list(wait_until(lambda: len(rows := errors(env, *args)) == count and rows))


def fails(env: FlowEnv, *args: str, code: int | None = None) -> str:
    """The one-line error of a CLI command that must fail (with exit `code`, when given)."""
    res = env.daemon.cli(*args, check=False)
    assert res.returncode != 0, res.stdout
    if code is not None:
        assert res.returncode == code, (res.returncode, res.stderr)
    assert "Traceback" not in res.stderr
    [line] = res.stderr.strip().splitlines()
    return line


def events(env: FlowEnv, kind: str) -> list[dict[str, Any]]:
    rows = json.loads(env.daemon.cli("history", "--flow", "counter", "--json").stdout)
    return [r for r in rows if r["kind"] == kind]


def metric(env: FlowEnv, name: str, **labels: str) -> float | None:
    text = HTTP.get(env.daemon.url + "/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and s.labels == labels:
                return float(s.value)
    return None


def steps_by_id(flow: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {s["id"]: s for s in flow["steps"]}


def token(env: FlowEnv) -> dict[str, str]:
    value = (env.daemon.state_dir / "api-token").read_text().strip()
    return {"Authorization": f"Bearer {value}"}


def test_failed_messages_are_kept_shown_and_retried_into_a_fixed_version(make_env: Any) -> None:
    env: FlowEnv = make_env(files("v1"))
    out = env.out("counter")
    env.apply(limited_flow(env, 6))
    letters = wait_errors(env, 3)
    wait_until(lambda: len(read_out(out)) == 3)
    assert [r["n"] for r in read_out(out)] == [2, 4, 6]  # the other messages flowed on

    # Newest first, with the error's first line, one attempt, the versions that failed them.
    assert [r["error"] for r in letters] == [f"ValueError: n={n} refused by v1" for n in (5, 3, 1)]
    assert [r["id"] for r in letters] == sorted((r["id"] for r in letters), reverse=True)
    for r in letters:
        assert (r["step"], r["attempts"], r["flow_version"]) == ("write", 1, 1)
        assert (r["component"], r["component_version"]) == ("hello", 1)
        assert r["created_at"] and "body" not in r
    table = env.daemon.cli("flow", "errors", "counter").stdout
    assert "attempts" in table and "ValueError: n=5 refused by v1" in table
    assert str(letters[0]["id"]) in table

    # One whole: the input message, the traceback, nothing emitted before the error.
    first = letters[-1]
    one = errors(env, "--id", str(first["id"]))
    assert one["body"] == {"text": "hi 1", "n": 1} and isinstance(one["headers"], dict)
    assert one["msg_id"] == first["msg_id"] and one["emitted"] == []
    head, _, trace = one["error"].partition("\n\n")
    assert head == "ValueError: n=1 refused by v1"
    assert trace.startswith("Traceback (most recent call last)") and "in refuse" in trace
    shown = env.daemon.cli("flow", "errors", "counter", "--id", str(first["id"])).stdout
    assert "Traceback (most recent call last)" in shown and '"n": 1' in shown
    assert "hello v1" in shown

    # Bad input: a clear line, a non-zero exit, nothing changed.
    assert "unknown dead letter 999 of flow counter" in fails(
        env, "flow", "errors", "counter", "--id", "999"
    )
    assert "unknown flow 'nope'" in fails(env, "flow", "errors", "nope")
    step_err = fails(env, "flow", "errors", "counter", "--step", "nope")
    assert "unknown step 'nope' in flow counter (its steps: tick, write)" in step_err
    either = fails(env, "flow", "retry", "counter", code=2)
    assert "give either --id N (repeatable) or --all" in either
    assert "not both" in fails(env, "flow", "discard", "counter", "--id", "1", "--all", code=2)
    missing = fails(env, "flow", "retry", "counter", "--id", str(first["id"]), "--id", "999")
    assert "unknown dead letter(s) 999 of flow counter; nothing was changed" in missing
    assert "unknown flow 'nope'" in fails(env, "flow", "retry", "nope", "--all")
    assert "unknown flow 'nope'" in fails(env, "flow", "discard", "nope", "--all")
    assert errors(env) == letters

    # status, flow show and the metrics count them per step.
    flow = env.flow("counter")
    assert flow["dead_letters"] == 3
    assert {k: s["dead_letters"] for k, s in steps_by_id(flow).items()} == {"tick": 0, "write": 3}
    assert "3 dead letters" in env.daemon.cli("status").stdout
    shown_flow = env.show("counter")
    assert shown_flow["dead_letters"] == 3 and steps_by_id(shown_flow)["write"]["dead_letters"] == 3
    assert "dead letters: 3 (write 3)" in env.daemon.cli("flow", "show", "counter").stdout
    assert metric(env, "deployd_dead_letters", flow="counter", step="write") == 3

    # A fixed version: the automatic redeploy leaves the letters alone (retry_errors=manual)…
    env.push(files("v2", fail="none"))
    dep = env.wait_deploy("counter", 2)
    assert dep["status"] == "done" and dep["redriven"] is None
    assert len(errors(env)) == 3
    # … and retrying puts them back, to be handled by the new version, each exactly once.
    res = env.daemon.cli("flow", "retry", "counter", "--id", str(first["id"]))
    assert res.stdout.strip() == "counter: 1 dead letter(s) put back for v2"
    res = env.daemon.cli("flow", "retry", "counter", "--all", "--json")
    assert json.loads(res.stdout) == {
        "flow": "counter",
        "version": 2,
        "retried": 2,
        "failed": 0,
        "skipped": [],
    }
    wait_until(lambda: len(read_out(out)) == 6)
    rows = read_out(out)
    assert sorted(r["n"] for r in rows) == [1, 2, 3, 4, 5, 6]
    assert {r["n"]: r["by"] for r in rows if r["n"] % 2} == {1: "v2", 3: "v2", 5: "v2"}
    assert errors(env) == []
    wait_until(lambda: env.flow("counter")["dead_letters"] == 0)
    assert metric(env, "deployd_dead_letters", flow="counter", step="write") == 0
    retried = events(env, "errors.retried")
    assert [e["detail"]["retried"] for e in retried] == [2, 1]
    assert "2 dead letter(s) put back for v2" in retried[0]["message"]
    assert len(read_out(out)) == 6  # nothing handled twice


def test_retry_on_publish_redrives_once_and_discard_removes(make_env: Any) -> None:
    env: FlowEnv = make_env(files("v1"), rollback_window="2s")
    out = env.out("counter")
    env.apply(limited_flow(env, 4, retry_errors="on_publish"))
    first = wait_errors(env, 2)
    wait_until(lambda: len(read_out(out)) == 2)
    assert [r["error"] for r in first] == [f"ValueError: n={n} refused by v1" for n in (3, 1)]

    # v2 still refuses odd n: after its window, the letters are tried once by v2, fail
    # again, and stay with one attempt more. They are not taken again by this publish.
    env.push(files("v2"))
    assert env.wait_deploy("counter", 2)["status"] == "done"
    dep = env.wait_deploys(lambda ds: (d := ds[0])["redriven"] is not None and d)
    assert (dep["to_version"], dep["redriven"]) == (2, 2)
    again = wait_errors(env, 2)
    assert [r["error"] for r in again] == [f"ValueError: n={n} refused by v2" for n in (3, 1)]
    assert {(r["attempts"], r["component_version"], r["msg_id"]) for r in again} == {
        (2, 2, r["msg_id"]) for r in first
    }
    [redriven] = events(env, "errors.redriven")
    assert "2 dead letter(s) re-driven into v2 (write 2)" in redriven["message"]
    env.daemon.env["COLUMNS"] = "200"  # rich's table fits 80 columns when piped
    assert "done, 2 re-driven" in env.daemon.cli("deploys").stdout
    del env.daemon.env["COLUMNS"]
    history = json.loads(env.daemon.cli("flow", "history", "counter", "--json").stdout)
    assert (
        history["deployments"][0]["redriven"] == 2 and history["deployments"][1]["redriven"] is None
    )

    # Discard one: gone, recorded.
    res = env.daemon.cli(
        "flow", "discard", "counter", "--step", "write", "--id", str(again[0]["id"])
    )
    assert res.stdout.strip() == "counter: 1 dead letter(s) discarded"
    [kept] = errors(env)
    assert kept["id"] == again[1]["id"] and kept["attempts"] == 2  # still not re-driven again
    [discarded] = events(env, "errors.discarded")
    assert (
        discarded["detail"]["discarded"] == 1
        and "1 dead letter(s) discarded" in discarded["message"]
    )

    # v3 handles odd n: its re-drive takes the letter v2 failed, once.
    env.push(files("v3", fail="none"))
    dep = env.wait_deploys(
        lambda ds: (d := ds[0])["to_version"] == 3 and d["redriven"] is not None and d
    )
    assert dep["redriven"] == 1
    wait_until(lambda: len(read_out(out)) == 3)
    assert [(r["n"], r["by"]) for r in read_out(out)] == [(2, "v1"), (4, "v1"), (1, "v3")]
    assert errors(env) == []
    res = env.daemon.cli("flow", "discard", "counter", "--all")
    assert res.stdout.strip() == "counter: 0 dead letter(s) discarded"
    assert len(events(env, "errors.redriven")) == 2 and len(events(env, "errors.discarded")) == 1


def test_mapping_failures_are_dead_letters_of_the_mapper_step(make_env: Any) -> None:
    env: FlowEnv = make_env(files("v1"))
    mapping = 'n % 3 = 0 ? $error("multiple of three: " & $string(n)) : {"n": n, "text": text}'
    env.apply(limited_flow(env, 6, mapping=mapping))
    # n = 3 and 6 fail the mapping; write gets 1, 2, 4, 5 and refuses 1 and 5.
    both = wait_errors(env, 4)
    assert {(r["step"], r["error"]) for r in both} == {
        ("write:mapper", "mapping failed: multiple of three: 6"),
        ("write:mapper", "mapping failed: multiple of three: 3"),
        ("write", "ValueError: n=5 refused by v1"),
        ("write", "ValueError: n=1 refused by v1"),
    }
    mapper = errors(env, "--step", "write:mapper")
    assert [r["error"][-1] for r in mapper] == ["6", "3"]
    assert errors(env, "--id", str(mapper[0]["id"]))["body"] == {"text": "hi 6", "n": 6}
    assert len(errors(env, "--step", "write")) == 4  # ID also means its mapper

    flow = env.flow("counter")
    assert flow["dead_letters"] == 4
    counts = {k: s["dead_letters"] for k, s in steps_by_id(flow).items()}
    assert counts == {"tick": 0, "write:mapper": 2, "write": 2}
    assert metric(env, "deployd_dead_letters", flow="counter", step="write:mapper") == 2

    # A retry maps a mapper letter again with the active mapping: it fails again (attempts 2).
    res = env.daemon.cli("flow", "retry", "counter", "--step", "write:mapper", "--all", "--json")
    assert json.loads(res.stdout)["failed"] == 2 and json.loads(res.stdout)["retried"] == 0
    assert {r["attempts"] for r in errors(env, "--step", "write:mapper")} == {2}

    # With the daemon stopped: status and the listing read the database, retry says so.
    assert env.daemon.stop() == 0
    stopped = json.loads(env.daemon.cli("status", "--json").stdout)["flows"][0]
    assert stopped["dead_letters"] == 4
    assert {k: s["dead_letters"] for k, s in steps_by_id(stopped).items()} == counts
    assert all(s["backpressure"] is False for s in stopped["steps"])
    assert len(errors(env)) == 4
    assert "the daemon is not running" in fails(env, "flow", "retry", "counter", "--all")


def test_a_held_step_shows_backpressure_in_flow_show(make_env: Any) -> None:
    env: FlowEnv = make_env(files("v1", fail="none"))
    slow = {"config": {"out": env.out("counter"), "sleep": "0.2"}, "max_queue": 2}
    env.apply(limited_flow(env, 1000, write=slow, interval="5ms"))
    # Waited for on the HTTP status first (a `flow show` per poll round is a Python start,
    # ~0.5 s of CPU taken from the daemon), then read through `flow show --json` as before.
    wait_until(lambda: steps_by_id(env.flow("counter"))["tick"]["backpressure"])
    shown = wait_until(
        lambda: (f := env.show("counter")) and steps_by_id(f)["tick"]["backpressure"] and f
    )
    assert steps_by_id(shown)["write"]["backpressure"] is False
    held = "held back (the next step's queue is full): tick"
    # The trigger is let go for a moment each time the queue drains (then held again at
    # once): the human view is read until it shows the hold, as the JSON view was.
    assert wait_until(lambda: held in env.daemon.cli("flow", "show", "counter").stdout)


def test_retention_removes_dead_letters_by_count_and_age_and_says_so(make_env: Any) -> None:
    env: FlowEnv = make_env(files("v1", fail="all"), max_dead_letters=2)
    env.apply(limited_flow(env, 5))
    wait_errors(env, 5)

    res = json.loads(env.daemon.cli("gc", "--json").stdout)
    assert res["dead_letters_expired"] == 3
    kept = errors(env)
    assert [errors(env, "--id", str(r["id"]))["body"]["n"] for r in kept] == [5, 4]  # the newest
    [event] = events(env, "dead_letters.expired")
    assert event["detail"] == {
        "step": "write",
        "removed": 3,
        "older_than_keep_dead_letters": 0,
        "beyond_max_dead_letters": 3,
    }
    assert "flow counter step write: 3 dead letter(s) removed by retention" in event["message"]
    assert "3 beyond 2 per step (daemon.max_dead_letters)" in event["message"]
    assert metric(env, "deployd_dead_letters_expired_total", flow="counter", step="write") == 3
    assert (
        "3 dead letter(s)" in json.loads(env.daemon.cli("history", "--json").stdout)[0]["message"]
    )

    # By age, after a reload to keep_dead_letters = "1s" (the periodic job runs the same gc).
    env.daemon.daemon_extra["keep_dead_letters"] = "1s"
    env.daemon.write_config()
    assert env.daemon.proc is not None
    env.daemon.proc.send_signal(signal.SIGHUP)
    removed = [0]

    def expired() -> bool:
        removed[0] += json.loads(env.daemon.cli("gc", "--json").stdout)["dead_letters_expired"]
        return removed[0] == 2

    wait_until(expired, interval=0.2)
    assert errors(env) == []
    # The two may come of age in one gc or in two (they were made apart): one event each.
    by_age = events(env, "dead_letters.expired")[:-1]  # the newest first; the last is by count
    assert by_age and sum(e["detail"]["older_than_keep_dead_letters"] for e in by_age) == 2
    for event in by_age:
        n = event["detail"]["older_than_keep_dead_letters"]
        assert f"{n} older than 1s (daemon.keep_dead_letters)" in event["message"], event
    assert metric(env, "deployd_dead_letters_expired_total", flow="counter", step="write") == 5
    human = env.daemon.cli("gc").stdout
    assert "0 dead letter(s)" in human


def test_the_errors_api_needs_the_token_and_checks_every_body(make_env: Any) -> None:
    env: FlowEnv = make_env(files("v1", fail="all"))
    env.apply(limited_flow(env, 1))
    [letter] = wait_errors(env, 1)
    base = env.daemon.url + "/api/v1/flows/counter/errors"
    auth = token(env)
    for method, path, body in (
        ("GET", "", None),
        ("GET", f"?id={letter['id']}", None),
        ("POST", "/retry", {"all": True}),
        ("POST", "/discard", {"all": True}),
    ):
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            resp = HTTP.request(method, base + path, json=body, headers=headers, timeout=10)
            assert resp.status_code == 401, (path, resp.text)
            assert resp.headers["www-authenticate"] == "Bearer"

    listed = HTTP.get(base, headers=auth, timeout=10)
    assert listed.status_code == 200 and listed.json() == errors(env)
    one = HTTP.get(base, params={"id": letter["id"], "step": "write"}, headers=auth, timeout=10)
    assert one.status_code == 200 and one.json()["body"] == {"text": "hi 1", "n": 1}

    # (path, body, status, words of the answer)
    cases: list[tuple[str, Any, int, str]] = [
        ("/retry", {}, 422, "ids or all"),
        ("/retry", {"all": False}, 422, "ids or all"),
        ("/discard", {"ids": [letter["id"]], "all": True}, 422, "not both"),
        ("/retry", {"ids": []}, 422, "ids"),
        ("/retry", {"ids": "1"}, 422, "ids"),
        ("/retry", {"ids": [0]}, 422, "ids"),
        ("/retry", {"ids": [True]}, 422, "ids"),
        ("/retry", {"ids": ["1"]}, 422, "ids"),
        ("/discard", {"all": "yes"}, 422, "all"),
        ("/discard", {"all": True, "step": 5}, 422, "step"),
        ("/discard", {"all": True, "what": 1}, 422, "what"),
        ("/retry", {"ids": list(range(1, 1002))}, 422, "ids"),
        ("/retry", {"ids": [999_999]}, 404, "unknown dead letter(s) 999999 of flow counter"),
        ("/discard", {"all": True, "step": "nope"}, 404, "unknown step 'nope' in flow counter"),
    ]
    for path, body, status, words in cases:
        resp = HTTP.post(base + path, json=body, headers=auth, timeout=10)
        assert resp.status_code == status, (path, body, resp.text)
        assert words in resp.text, (path, body, resp.text)
    resp = HTTP.post(base + "/retry", content=b"{not json", headers=auth, timeout=10)
    assert resp.status_code == 422
    for method, path, body in (
        ("GET", "", None),
        ("POST", "/retry", {"all": True}),
        ("POST", "/discard", {"ids": [1]}),
    ):
        url = env.daemon.url + "/api/v1/flows/nope/errors" + path
        resp = HTTP.request(method, url, json=body, headers=auth, timeout=10)
        assert resp.status_code == 404 and "unknown flow 'nope'" in resp.text, resp.text
    for query in ({"id": "one"}, {"id": 0}, {"id": 999}):
        resp = HTTP.get(base, params=query, headers=auth, timeout=10)
        assert resp.status_code in (404, 422), (query, resp.text)
    assert errors(env) == [letter]  # nothing changed

    resp = HTTP.post(base + "/discard", json={"ids": [letter["id"]]}, headers=auth, timeout=10)
    assert resp.status_code == 200 and resp.json() == {"flow": "counter", "discarded": 1}
    assert errors(env) == []


def test_a_redrive_owed_by_a_killed_daemon_runs_after_its_restart(make_env: Any) -> None:
    env: FlowEnv = make_env(files("v1"), rollback_window="10m")
    out = env.out("counter")
    env.apply(limited_flow(env, 4, retry_errors="on_publish"))
    first = wait_errors(env, 2)
    env.push(files("v2", fail="none"))
    assert env.wait_deploy("counter", 2)["redriven"] is None  # its window has not passed

    env.daemon.kill()  # within the window: the re-drive is owed, and data says so
    assert errors(env) == first  # the letters survived the kill -9
    env.daemon.daemon_extra["rollback_window"] = "1s"  # what is left of the window: nothing
    env.daemon.start()
    dep = env.wait_deploys(lambda ds: (d := ds[0])["redriven"] is not None and d)
    assert (dep["to_version"], dep["redriven"]) == (2, 2)
    wait_until(lambda: len(read_out(out)) == 4)
    assert sorted((r["n"], r["by"]) for r in read_out(out)) == [
        (1, "v2"),
        (2, "v1"),
        (3, "v2"),
        (4, "v1"),
    ]
    assert errors(env) == []
