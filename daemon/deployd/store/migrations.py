"""Numbered schema migrations of the state database (sqlite-utils `Migrations`).

Each migration runs in its own transaction together with the record that it ran, so a
daemon killed half-way through an upgrade starts again from a consistent schema. Never edit
a migration that has shipped; add the next one.
"""

from __future__ import annotations

import re

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


@migrations()
def m002_flows(db: Database) -> None:
    db.execute(
        """
        CREATE TABLE flows (
            name TEXT PRIMARY KEY,
            type TEXT NOT NULL,
            "update" TEXT NOT NULL,
            enabled INTEGER NOT NULL DEFAULT 0,
            active_version INTEGER,
            needs_attention TEXT,
            startup_data TEXT,
            created_at TEXT NOT NULL,
            updated_at TEXT NOT NULL
        )
        """
    )
    db.execute(
        """
        CREATE TABLE flow_versions (
            flow TEXT NOT NULL REFERENCES flows(name),
            version INTEGER NOT NULL,
            spec TEXT NOT NULL,
            steps TEXT NOT NULL,
            created_at TEXT NOT NULL,
            reason TEXT,
            PRIMARY KEY (flow, version)
        )
        """
    )
    db.execute(
        """
        CREATE TABLE drafts (
            flow TEXT PRIMARY KEY REFERENCES flows(name),
            spec TEXT NOT NULL,
            steps TEXT NOT NULL,
            problems TEXT NOT NULL,
            reason TEXT,
            created_at TEXT NOT NULL
        )
        """
    )
    db.execute(
        """
        CREATE TABLE deployments (
            id INTEGER PRIMARY KEY,
            flow TEXT NOT NULL,
            from_version INTEGER,
            to_version INTEGER NOT NULL,
            trigger TEXT,
            component TEXT,
            component_version INTEGER,
            sha TEXT,
            status TEXT NOT NULL CHECK (status IN
                ('starting_new','switching','done','failed','rolled_back')),
            reason TEXT,
            log_tail TEXT,
            warmup_ms REAL,
            gap_ms REAL,
            started_at TEXT NOT NULL,
            finished_at TEXT
        )
        """
    )
    db.execute("CREATE INDEX deployments_flow ON deployments (flow, id)")
    db.execute(
        """
        CREATE TABLE messages (
            id INTEGER PRIMARY KEY,
            flow TEXT NOT NULL,
            step TEXT NOT NULL,
            msg_id TEXT NOT NULL,
            body TEXT NOT NULL,
            headers TEXT NOT NULL,
            attempts INTEGER NOT NULL DEFAULT 0,
            not_before REAL NOT NULL DEFAULT 0,
            created_at TEXT NOT NULL
        )
        """
    )
    db.execute("CREATE INDEX messages_queue ON messages (flow, step, id)")
    db.execute(
        """
        CREATE TABLE snapshots (
            flow TEXT NOT NULL,
            step TEXT NOT NULL,
            data TEXT NOT NULL,
            updated_at TEXT NOT NULL,
            PRIMARY KEY (flow, step)
        )
        """
    )
    db.execute(
        """
        CREATE TABLE step_stats (
            flow TEXT NOT NULL,
            step TEXT NOT NULL,
            processed INTEGER NOT NULL DEFAULT 0,
            failed INTEGER NOT NULL DEFAULT 0,
            restarts INTEGER NOT NULL DEFAULT 0,
            last_error TEXT,
            PRIMARY KEY (flow, step)
        )
        """
    )


@migrations()
def m003_webhook_deliveries(db: Database) -> None:
    """Webhook delivery ids (replay protection, kept >= 24 h) and the state of each poller."""
    db.execute(
        """
        CREATE TABLE webhook_deliveries (
            component TEXT NOT NULL,
            delivery_id TEXT NOT NULL,
            provider TEXT NOT NULL,
            sha TEXT,
            received_at TEXT NOT NULL,
            PRIMARY KEY (component, delivery_id)
        )
        """
    )
    db.execute("CREATE INDEX webhook_deliveries_received ON webhook_deliveries (received_at)")
    db.execute(
        """
        CREATE TABLE poll_state (
            component TEXT PRIMARY KEY,
            interval REAL NOT NULL,
            last_ok TEXT,
            last_error TEXT,
            last_error_at TEXT,
            failures INTEGER NOT NULL DEFAULT 0,
            head TEXT,
            next_at TEXT
        )
        """
    )


