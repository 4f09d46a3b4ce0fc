"""The state database (SQLite, one writer): the only package that writes SQL.

`db` is the core (connection, WAL, transactions, events, meta); `builds` completes `Store`
(builds, versions, paused items, webhook deliveries, poll state); `flows` has `FlowStore`
(flows, drafts, deployments); `queues` has `QueueStore` (messages, snapshots, counters);
`migrations` the numbered schema changes.
"""

from __future__ import annotations

from .builds import Store
from .db import Row, StoreCore, utcnow
from .flows import FlowStore
from .queues import QueueStore

__all__ = ["FlowStore", "QueueStore", "Row", "Store", "StoreCore", "utcnow"]
