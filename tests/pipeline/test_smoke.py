"""The shortest path through the product: a push to a hosted repository becomes v1."""

from __future__ import annotations

from collections.abc import Callable

from tests.conftest import Daemon, Work


def test_push_to_hosted_repo_registers_recent_version(
    daemon: Daemon, component: Callable[..., Work]
) -> None:
    work = component()
    sha = work.push(daemon.hosted("hello"))
    comp = daemon.wait_recent("hello", sha)
    assert comp["recent"]["version"] == 1
    assert comp["last_build"]["status"] == "succeeded"
