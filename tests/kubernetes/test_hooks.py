"""`KubeRun.trigger_hook` and the cleanup of a version's queues, against fakes of the broker
and the cluster (the hook's way through a real broker and pod: `test_pod.py`; end to end
with `flow stop`: `test_e2e.py`)."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import pytest

from deployd.config import DaemonConfig
from deployd.paths import Paths
from deployd.runtime.kubernetes import placement as placement_mod
from deployd.runtime.kubernetes.hooks import HookFailed, HookUnanswered
from deployd.runtime.kubernetes.placement import KubePlacement, KubeRun
from tests.kubernetes.test_manifests import KUBE, sample


class FakeCluster:
    def __init__(self) -> None:
        self.deleted: list[tuple[str, int]] = []

    async def delete_version(self, flow: str, version: int) -> int:
        self.deleted.append((flow, version))
        return 4


def make(tmp_path: Path, answer: Any, deletes: list[str]) -> tuple[KubePlacement, KubeRun]:
    asked: list[tuple[str, str, Any, float]] = []

    async def ask_hook(queue: str, hook: str, data: Any, timeout: float) -> Any:
        asked.append((queue, hook, data, timeout))
        if isinstance(answer, Exception):
            raise answer
        return answer

    async def open_gate(flow: str, name: str) -> None:
        raise AssertionError("not opened here")

    async def unconsumed(flow: str, step: str) -> None:
        raise AssertionError("no switch here")

    async def close_gate(name: str) -> None:
        if name.endswith(".hooks") and "hang" in deletes:
            await asyncio.sleep(3600)  # a broker that does not answer
        deletes.append(name)

    p = KubePlacement(
        KUBE,
        DaemonConfig(warmup_timeout=12.0),
        Paths(tmp_path),
        "amqp://x",
        lambda: None,
        lambda spec: {},
        open_gate,
        close_gate,
        unconsumed,
        ask_hook=ask_hook,
    )
    p._cluster = FakeCluster()  # type: ignore[assignment]
    p.asked = asked  # type: ignore[attr-defined]
    return p, KubeRun(sample(), p, [])


def test_a_hook_is_asked_of_the_trigger_pod_within_the_warm_up_timeout(tmp_path: Path) -> None:
    p, run = make(tmp_path, {"token": 1}, [])
    assert asyncio.run(run.trigger_hook("shutdown", {"token": 0})) == {"token": 1}
    assert p.asked == [("deployd.orders.tick.v7.hooks", "shutdown", {"token": 0}, 12.0)]  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("error", "logged"),
    [
        (HookFailed("startup(): ValueError: boom"), "flow orders: startup(): ValueError: boom"),
        (
            HookUnanswered("no answer within 12 s"),
            "flow orders v7: step tick: startup() did not run in its pod: no answer within 12 s",
        ),
    ],
)
def test_a_failed_or_unanswered_hook_is_a_warning_and_none(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, error: Exception, logged: str
) -> None:
    _, run = make(tmp_path, error, [])
    with caplog.at_level(logging.WARNING, logger="deployd.kubernetes"):
        assert asyncio.run(run.trigger_hook("startup")) is None
    assert logged in caplog.text


def test_a_removed_version_takes_its_gate_and_hooks_queues_with_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    deletes: list[str] = []
    p, run = make(tmp_path, None, deletes)
    p.runs[("orders", 7)] = run
    asyncio.run(p.remove(run))
    assert p._cluster.deleted == [("orders", 7)]  # type: ignore[union-attr]
    gates = [f"deployd.orders.{s.id}.v7.go" for s in run.spec.steps if s.kind != "mapper"]
    assert len(gates) >= 2  # each pod's gate: the trigger's and the actions'
    assert deletes == [*gates, "deployd.orders.tick.v7.hooks"]
    # A broker that does not answer holds a stop up for a few seconds at most.
    monkeypatch.setattr(placement_mod, "QUEUE_DELETE_WAIT", 0.05)
    deletes[:] = ["hang"]
    p, run = make(tmp_path, None, deletes)
    with caplog.at_level(logging.WARNING, logger="deployd.kubernetes"):
        asyncio.run(asyncio.wait_for(p.remove(run), 5))
    assert "queue deployd.orders.tick.v7.hooks not deleted" in caplog.text
    assert deletes == ["hang", *gates]
