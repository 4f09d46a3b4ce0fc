"""Dead letters of a Node.js step (issue 11): a throw, a rejection, an `error` event and a
message that never ended each leave the queue as a dead letter with the JavaScript stack;
the other messages flow on, in order."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tests.conftest import dead_letter_rows, wait_until
from tests.node.conftest import NodeEnv, read_out

KINDS = "callback,throw,plain,reject,promise,error,async,noend,last"


def _letters(env: NodeEnv, flow: str) -> list[dict[str, Any]]:
    return dead_letter_rows(env.daemon.state_dir, flow)


def test_node_errors_become_dead_letters_with_the_js_stack(
    node_env: Callable[..., NodeEnv],
) -> None:
    env = node_env(node_end_timeout="2s")
    out = env.out("nodeerr")
    env.apply(
        "nodeerr",
        [
            {
                "id": "script",
                "component": "platform",
                "function": "script",
                "interval": "20ms",
                "config": {"kinds": KINDS},
            },
            {"id": "events", "component": "platform", "function": "events"},
            {
                "id": "write",
                "component": "platform",
                "function": "write",
                "config": {"out": str(out)},
            },
        ],
    )
    env.wait_rows(out, lambda r: any(x["kind"] == "last" for x in r), timeout=60)
    letters = wait_until(lambda: (x := _letters(env, "nodeerr")) and len(x) >= 4 and x, timeout=30)
    by_n = {r["body"]["n"]: r for r in letters}
    assert sorted(by_n) == [2, 4, 6, 8], letters
    kinds = KINDS.split(",")
    for n, row in by_n.items():
        assert row["step"] == "events"
        assert row["body"] == {"n": n, "kind": kinds[n - 1]}  # the input message
        assert (row["component"], row["component_version"], row["flow_version"]) == (
            "platform",
            1,
            1,
        )
        assert row["attempts"] == 1 and row["msg_id"]
    for n, text in ((2, "thrown 2"), (4, "rejected 4"), (6, "boom 6")):
        error = by_n[n]["error"]
        lines = error.splitlines()
        assert lines[0] == f"Error: {text}", error
        assert lines[1] == "", error  # the first line, a blank line, the stack
        assert lines[2] == f"Error: {text}", error
        assert any(
            line.lstrip().startswith("at ") and "lib/actions/events.js:" in line
            for line in lines[3:]
        ), error
        assert by_n[n]["emitted"] == []
    # Never ended: finished after node_end_timeout, an error without a stack; what it
    # emitted is delivered and kept with the letter.
    noend = by_n[8]
    assert noend["error"].startswith("process() did not emit 'end' within 2s"), noend["error"]
    [emitted] = noend["emitted"]
    assert emitted["body"]["n"] == 8 and emitted["body"]["kind"] == "noend"

    rows = read_out(out)
    assert [r["n"] for r in rows] == [1, 1, 3, 5, 7, 8, 9], rows  # in order; 1 emits twice
    assert [r["kind"] for r in rows if r["n"] == 8] == ["noend"]
