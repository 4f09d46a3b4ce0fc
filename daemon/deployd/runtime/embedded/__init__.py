"""The embedded runtime (the default): forked step processes and SQLite queues, one machine.

Import `runtime.EmbeddedRuntime` from `.runtime`; this package imports nothing, because the
fork server (`python -m deployd.runtime.embedded.forkserver`) imports it first, and every
Python step inherits what the fork server has loaded: a step must not get the daemon's
pydantic, jsonata or sqlite modules in place of its own.
"""