@migrations()
def m004_operator(db: Database) -> None:
    """Paused flows and components, and small daemon facts (disk use) for `status`."""
    db.execute(
        """
        CREATE TABLE paused (
            kind TEXT NOT NULL CHECK (kind IN ('flow', 'component')),
            name TEXT NOT NULL,
            since TEXT NOT NULL,
            PRIMARY KEY (kind, name)
        )
        """
    )
    db.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
    db.execute("CREATE INDEX events_kind ON events (kind, id)")


_AUTO_DRAFT_REASON = re.compile(r"(\S+) v(\d+) \(([0-9a-f]+)\)")


@migrations()
def m005_draft_causes(db: Database) -> None:
    """A draft's cause and a deployment's interruption as data, not text to parse.

    `drafts.cause_*` name the component version that caused the draft (NULL: `flow apply`);
    `draft_causes` keeps one row per automatic draft, surviving the draft's replacement;
    `deployments.interrupted` marks what start-up recovery failed. Older rows are backfilled
    from the texts the daemon wrote before (the draft's reason, the `draft.created` event).
    """
    db.execute("ALTER TABLE drafts ADD COLUMN cause_component TEXT")
    db.execute("ALTER TABLE drafts ADD COLUMN cause_version INTEGER")
    db.execute("ALTER TABLE drafts ADD COLUMN cause_sha TEXT")
    db.execute(
        """
        CREATE TABLE draft_causes (
            id INTEGER PRIMARY KEY,
            flow TEXT NOT NULL,
            component TEXT NOT NULL,
            version INTEGER,
            sha TEXT NOT NULL,
            problems INTEGER NOT NULL,
            manual INTEGER,
            created_at TEXT NOT NULL
        )
        """
    )
    db.execute("CREATE INDEX draft_causes_cause ON draft_causes (flow, component, sha, id)")
    db.execute("ALTER TABLE deployments ADD COLUMN interrupted INTEGER NOT NULL DEFAULT 0")
    db.execute("UPDATE deployments SET interrupted = 1 WHERE reason LIKE 'interrupted:%'")
    # Old automatic drafts have the reason "<component> v<version> (<sha[:12]>)".
    for flow, reason in db.execute("SELECT flow, reason FROM drafts").fetchall():
        match = _AUTO_DRAFT_REASON.fullmatch(reason or "")
        if match is None:
            continue
        component, version = match[1], int(match[2])
        row = db.execute(
            "SELECT sha FROM versions WHERE component = ? AND version = ?", (component, version)
        ).fetchone()
        db.execute(
            "UPDATE drafts SET cause_component = ?, cause_version = ?, cause_sha = ?"
            " WHERE flow = ?",
            (component, version, row[0] if row else None, flow),
        )
    # Old `draft.created` events of automatic drafts carry the flow, component and sha, and
    # end with ": needs attention: <problem>; <problem>…" when the draft had problems.
    events = db.execute(
        "SELECT e.flow, e.component, v.version, e.sha, e.message, e.ts FROM events e"
        " LEFT JOIN versions v ON v.component = e.component AND v.sha = e.sha"
        " WHERE e.kind = 'draft.created' AND e.flow IS NOT NULL AND e.component IS NOT NULL"
        " AND e.sha IS NOT NULL ORDER BY e.id"
    ).fetchall()
    for flow, component, version, sha, message, ts in events:
        problems = 0
        if "needs attention" in message:
            _head, _sep, listed = message.partition(": needs attention: ")
            problems = len(listed.split("; ")) if listed else 1
        db.execute(
            "INSERT INTO draft_causes (flow, component, version, sha, problems, manual,"
            " created_at) VALUES (?, ?, ?, ?, ?, NULL, ?)",
            (flow, component, version, sha, problems, ts),
        )


