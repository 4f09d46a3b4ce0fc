"""Choosing the runtime from config: the one place that knows the implementations."""

from __future__ import annotations

from ..config import Config
from ..metrics import Metrics
from ..paths import Paths
from ..store import Store
from .base import Runtime
from .embedded.runtime import EmbeddedRuntime


def create_runtime(config: Config, store: Store, paths: Paths, metrics: Metrics) -> Runtime:
    """The runtime flows run on (today: the embedded one, forked processes and SQLite)."""
    return EmbeddedRuntime(store, paths, config.daemon, metrics)
