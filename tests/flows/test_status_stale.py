"""`deployd status` says what `(stale)` means (issue 15 §5), within 80 columns."""

from __future__ import annotations

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
