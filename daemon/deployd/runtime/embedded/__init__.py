"""The embedded runtime (the default): forked step processes and SQLite queues, one machine."""

from .runtime import EmbeddedRuntime

__all__ = ["EmbeddedRuntime"]