@migrations()
def m006_dead_letters(db: Database) -> None:
    """Dead letters: messages whose handling failed, kept with their input (issue 11).

    `step` is the step whose handling failed, or `<id>:mapper` when the mapping of the step's
    input failed (then `body` is the message before the mapping). `error` is the whole text
    (first line, then the traceback or stack); `emitted` what the step emitted before failing
    (delivered all the same). `messages.failures` carries a retried letter's attempts back
    into its queue; `deployments.redriven` counts letters re-driven after a publish.
    """
    db.execute(
        """
        CREATE TABLE dead_letters (
            id INTEGER PRIMARY KEY,
            flow TEXT NOT NULL,
            step TEXT NOT NULL,
            msg_id TEXT NOT NULL,
            body TEXT NOT NULL,
            headers TEXT NOT NULL,
            flow_version INTEGER,
            component TEXT,
            component_version INTEGER,
            error TEXT NOT NULL,
            attempts INTEGER NOT NULL DEFAULT 1,
            emitted TEXT NOT NULL DEFAULT '[]',
            created_at TEXT NOT NULL
        )
        """
    )
    db.execute("CREATE INDEX dead_letters_step ON dead_letters (flow, step, id)")
    db.execute("CREATE INDEX dead_letters_age ON dead_letters (created_at)")
    db.execute("ALTER TABLE messages ADD COLUMN failures INTEGER NOT NULL DEFAULT 0")
    db.execute("ALTER TABLE deployments ADD COLUMN redriven INTEGER")


@migrations()
def m007_handled_messages(db: Database) -> None:
    """Message ids each step has handled on the RabbitMQ runtime (issue 12).

    Written in the group commit that records a message's result, before the broker is told
    (ack): a message the broker delivers again (its consumer's connection broke before the
    ack arrived) is recognised here and not handed to `process()` a second time. Pruned by
    age (`QueueStore.prune_handled`). `broker_queues` lists the step queues deployd declared
    on the broker.
    """
    db.execute(
        """
        CREATE TABLE handled (
            flow TEXT NOT NULL,
            step TEXT NOT NULL,
            msg_id TEXT NOT NULL,
            at REAL NOT NULL,
            PRIMARY KEY (flow, step, msg_id)
        ) WITHOUT ROWID
        """
    )
    db.execute("CREATE INDEX handled_age ON handled (at)")
    # The number of the last recorded trigger call that produced something, per trigger: the
    # ids of a call's outputs derive from it, so a call made again after a failed publish
    # gives its outputs the same ids (and the next step recognises them).
    db.execute(
        "CREATE TABLE trigger_calls (flow TEXT NOT NULL, step TEXT NOT NULL,"
        " seq INTEGER NOT NULL, PRIMARY KEY (flow, step)) WITHOUT ROWID"
    )
    # The step input queues deployd declared on a broker (so their depths are known at start).
    db.execute(
        "CREATE TABLE broker_queues (flow TEXT NOT NULL, step TEXT NOT NULL,"
        " PRIMARY KEY (flow, step)) WITHOUT ROWID"
    )


@migrations()
def m008_passthrough(db: Database) -> None:
    """Passthrough on every message (issue 17): what each earlier step of the same flow
    execution emitted, by step id (`{"<step>": {"id", "body", "headers"}}`), as the seed
    platform's sailor carries it.

    It is a column of its own, not part of `body` or `headers`, so the daemon forwards it as
    the JSON text it stored (never decoded on the way), and a dead letter keeps it with its
    input so a retried letter carries it again.
    """
    db.execute("ALTER TABLE messages ADD COLUMN passthrough TEXT NOT NULL DEFAULT '{}'")
    db.execute("ALTER TABLE dead_letters ADD COLUMN passthrough TEXT NOT NULL DEFAULT '{}'")


@migrations()
def m009_version_warnings(db: Database) -> None:
    """What a build found worth telling about a version without failing it (issue 17): a JSON
    list of sentences, such as an `engines.node` the node in use does not satisfy."""
    db.execute("ALTER TABLE versions ADD COLUMN warnings TEXT NOT NULL DEFAULT '[]'")


@migrations()
def m010_attachments(db: Database) -> None:
    """Attachments on every message (issue 17): `{"<name>": {"url", "size", "content-type"}}`
    as the seed platform's messages carry them, kept (like passthrough) as the JSON text the
    sailor sent, with queued messages and dead letters.

    `object_refs` records, per object of the object store, when a message referencing it (by
    its url) was last emitted: retention keeps an object while a queued message or a dead
    letter references it, and for `daemon.keep_attachments` after the last message that did
    (messages waiting on a broker are not in this database).
    """
    db.execute("ALTER TABLE messages ADD COLUMN attachments TEXT NOT NULL DEFAULT '{}'")
    db.execute("ALTER TABLE dead_letters ADD COLUMN attachments TEXT NOT NULL DEFAULT '{}'")
    db.execute(
        "CREATE TABLE object_refs (object_id TEXT PRIMARY KEY, flow TEXT NOT NULL,"
        " last_seen REAL NOT NULL) WITHOUT ROWID"
    )


