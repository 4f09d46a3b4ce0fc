"""Numbered schema migrations of the state database (sqlite-utils `Migrations`).

Each migration runs in its own transaction together with the record that it ran, so a
daemon killed half-way through an upgrade starts again from a consistent schema. Never edit
a migration that has shipped; add the next one.
"""

from __future__ import annotations

from sqlite_utils import Database
from sqlite_utils.migrations import Migrations

migrations = Migrations("deployd")


@migrations()
def m001_builds_versions_events(db: Database) -> None:
    db.execute(
        """
        CREATE TABLE builds (
            id INTEGER PRIMARY KEY,
            component TEXT NOT NULL,
            sha TEXT NOT NULL,
            ref TEXT,
            source TEXT NOT NULL,
            status TEXT NOT NULL CHECK (status IN ('queued','building','succeeded','failed')),
            error TEXT,
            retryable INTEGER NOT NULL DEFAULT 0,
            log_path TEXT,
            version INTEGER,
            queued_at TEXT NOT NULL,
            started_at TEXT,
            finished_at TEXT
        )
        """
    )
    db.execute("CREATE INDEX builds_component ON builds (component, id)")
    db.execute("CREATE INDEX builds_component_sha ON builds (component, sha)")
    db.execute(
        """
        CREATE TABLE versions (
            component TEXT NOT NULL,
            version INTEGER NOT NULL,
            sha TEXT NOT NULL,
            semver TEXT,
            runtime TEXT NOT NULL,
            descriptor TEXT NOT NULL,
            artifact_dir TEXT NOT NULL,
            build_id INTEGER NOT NULL REFERENCES builds(id),
            built_at TEXT NOT NULL,
            PRIMARY KEY (component, version),
            UNIQUE (component, sha)
        )
        """
    )
    db.execute(
        """
        CREATE TABLE events (
            id INTEGER PRIMARY KEY,
            ts TEXT NOT NULL,
            kind TEXT NOT NULL,
            component TEXT,
            flow TEXT,
            sha TEXT,
            message TEXT NOT NULL,
            detail TEXT
        )
        """
    )
    db.execute("CREATE INDEX events_component ON events (component, id)")
    db.execute("CREATE INDEX events_flow ON events (flow, id)")
