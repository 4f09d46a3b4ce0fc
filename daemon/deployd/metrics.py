"""Prometheus metrics (`GET /metrics`), one registry per `Daemon`.

Each metric has a small method named for the event that moves it, so callers neither touch
prometheus-client nor invent label names. The registry is per daemon (not the process-wide
default), so several daemons in one test process never clash. Label values are component,
flow and step names from the config and state, so their number stays bounded.

Who calls what:
- pipeline: `build_finished`, `version_registered` (wired in `Pipeline.build`);
- webhooks: `webhook_request(provider, status_code)`; poller: `poll_error(component)`;
- deployer: `deployment(flow, status)`, `warmup(flow, seconds)`, `switch_gap(flow, seconds)`;
- runtime: `set_queue_depth`, `message_processed`, `message_failed`, `step_restarted`;
- flows summary: `set_flows({"running": 3, "stopped": 1, ...})`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

CONTENT_TYPE = CONTENT_TYPE_LATEST
_BUILD_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)
_WARMUP_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 3, 5, 10, 30, 60)
_GAP_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)


class Metrics:
    """Every metric deployd exports, registered in its own `CollectorRegistry`."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self._builds = Counter(
            "deployd_builds",
            "Finished builds by component and status (succeeded, failed, interrupted).",
            ["component", "status"],
            registry=r,
        )
        self._build_seconds = Histogram(
            "deployd_build_duration_seconds",
            "Wall time of a build: export, build and test commands, registration.",
            ["component"],
            buckets=_BUILD_BUCKETS,
            registry=r,
        )
        self._versions = Counter(
            "deployd_versions_registered",
            "Component versions registered.",
            ["component"],
            registry=r,
        )
        self._flow_requests = Counter(
            "deployd_flow_requests",
            "Requests to HTTP-fed flows (POST /flows/<flow>/in) by flow and HTTP status code "
            '(flow "-": no HTTP-fed flow of that name).',
            ["flow", "status"],
            registry=r,
        )
        self._webhooks = Counter(
            "deployd_webhook_requests",
            "Webhook requests by provider and HTTP status code.",
            ["provider", "status"],
            registry=r,
        )
        self._poll_errors = Counter(
            "deployd_poll_errors", "Failed polls of a remote repository.", ["component"], registry=r
        )
        self._deployments = Counter(
            "deployd_deployments",
            "Flow deployments (publishes) by flow and final status.",
            ["flow", "status"],
            registry=r,
        )
        self._warmup = Histogram(
            "deployd_warmup_seconds",
            "Time for all new step processes of a publish to report ready.",
            ["flow"],
            buckets=_WARMUP_BUCKETS,
            registry=r,
        )
        self._gap = Histogram(
            "deployd_switch_gap_seconds",
            "Switch-over gap of a publish: no trigger running between old and new.",
            ["flow"],
            buckets=_GAP_BUCKETS,
            registry=r,
        )
        self._queue_depth = Gauge(
            "deployd_step_queue_depth",
            "Messages waiting in the durable queue in front of a flow step.",
            ["flow", "step"],
            registry=r,
        )
        self._processed = Counter(
            "deployd_messages_processed",
            "Messages a flow step processed successfully.",
            ["flow", "step"],
            registry=r,
        )
        self._failed = Counter(
            "deployd_messages_failed",
            "Messages a flow step failed to process.",
            ["flow", "step"],
            registry=r,
        )
        self._restarts = Counter(
            "deployd_step_restarts",
            "Restarts of a flow step's process by the supervisor.",
            ["flow", "step"],
            registry=r,
        )
        self._flows = Gauge("deployd_flows", "Flows by state.", ["state"], registry=r)
        self._build_queue = Gauge(
            "deployd_build_queue_depth", "Components with a pending or running build.", registry=r
        )
        self._loop_lag = Gauge(
            "deployd_event_loop_lag_seconds", "Last measured lag of the event loop.", registry=r
        )
        self._flow_states: set[str] = set()
        self._backpressure = Counter(
            "deployd_backpressure_seconds",
            "Time a flow step was held back because the next step's queue was full.",
            ["flow", "step"],
            registry=r,
        )
        self._dead_letters = Gauge(
            "deployd_dead_letters",
            "Messages whose handling failed, kept with their input (retry or discard them).",
            ["flow", "step"],
            registry=r,
        )
        self._dl_expired = Counter(
            "deployd_dead_letters_expired",
            "Dead letters removed by retention (daemon.keep_dead_letters, max_dead_letters).",
            ["flow", "step"],
            registry=r,
        )
        self._dead_letter_keys: set[tuple[str, str]] = set()

    # -- pipeline --------------------------------------------------------------------------

    def build_finished(self, component: str, status: str, seconds: float) -> None:
        """A build ended: `status` is succeeded, failed or interrupted."""
        self._builds.labels(component, status).inc()
        self._build_seconds.labels(component).observe(seconds)

    def version_registered(self, component: str) -> None:
        self._versions.labels(component).inc()

    def track_build_queue(self, depth: Callable[[], float]) -> None:
        """Read the build queue depth from `depth()` at each scrape."""
        self._build_queue.set_function(depth)

    def track_loop_lag(self, lag: Callable[[], float]) -> None:
        self._loop_lag.set_function(lag)

    # -- sources ---------------------------------------------------------------------------

    def webhook_request(self, provider: str, status: int) -> None:
        """One webhook request answered with HTTP `status` (provider: github, gitlab, …)."""
        self._webhooks.labels(provider, str(status)).inc()

    def flow_request(self, flow: str, status: int) -> None:
        """One request to an HTTP-fed flow answered with HTTP `status`."""
        self._flow_requests.labels(flow, str(status)).inc()

    def poll_error(self, component: str) -> None:
        self._poll_errors.labels(component).inc()

    # -- flows -----------------------------------------------------------------------------

    def deployment(self, flow: str, status: str) -> None:
        """A publish ended: `status` such as done, rolled_back, failed."""
        self._deployments.labels(flow, status).inc()

    def warmup(self, flow: str, seconds: float) -> None:
        self._warmup.labels(flow).observe(seconds)

    def switch_gap(self, flow: str, seconds: float) -> None:
        self._gap.labels(flow).observe(seconds)

    def set_queue_depth(self, flow: str, step: str, depth: int) -> None:
        self._queue_depth.labels(flow, step).set(depth)

    def forget_step(self, flow: str, step: str) -> None:
        """Drop a removed step's gauges, so a deleted flow does not linger in /metrics."""
        with contextlib.suppress(KeyError):
            self._queue_depth.remove(flow, step)

    def message_processed(self, flow: str, step: str, count: int = 1) -> None:
        self._processed.labels(flow, step).inc(count)

    def message_failed(self, flow: str, step: str, count: int = 1) -> None:
        self._failed.labels(flow, step).inc(count)

    def backpressure(self, flow: str, step: str, seconds: float) -> None:
        self._backpressure.labels(flow, step).inc(seconds)

    def dead_letters_expired(self, flow: str, step: str, count: int) -> None:
        self._dl_expired.labels(flow, step).inc(count)

    def set_dead_letters(self, counts: Mapping[tuple[str, str], int]) -> None:
        """Dead letters now, by (flow, step); steps missing from `counts` become 0."""
        for key in self._dead_letter_keys - set(counts):
            self._dead_letters.labels(*key).set(0)
        for (flow, step), count in counts.items():
            self._dead_letters.labels(flow, step).set(count)
        self._dead_letter_keys |= set(counts)

    def step_restarted(self, flow: str, step: str) -> None:
        self._restarts.labels(flow, step).inc()

    def set_flows(self, by_state: Mapping[str, int]) -> None:
        """How many flows are in each state now; states missing from `by_state` become 0."""
        for state in self._flow_states - set(by_state):
            self._flows.labels(state).set(0)
        for state, count in by_state.items():
            self._flows.labels(state).set(count)
        self._flow_states |= set(by_state)

    # -- exposition ------------------------------------------------------------------------

    def render(self) -> bytes:
        """The registry in Prometheus text format."""
        return bytes(generate_latest(self.registry))