@migrations()
def m011_credential_keys(db: Database) -> None:
    """The keys a step refreshed with `emit('updateKeys', keys)` (issue 17), one row per
    credential of the config: `token` is the keys as JSON, encrypted with the config's
    `daemon.secret_key` (Fernet: AES-128-CBC and HMAC-SHA256), never in clear. `component`
    is the credential's component when they were stored (keys of a credential that was given
    to another component since are not used). Independent of every other table."""
    db.execute(
        "CREATE TABLE credential_keys (name TEXT NOT NULL PRIMARY KEY, component TEXT NOT NULL,"
        " token BLOB NOT NULL, fields TEXT NOT NULL, updated_at TEXT NOT NULL) WITHOUT ROWID"
    )


@migrations()
def m012_flow_runs(db: Database) -> None:
    """Runs of ordinary (scheduled) flows (issue 14), and when each one is due next.

    A run is recorded `running` before its steps start and finished with its status, so a
    run a killed daemon left `running` is found at the next start (and recorded `failed`,
    interrupted). `steps` is the JSON list of the component version each step ran
    (`[{"id", "component", "version"}]`), `errors` a JSON list of sentences. `flow_schedules`
    keeps the next due time of every scheduled flow: a due time that passed while deployd was
    stopped is a missed run (`catch_up`).
    """
    db.execute(
        """
        CREATE TABLE flow_runs (
            id INTEGER PRIMARY KEY,
            flow TEXT NOT NULL,
            cause TEXT NOT NULL,
            status TEXT NOT NULL
                CHECK (status IN ('running','succeeded','failed','timed_out','skipped')),
            flow_version INTEGER,
            steps TEXT NOT NULL DEFAULT '[]',
            handled INTEGER NOT NULL DEFAULT 0,
            errors TEXT NOT NULL DEFAULT '[]',
            reason TEXT,
            started_at TEXT NOT NULL,
            finished_at TEXT
        )
        """
    )
    db.execute("CREATE INDEX flow_runs_flow ON flow_runs (flow, id)")
    db.execute("CREATE INDEX flow_runs_running ON flow_runs (status) WHERE status = 'running'")
    db.execute(
        "CREATE TABLE flow_schedules (flow TEXT NOT NULL PRIMARY KEY, next_run_at TEXT)"
        " WITHOUT ROWID"
    )


@migrations()
def m015_quarantine(db: Database) -> None:
    """Quarantined component versions (issue 16): a version whose automatic publish to a flow
    failed its warm-up or was rolled back is never tried again for that flow by an automatic
    redeploy, a catch-up or `deployd redeploy`; `deployd flow publish NAME --version C@N`
    publishes it on purpose and, live, lifts the quarantine (the row is deleted, an event
    says so). `deployment` is the deployment that failed."""
    db.execute(
        "CREATE TABLE quarantine (flow TEXT NOT NULL, component TEXT NOT NULL,"
        " version INTEGER NOT NULL, reason TEXT NOT NULL, deployment INTEGER,"
        " created_at TEXT NOT NULL, PRIMARY KEY (flow, component, version)) WITHOUT ROWID"
    )


@migrations()
def m016_ignored_commits(db: Database) -> None:
    """Commits a component ignored because they change none of its `paths` (issue 16,
    monorepos): like a final build, they are never looked at again by polls, restarts or
    redelivered webhooks; `deployd redeploy COMPONENT --sha SHA` builds one on purpose.
    `reason` is what `deployd history` said (the paths, and the version compared with)."""
    db.execute(
        "CREATE TABLE ignored_commits (component TEXT NOT NULL, sha TEXT NOT NULL,"
        " reason TEXT NOT NULL, at TEXT NOT NULL, PRIMARY KEY (component, sha)) WITHOUT ROWID"
    )


_DEPLOYMENT_STATUSES = "('starting_new','switching','done','failed','rolled_back')"


