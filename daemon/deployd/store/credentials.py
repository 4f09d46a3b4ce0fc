"""The keys steps refreshed with `emit('updateKeys', …)`: one encrypted row per credential.

The store keeps only what it is given: `token` is already encrypted by the caller
(`runtime/credentials.py`, with the config's `daemon.secret_key`); `fields` is the list of the
keys' names (not their values), so `deployd credential list` can say what was refreshed
without the key.
"""

from __future__ import annotations

import json
import sqlite3

from .db import Row, StoreCore, utcnow


class CredentialKeyStore:
    """Rows of `credential_keys` (migration m011)."""

    def __init__(self, store: StoreCore) -> None:
        self.store = store

    def get(self, name: str) -> Row | None:
        """The stored row of credential `name` (component, token, fields, updated_at)."""
        try:
            row = self.store.one(
                "SELECT name, component, token, fields, updated_at FROM credential_keys"
                " WHERE name = ?",
                (name,),
            )
        except sqlite3.OperationalError:  # a database the daemon has not upgraded yet
            return None
        if row is not None:
            row["fields"] = json.loads(row["fields"])
            row["token"] = bytes(row["token"])
        return row

    def summary(self) -> dict[str, Row]:
        """name → {component, fields, updated_at} of every stored row (no token)."""
        try:
            rows = self.store.query(
                "SELECT name, component, fields, updated_at FROM credential_keys"
            )
        except sqlite3.OperationalError:
            return {}
        return {r["name"]: {**r, "fields": json.loads(r["fields"])} for r in rows}

    def put(self, name: str, component: str, token: bytes, fields: list[str]) -> str:
        """Store (replace) the encrypted keys of `name`; the time it was stored."""
        now = utcnow()
        sql = (
            "INSERT OR REPLACE INTO credential_keys (name, component, token, fields, updated_at)"
            " VALUES (?, ?, ?, ?, ?)"
        )
        params = (name, component, token, json.dumps(sorted(fields)), now)
        if self.store.conn.in_transaction:  # inside another write: join it
            self.store.conn.execute(sql, params)
        else:
            with self.store.tx() as conn:
                conn.execute(sql, params)
        return now
