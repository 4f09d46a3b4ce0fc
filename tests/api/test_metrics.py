"""`GET /metrics`: Prometheus text from a per-daemon registry, moved by real builds."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client.parser import text_string_to_metric_families

from deployd.metrics import Metrics
from tests.conftest import HTTP, Daemon, Work, default_descriptor


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_every_documented_metric_is_exported_and_registries_do_not_clash() -> None:
    a, b = Metrics(), Metrics()  # two daemons in one process: no "Duplicated timeseries"
    a.build_finished("hello", "succeeded", 0.4)
    a.version_registered("hello")
    a.webhook_request("github", 202)
    a.poll_error("remote")
    a.deployment("orders", "done")
    a.warmup("orders", 0.3)
    a.switch_gap("orders", 0.002)
    a.set_queue_depth("orders", "step_2", 7)
    a.message_processed("orders", "step_2", 3)
    a.message_failed("orders", "step_2")
    a.step_restarted("orders", "step_2")
    a.set_flows({"running": 2, "stopped": 1})
    a.set_flows({"running": 3})
    a.track_build_queue(lambda: 4)
    got = samples(a.render().decode())
    expect = {
        ("deployd_builds_total", (("component", "hello"), ("status", "succeeded"))): 1,
        ("deployd_build_duration_seconds_count", (("component", "hello"),)): 1,
        ("deployd_versions_registered_total", (("component", "hello"),)): 1,
        ("deployd_webhook_requests_total", (("provider", "github"), ("status", "202"))): 1,
        ("deployd_poll_errors_total", (("component", "remote"),)): 1,
        ("deployd_deployments_total", (("flow", "orders"), ("status", "done"))): 1,
        ("deployd_warmup_seconds_count", (("flow", "orders"),)): 1,
        ("deployd_switch_gap_seconds_count", (("flow", "orders"),)): 1,
        ("deployd_step_queue_depth", (("flow", "orders"), ("step", "step_2"))): 7,
        ("deployd_messages_processed_total", (("flow", "orders"), ("step", "step_2"))): 3,
        ("deployd_messages_failed_total", (("flow", "orders"), ("step", "step_2"))): 1,
        ("deployd_step_restarts_total", (("flow", "orders"), ("step", "step_2"))): 1,
        ("deployd_flows", (("state", "running"),)): 3,
        ("deployd_flows", (("state", "stopped"),)): 0,
        ("deployd_build_queue_depth", ()): 4,
    }
    for key, value in expect.items():
        assert got.get(key) == value, (key, got.get(key))
    a.forget_step("orders", "step_2")
    assert "deployd_step_queue_depth{" not in a.render().decode()
    assert "deployd_builds_total{" not in b.render().decode()  # b saw nothing


def test_builds_and_versions_show_in_metrics(
    daemon_factory: Callable[..., Daemon], component: Callable[..., Work]
) -> None:
    d = daemon_factory().start()
    work = component()
    work.remote = d.hosted("hello")
    d.wait_recent("hello", work.push())
    bad = work.commit_push("broken", {"component.json": default_descriptor(build="exit 3")})
    d.wait_build("hello", bad)

    resp = HTTP.get(d.url + "/metrics", timeout=5)
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/plain")
    got = samples(resp.text)
    assert got[("deployd_builds_total", (("component", "hello"), ("status", "succeeded")))] == 1
    assert got[("deployd_builds_total", (("component", "hello"), ("status", "failed")))] == 1
    assert got[("deployd_build_duration_seconds_count", (("component", "hello"),))] == 2
    assert got[("deployd_versions_registered_total", (("component", "hello"),))] == 1
    assert got[("deployd_build_queue_depth", ())] == 0
    assert ("deployd_event_loop_lag_seconds", ()) in got
    assert d.stop() == 0
