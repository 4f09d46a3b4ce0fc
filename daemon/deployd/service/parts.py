"""Wiring in one place: `assemble(config, …)` builds every part with its collaborators.

Nothing is attached after construction and nothing looks a part up by name: each part gets
what it uses when it is made, in dependency order (runtime → deployer → pipeline → sources →
operator). The HTTP layer receives the finished `Parts` (see `api/app.py`).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from ..auth import ensure_token
from ..config import Config
from ..flows.deployer import Deployer
from ..flows.intake import FlowIntake
from ..health import LagMonitor
from ..metrics import Metrics
from ..notify import Notifier
from ..objects import FileStore, ObjectStore, ensure_key
from ..ops import Operator
from ..outbox.sender import OutboxSender
from ..outbox.writer import OutboxWriter
from ..paths import Paths
from ..pauses import Pauses
from ..pipeline.queue import Pipeline
from ..runtime.base import Runtime
from ..runtime.credentials import Credentials
from ..runtime.factory import create_runtime
from ..sources.inbox import Inbox
from ..sources.poll import Poller
from ..sources.watch import Watcher
from ..sources.webhook import WebhookIntake
from ..store import Store
from .eventlog import log_event
from .repos import Repos


@dataclass
class Parts:
    """Every part of a running daemon. `config` is replaced by a reload."""

    config: Config
    paths: Paths
    store: Store
    metrics: Metrics
    lag: LagMonitor
    notifier: Notifier
    pauses: Pauses
    runtime: Runtime
    deployer: Deployer
    pipeline: Pipeline
    watcher: Watcher
    inbox: Inbox
    repos: Repos
    poller: Poller
    intake: WebhookIntake
    flow_intake: FlowIntake  # POST /flows/{name}/in (HTTP-fed flows)
    operator: Operator
    api_token: str
    object_store: ObjectStore
    object_key: bytes
    outbox: OutboxSender  # commit statuses and notifications (issue 15)
    stopping: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def accepting(self) -> bool:
        """False once a stop began: mutating routes and webhooks answer 503 from then on."""
        return not self.stopping.is_set()


def assemble(config: Config, store: Store, paths: Paths, loop: asyncio.AbstractEventLoop) -> Parts:
    """Build every part of the daemon, on `loop`, from a validated config and an open store."""
    metrics = Metrics()
    live: Parts | None = None

    def current_config() -> Config:
        # Webhook secrets, report tokens and notify targets apply at once after a reload,
        # which replaces `Parts.config`.
        return live.config if live is not None else config

    # First of all, so that every event from here on is logged and reaches the outbox.
    outbox = OutboxSender(current_config, store, loop)
    store.add_event_listener(log_event)
    store.add_event_listener(OutboxWriter(current_config, store, outbox.wake).on_event)
    pauses = Pauses(store)
    pauses.load()
    credentials = Credentials(config, store)  # one for the runtime and the deployer
    runtime = create_runtime(config, store, paths, metrics, credentials)
    deployer = Deployer(config, store, runtime, pauses, metrics, credentials)
    pipeline = Pipeline(
        config, store, paths, pauses, metrics, listeners=[deployer.on_version_registered]
    )
    watcher = Watcher(loop)
    repos = Repos(config, store, paths, pipeline, pauses, watcher, pipeline.notify)
    inbox = Inbox(paths.inbox, pipeline.notify)
    poller = Poller(config, store, pipeline.pending, pipeline.notify, metrics)
    stopping = asyncio.Event()
    intake = WebhookIntake(
        current_config, store, pipeline.notify, metrics, lambda: not stopping.is_set()
    )
    flow_intake = FlowIntake(
        current_config,
        store,
        deployer.publisher,
        runtime,
        metrics,
        lambda: not stopping.is_set(),
    )
    object_store = FileStore(paths.objects)
    operator = Operator(
        config, store, paths, pauses, deployer, pipeline, repos.reconcile, metrics, object_store
    )
    lag = LagMonitor()
    metrics.track_build_queue(lambda: pipeline.queue_depth)
    metrics.track_loop_lag(lag.current)
    live = Parts(
        config=config,
        paths=paths,
        store=store,
        metrics=metrics,
        lag=lag,
        # systemd: READY/RELOADING/STOPPING/STATUS and the watchdog (no-ops outside systemd).
        notifier=Notifier.from_env(),
        pauses=pauses,
        runtime=runtime,
        deployer=deployer,
        pipeline=pipeline,
        watcher=watcher,
        inbox=inbox,
        repos=repos,
        poller=poller,
        intake=intake,
        flow_intake=flow_intake,
        operator=operator,
        api_token=ensure_token(config),
        object_store=object_store,
        object_key=ensure_key(paths),
        outbox=outbox,
        stopping=stopping,
    )
    return live