@migrations()
def m017_canary(db: Database) -> None:
    """Canary publishes (issue 16, section 3): a deployment can be `canary` (the new version
    handles a share of its changed steps' messages) and end `promoted`; `canary` is its JSON
    record (settings, changed steps, and the messages and errors of both versions it was
    judged on). SQLite cannot change a CHECK constraint, so the table is rebuilt from its own
    stored definition (whatever columns migrations added to it are kept), rows and ids
    included, with its indexes."""
    (sql,) = db.execute(
        "SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'deployments'"
    ).fetchone()
    compact = re.sub(r"\s+", "", sql)
    if _DEPLOYMENT_STATUSES not in compact:
        raise RuntimeError("m017: the deployments table has an unexpected status constraint")
    statuses = re.compile(r"\(\s*'starting_new'\s*,[^)]*'rolled_back'\s*\)")
    wider = "('starting_new','switching','done','failed','rolled_back','canary','promoted')"
    new_sql, count = statuses.subn(wider, sql, count=1)
    new_sql, renamed = re.subn(
        r"^CREATE TABLE\s+\"?deployments\"?", "CREATE TABLE m017_new", new_sql
    )
    if count != 1 or renamed != 1:
        raise RuntimeError("m017: could not rewrite the deployments table's definition")
    indexes = [
        row[0]
        for row in db.execute(
            "SELECT sql FROM sqlite_master WHERE type = 'index' AND tbl_name = 'deployments'"
            " AND sql IS NOT NULL"
        ).fetchall()
    ]
    db.execute(new_sql)
    db.execute("INSERT INTO m017_new SELECT * FROM deployments")
    db.execute("DROP TABLE deployments")
    db.execute("ALTER TABLE m017_new RENAME TO deployments")
    for index in indexes:
        db.execute(index)
    db.execute("ALTER TABLE deployments ADD COLUMN canary TEXT")


@migrations()
def m018_outbox(db: Database) -> None:
    """The outbox (issue 15): commit statuses and notifications waiting to be sent, written in
    the same transaction as the event that caused them, so none is lost and none is sent for
    work that rolled back. `target` names where it goes ("component:NAME" for the component's
    `report` service, "notify:N" for the N-th [[notify]]); the url and the token are resolved
    from the config when it is sent, never stored. `key` groups deliveries of which only the
    newest matters (one commit's status in one context): a newer one supersedes an older one
    still pending. `next_at` and `created` are epoch seconds (backoff and the maximum age)."""
    db.execute(
        """
        CREATE TABLE outbox (
            id INTEGER PRIMARY KEY,
            event_id INTEGER,
            target TEXT NOT NULL,
            kind TEXT NOT NULL CHECK (kind IN ('status', 'notify')),
            key TEXT,
            payload TEXT NOT NULL,
            state TEXT NOT NULL
                CHECK (state IN ('pending', 'delivered', 'failed', 'superseded')),
            attempts INTEGER NOT NULL DEFAULT 0,
            next_at REAL NOT NULL,
            created REAL NOT NULL,
            created_at TEXT NOT NULL,
            last_error TEXT,
            finished_at TEXT
        )
        """
    )
    db.execute("CREATE INDEX outbox_due ON outbox (state, next_at)")
    db.execute("CREATE INDEX outbox_key ON outbox (key, id)")


@migrations()
def m019_push_feedback(db: Database) -> None:
    """What the daemon did with each push the post-receive hook recorded (issue 15: `git push`
    reports back), and the commit subject and author of each build (for `status`).
    `pushes.id` is the name of the inbox file; `open` counts the things still
    under way for it (a queued build, each affected flow's publish), `finished_at` is set when
    it drops to 0. `push_lines` are the lines the hook's follower prints, in order. Kept a day."""
    db.execute(
        "CREATE TABLE pushes (id TEXT PRIMARY KEY, received_at TEXT NOT NULL,"
        " open INTEGER NOT NULL DEFAULT 0, finished_at TEXT)"
    )
    db.execute(
        "CREATE TABLE push_lines (id INTEGER PRIMARY KEY AUTOINCREMENT, push TEXT NOT NULL"
        " REFERENCES pushes(id) ON DELETE CASCADE, ts TEXT NOT NULL, level TEXT NOT NULL,"
        " text TEXT NOT NULL)"
    )
    db.execute("CREATE INDEX push_lines_push ON push_lines (push, id)")
    # `deployd status` shows the recent version's commit: its subject and author line.
    db.execute("ALTER TABLE builds ADD COLUMN subject TEXT")
    db.execute("ALTER TABLE builds ADD COLUMN author TEXT")
