"""Flows, flow versions, drafts (with their cause) and deployments: `FlowStore`.

It shares the `Store`'s connection, so its writes are the daemon's single writer too.
"""

from __future__ import annotations

import json
from typing import Any

from ..types import VersionRegistered
from .db import Row, decode_json, utcnow
from .queues import QueueStore

# What a deployment row shows (`flow history --json`, `deploys --json`): the columns of m002,
# and `redriven` (m006: dead letters re-driven into the new version after its rollback window,
# with `retry_errors = "on_publish"`; null when none were tried). `interrupted` (m005) is read
# only by `deployed_version`. `canary` (m017): a canary publish's record, JSON (null: none).
_DEPLOYMENT = (
    "id, flow, from_version, to_version, trigger, component, component_version, sha, status,"
    " reason, log_tail, warmup_ms, gap_ms, started_at, finished_at, redriven, canary"
)
FINAL = ("done", "failed", "rolled_back", "promoted")  # a deployment's statuses once it ended


class FlowStore(QueueStore):
    """Flows and their deployments. It also offers the `QueueStore` methods (by inheritance),
    so code that reaches the queues through a FlowStore keeps working."""

    # -- flows -----------------------------------------------------------------------------

    def flow(self, name: str) -> Row | None:
        """One flow, or None."""
        return self.store.one("SELECT * FROM flows WHERE name = ?", (name,))

    def flows(self) -> list[Row]:
        """Every flow, by name."""
        return self.store.query("SELECT * FROM flows ORDER BY name")

    def create_flow(self, name: str, type_: str, update: str) -> None:
        """Create a flow (stopped, never published)."""
        now = utcnow()
        self.conn.execute(
            'INSERT INTO flows (name, type, "update", enabled, created_at, updated_at)'
            " VALUES (?, ?, ?, 0, ?, ?)",
            (name, type_, update, now, now),
        )

    def set_flow(self, name: str, **fields: Any) -> None:
        """Update columns of a flow (and its updated_at)."""
        if not fields:
            return
        cols = ", ".join(f'"{k}" = ?' for k in fields)
        self.conn.execute(
            f"UPDATE flows SET {cols}, updated_at = ? WHERE name = ?",  # noqa: S608 - fixed keys
            (*fields.values(), utcnow(), name),
        )

    # -- versions and drafts ---------------------------------------------------------------

    def flow_version(self, name: str, version: int) -> Row | None:
        """One flow version (spec and steps decoded), or None."""
        row = self.store.one(
            "SELECT * FROM flow_versions WHERE flow = ? AND version = ?", (name, version)
        )
        return decode_json(row, "spec", "steps")

    def flow_versions(self, name: str) -> list[Row]:
        """Every version of a flow, newest first."""
        rows = self.store.query(
            "SELECT * FROM flow_versions WHERE flow = ? ORDER BY version DESC", (name,)
        )
        return [decode_json(r, "spec", "steps") for r in rows]  # type: ignore[misc]

    def add_flow_version(
        self, name: str, spec: dict[str, Any], steps: list[dict[str, Any]], reason: str | None
    ) -> int:
        """Record the next version of a flow; returns its number."""
        row = self.conn.execute(
            "SELECT COALESCE(MAX(version), 0) + 1 FROM flow_versions WHERE flow = ?", (name,)
        ).fetchone()
        version = int(row[0])
        self.conn.execute(
            "INSERT INTO flow_versions (flow, version, spec, steps, created_at, reason)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (name, version, json.dumps(spec), json.dumps(steps), utcnow(), reason),
        )
        return version

    def draft(self, name: str) -> Row | None:
        """The draft of a flow (spec, steps and problems decoded), or None."""
        return decode_json(
            self.store.one("SELECT * FROM drafts WHERE flow = ?", (name,)),
            "spec",
            "steps",
            "problems",
        )

    def put_draft(
        self,
        name: str,
        spec: dict[str, Any],
        steps: list[dict[str, Any]],
        problems: list[str],
        reason: str | None,
        cause: VersionRegistered | None = None,
    ) -> None:
        """Replace the draft of a flow; `cause` is the component version that made it (None:
        a person's `flow apply`). Call inside a transaction: a caused draft is also recorded
        in `draft_causes`, which outlives the draft."""
        now = utcnow()
        self.conn.execute(
            "INSERT OR REPLACE INTO drafts (flow, spec, steps, problems, reason, created_at,"
            " cause_component, cause_version, cause_sha) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                name,
                json.dumps(spec),
                json.dumps(steps),
                json.dumps(problems),
                reason,
                now,
                cause.component if cause else None,
                cause.version if cause else None,
                cause.sha if cause else None,
            ),
        )
        if cause is not None:
            self.conn.execute(
                "INSERT INTO draft_causes (flow, component, version, sha, problems, manual,"
                " created_at) SELECT name, ?, ?, ?, ?, \"update\" != 'auto', ? FROM flows"
                " WHERE name = ?",
                (cause.component, cause.version, cause.sha, len(problems), now, name),
            )

    def drafted_for_person(self, flow: str, component: str, sha: str) -> bool:
        """True when the last draft of `flow` caused by `sha` of `component` was left for a
        person: it had problems, or the flow is updated by hand (`update` is not auto)."""
        row = self.conn.execute(
            "SELECT c.problems > 0 OR f.\"update\" != 'auto' FROM draft_causes c"
            " LEFT JOIN flows f ON f.name = c.flow"
            " WHERE c.flow = ? AND c.component = ? AND c.sha = ? ORDER BY c.id DESC LIMIT 1",
            (flow, component, sha),
        ).fetchone()
        return bool(row and row[0])

    def waiting_draft(self, name: str) -> Row | None:
        """The draft of `name` when a component version caused it, it is valid and no publish
        was tried since it was made (it waits: for a freeze to end, or for `resume`); else
        None."""
        draft = self.draft(name)
        if draft is None or draft["problems"] or draft["cause_component"] is None:
            return None
        tried = self.conn.execute(
            "SELECT 1 FROM deployments WHERE flow = ? AND started_at >= ? LIMIT 1",
            (name, draft["created_at"]),
        ).fetchone()
        return None if tried else draft

    def delete_draft(self, name: str) -> None:
        """Forget the draft of a flow (it was published)."""
        self.conn.execute("DELETE FROM drafts WHERE flow = ?", (name,))

    # -- deployments -----------------------------------------------------------------------

    def start_deployment(
        self,
        flow: str,
        from_version: int | None,
        to_version: int,
        trigger: str,
        component: str | None = None,
        component_version: int | None = None,
        sha: str | None = None,
    ) -> int:
        """Record the intent to publish (status starting_new); returns the deployment id."""
        cur = self.conn.execute(
            "INSERT INTO deployments (flow, from_version, to_version, trigger, component,"
            " component_version, sha, status, started_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, 'starting_new', ?)",
            (flow, from_version, to_version, trigger, component, component_version, sha, utcnow()),
        )
        return int(cur.lastrowid or 0)

    def set_deployment(self, dep_id: int, **fields: Any) -> None:
        """Update columns of a deployment; a final status also sets finished_at (unless it
        is given: None keeps it open, as a promoted canary's until its switch is made)."""
        if fields.get("status") in FINAL:
            fields.setdefault("finished_at", utcnow())
        cols = ", ".join(f"{k} = ?" for k in fields)
        self.conn.execute(
            f"UPDATE deployments SET {cols} WHERE id = ?",  # noqa: S608 - fixed keys
            (*fields.values(), dep_id),
        )

    def deployments(self, flow: str | None = None, limit: int = 50) -> list[Row]:
        """The newest deployments, of one flow or of all."""
        if flow:
            return _canary_decoded(
                self.store.query(
                    f"SELECT {_DEPLOYMENT} FROM deployments WHERE flow = ?"  # noqa: S608
                    " ORDER BY id DESC LIMIT ?",
                    (flow, limit),
                )
            )
        return _canary_decoded(
            self.store.query(
                f"SELECT {_DEPLOYMENT} FROM deployments ORDER BY id DESC LIMIT ?",  # noqa: S608
                (limit,),
            )
        )

    def deployment(self, dep_id: int) -> Row | None:
        """One deployment, or None."""
        return decode_json(
            self.store.one(
                f"SELECT {_DEPLOYMENT} FROM deployments WHERE id = ?",  # noqa: S608 - constant
                (dep_id,),
            ),
            "canary",
        )

    def last_deployments(self) -> dict[str, Row]:
        """The newest deployment of every flow, in one query."""
        rows = self.store.query(
            f"SELECT {_DEPLOYMENT} FROM deployments WHERE id IN"  # noqa: S608 - constant
            " (SELECT MAX(id) FROM deployments GROUP BY flow)"
        )
        return {r["flow"]: r for r in _canary_decoded(rows)}

    def last_deployment(self) -> Row | None:
        """The newest deployment of any flow, or None."""
        return decode_json(
            self.store.one(
                f"SELECT {_DEPLOYMENT} FROM deployments ORDER BY id DESC LIMIT 1"  # noqa: S608
            ),
            "canary",
        )

    def rollback_source(self, flow: str, active_version: int) -> int | None:
        """The version the last finished publish of `active_version` replaced (what `flow
        rollback` without --to goes back to), or None."""
        row = self.conn.execute(
            "SELECT from_version FROM deployments WHERE flow = ? AND to_version = ?"
            " AND status IN ('done', 'promoted') AND from_version IS NOT NULL"
            " ORDER BY id DESC LIMIT 1",
            (flow, active_version),
        ).fetchone()
        return int(row[0]) if row else None

    def unfinished_deployments(self) -> list[Row]:
        """Deployments a stopped daemon left starting_new, switching or canary, or promoted
        before the switch to the new version was made."""
        return _canary_decoded(
            self.store.query(
                f"SELECT {_DEPLOYMENT} FROM deployments"  # noqa: S608 - constant
                " WHERE status IN ('starting_new', 'switching', 'canary')"
                " OR (status = 'promoted' AND finished_at IS NULL)"
            )
        )

    def deployed_version(self, flow: str, component: str, version: int) -> bool:
        """True when a publish of `flow` was made for `version` of `component` and was not
        merely interrupted by a stopped daemon (whatever its outcome)."""
        row = self.conn.execute(
            "SELECT 1 FROM deployments WHERE flow = ? AND component = ?"
            " AND component_version = ? AND interrupted = 0 LIMIT 1",
            (flow, component, version),
        ).fetchone()
        return row is not None


def _canary_decoded(rows: list[Row]) -> list[Row]:
    for row in rows:
        decode_json(row, "canary")
    return rows
