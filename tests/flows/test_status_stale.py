"""`deployd status` says what `(stale)` means (issue 15 §5), within 80 columns."""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest

from tests.conftest import wait_until
from tests.flows.conftest import FlowEnv, counter_files, flow_toml

pytestmark = pytest.mark.timeout(120)


def test_stale_is_explained(make_env: Callable[..., FlowEnv]) -> None:
    env = make_env()
    env.apply(flow_toml("counter", env.out(), update="manual"))
    env.push(counter_files("v2"), "v2")
    wait_until(lambda: env.flow("counter")["stale"])
    text = env.daemon.cli("status").stdout
    assert "(stale)" in text
    assert "(stale): a component the flow uses has a newer version" in text, text
    for line in text.splitlines():
        assert len(line) <= 80, line


def test_tables_cut_no_cell(env: FlowEnv) -> None:
    """`flow show`, `deploys`, `builds`, `history`: whole headers and cells, rows in 80."""
    env.counter("counter")
    env.push(counter_files("v2"), "v2")
    env.wait_deploy("counter", 2)
    for args, header in (
        (("flow", "show", "counter"), "step"),
        (("deploys",), "id"),
        (("builds",), "id"),
        (("history",), "time (UTC)"),
    ):
        text = env.daemon.cli(*args).stdout
        assert "…" not in text, text
        lines = text.splitlines()
        [head] = [line for line in lines if line.startswith(header + " ")]
        start = lines.index(head)
        for line in lines[start:]:  # a path longer than 80 alone on its line is no cut
            assert len(line) <= 80 or " " not in line.strip(), (args, line)
    shown = env.daemon.cli("flow", "show", "counter").stdout
    assert re.search(
        r"^step\s+kind\s+component\s+function\s+version\s+state\s+pid\s+queued$", shown, re.M
    )
