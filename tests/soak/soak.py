"""The fault-injection soak: N random cycles of pushes and kills under a steady message rate.

Three flows run all the time, each fed by a counting trigger through a mapper step into an
idempotent sink that appends {id, n, flow, by} lines to a file, and fails every n % 7 == 0
(an exception in process(): each of those must become a dead letter exactly once):

    soak-a: alpha.ticker → (mapper) alpha.sink                 alpha: hosted, pushed with git
    soak-b: beta.ticker → beta.relay → (mapper) beta.sink      beta: file:// url + webhooks
    soak-c: alpha.burst → (mapper) alpha.sink                  5 messages every 5 ms into a
                                                               sink taking 20 ms a message,
                                                               its queue limited to 30

soak-c's trigger is held back by backpressure almost all the time; a thread samples the
sink's queue depth every few milliseconds for the whole run (kills, restarts, publishes and
rollbacks included): it must never exceed its limit plus one call's output.

Each cycle injects one random fault, recorded with its cycle number: a good push (the sink's
`by` tag changes, so the output shows which code handled what), a push whose build or tests
fail, a version that raises at import, a version without the used action, webhook
duplicates (the same delivery id again; the same commit with a new delivery id), `kill -9`
of a step process (pid from `status`), `kill -9` of the daemon then a restart (sometimes
right after a push, so builds and publishes are cut in the middle).

At the end the daemon is stopped gracefully and the invariants are checked from the sinks'
outputs and the state database (opened read-only): every counter value 1..N was handled
exactly once, or is still queued, or (n % 7 == 0, and only those) is a dead letter exactly
once, with its traceback; the fast flow's queue stayed bounded; each flow runs the version
of its component's newest good push; no (component, sha) registered twice; every failed
build has an error and every failed/rolled-back deployment a reason; `PRAGMA
integrity_check` is ok; no process of any daemon run is left; the daemon's fd count did not
grow across a run.

A `kill -9` can make a step handle a message twice (it acted, then died before the daemon
committed). deployd keeps `msg["id"]` stable across redeliveries, so the sink dedups by id:
that is how a real component makes its effect exactly-once. The sink logs each redelivery it
absorbed, and the summary counts them.

    python -m tests.soak.soak --cycles 100 --seed 1      # `make soak`
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import hmac
import json
import os
import random
import signal
import sqlite3
import sys
import tempfile
import textwrap
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from tests.conftest import GIT_ENV, Daemon, Work, free_port, git, wait_until
from tests.soak.procs import descendants, fd_count, processes_touching, start_time
from tests.soak.report import FlowResult, SoakReport
from tests.soak.workload import BURST, FAIL_EVERY, PUSH_KINDS, files_for, flow_text

SECRET = "soak-hook-secret-5d1e"
FLOWS = {"soak-a": "alpha", "soak-b": "beta", "soak-c": "alpha"}
FAST_FLOW = "soak-c"  # the burst trigger, held back by its sink's small queue
FAST_MAX_QUEUE = 30
FAST_DELAY = 0.02  # seconds the fast flow's sink takes a message
ROLLBACK_WINDOW = 2.0  # seconds (daemon.rollback_window); see _pick_step
FD_SLACK = 3  # see _check_fds
# One fault per cycle: a push of one kind; "pair": a good push then at once an unrunnable one;
# "webhook": duplicate deliveries; "step" / "daemon": kill -9 of a step process / the daemon.
FAULTS = [*PUSH_KINDS, "pair", "webhook", "step", "daemon"]
FAULT_WEIGHTS = [20, 5, 5, 5, 5, 10, 8, 30, 12]


@dataclass
class Push:
    cycle: int
    component: str
    kind: str
    tag: str
    sha: str
    delivery: str | None = None


class QueueSampler(threading.Thread):
    """The depth of one queue, read from the state database (read-only) every few ms."""

    def __init__(self, db: Path, flow: str, step: str) -> None:
        super().__init__(daemon=True)
        self.db, self.flow, self.step = db, flow, step
        self.max = 0
        self.samples = 0
        self.done = threading.Event()

    def run(self) -> None:
        conn: sqlite3.Connection | None = None
        while not self.done.is_set():
            try:
                if conn is None:
                    conn = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=5)
                (n,) = conn.execute(
                    "SELECT COUNT(*) FROM messages WHERE flow = ? AND step = ?",
                    (self.flow, self.step),
                ).fetchone()
                self.max = max(self.max, int(n))
                self.samples += 1
            except sqlite3.Error:
                if conn is not None:
                    conn.close()
                conn = None
            self.done.wait(0.005)
        if conn is not None:
            conn.close()

    def stop(self) -> None:
        self.done.set()
        if self.is_alive():
            self.join(10)


class Soak:
    def __init__(self, cycles: int, seed: int, workdir: Path) -> None:
        self.cycles = cycles
        self.rng = random.Random(seed)
        self.workdir = workdir
        self.report = SoakReport(cycles=cycles, seed=seed)
        self.pushes: list[Push] = []
        self.pids: dict[int, str] = {}  # every pid of a daemon run we saw → its start time
        # daemon pid → [(cycle, open fds, live descendants)] at quiet moments
        self.fd_samples: dict[int, list[tuple[int, int, int]]] = {}
        self.step_kills: dict[str, float] = {}  # flow → monotonic time of our last step kill
        self.works: dict[str, Work] = {}
        self.counter = 0
        self.cycle = 0
        self.sampler = QueueSampler(workdir / "deployd" / "var" / "deployd.db", FAST_FLOW, "sink")
        self.daemon = Daemon(
            root=workdir / "deployd",
            port=free_port(),
            components=[
                {"name": "alpha"},
                {
                    "name": "beta",
                    "url": f"file://{workdir / 'remotes' / 'beta.git'}",
                    "watch": False,
                    "poll_interval": "0",
                    "webhook_secret": SECRET,
                },
            ],
            daemon_extra={
                "warmup_timeout": "20s",
                "rollback_window": f"{ROLLBACK_WINDOW:g}s",
                "rollback_exits": 3,
                "stop_timeout": "10s",
            },
            env=dict(GIT_ENV),
        )

    # -- helpers ----------------------------------------------------------------------------

    def note(self, text: str) -> None:
        self.report.log.append(f"[{self.cycle:3d}] {text}")

    def out(self, flow: str) -> Path:
        return self.workdir / f"{flow}.jsonl"

    def query(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        db = self.daemon.state_dir / "deployd.db"
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
        try:
            return conn.execute(sql, params).fetchall()
        finally:
            conn.close()

    def pid(self) -> int:
        assert self.daemon.proc is not None
        return self.daemon.proc.pid

    def track(self) -> set[int]:
        """Remember the daemon and every descendant now alive; returns them."""
        pids = {self.pid(), *descendants(self.pid())}
        for p in pids:
            start = start_time(p)
            if start is not None:
                self.pids.setdefault(p, start)
        return pids

    def alive(self, pids: set[int] | None = None) -> list[int]:
        return [
            p
            for p in (self.pids if pids is None else pids)
            if p in self.pids and start_time(p) == self.pids[p]
        ]

    def start_daemon(self) -> None:
        self.daemon.start()
        self.report.daemon_runs += 1
        self.fd_samples[self.pid()] = []
        self.track()
        if self.report.daemon_runs > 1:  # the first quiet moment of this run: fds "early"
            with contextlib.suppress(AssertionError):
                wait_until(self.quiet, timeout=30, interval=0.05)
            self.sample_fds()

    def build_done(self, comp: str, sha: str) -> bool:
        rows = self.query(
            "SELECT 1 FROM builds WHERE component = ? AND sha = ?"
            " AND (status = 'succeeded' OR (status = 'failed' AND retryable = 0))",
            (comp, sha),
        )
        return bool(rows)

    def status(self) -> dict[str, Any]:
        return self.daemon.status()

    # -- setup ------------------------------------------------------------------------------

    def setup(self) -> None:
        for comp in ("alpha", "beta"):
            path = self.workdir / "work" / comp
            path.mkdir(parents=True)
            git("init", "-q", "-b", "main", cwd=path)
            self.works[comp] = Work(path)
        bare = self.workdir / "remotes" / "beta.git"
        bare.parent.mkdir(parents=True)
        git("init", "-q", "--bare", "-b", "main", str(bare))
        self.works["beta"].remote = bare
        # beta's first commit is on its remote before the daemon starts: the start-up poll
        # builds it. alpha's hosted repository exists once the daemon runs.
        beta0 = self.works["beta"].commit("beta-0", files_for("good", "beta-0"))
        self.works["beta"].push()
        self.pushes.append(Push(0, "beta", "good", "beta-0", beta0))
        self.daemon.root.mkdir(parents=True)
        self.start_daemon()
        alpha0 = self.works["alpha"].commit("alpha-0", files_for("good", "alpha-0"))
        self.works["alpha"].push(self.daemon.hosted("alpha"))
        self.pushes.append(Push(0, "alpha", "good", "alpha-0", alpha0))
        self.daemon.wait_recent("alpha", alpha0, timeout=60)
        self.daemon.wait_recent("beta", beta0, timeout=60)
        specs = [("soak-a", "alpha", "30ms", False), ("soak-b", "beta", "40ms", True)]
        for name, comp, interval, relay in specs:
            path = self.workdir / f"{name}.toml"
            path.write_text(flow_text(name, comp, self.out(name), interval, relay))
            self.daemon.cli("flow", "apply", str(path))
        path = self.workdir / f"{FAST_FLOW}.toml"
        path.write_text(
            flow_text(
                FAST_FLOW, "alpha", self.out(FAST_FLOW), "5ms", False, FAST_MAX_QUEUE, FAST_DELAY
            )
        )
        self.daemon.cli("flow", "apply", str(path))
        self.sampler.start()
        for name in FLOWS:
            wait_until(lambda name=name: self.rows(name), timeout=30)
        self.note("set up: alpha-0 and beta-0 running")

    # -- faults -----------------------------------------------------------------------------

    def next_component(self) -> str:
        """alpha and beta in turn, so both flows see every kind of push."""
        return "alpha" if sum(p.cycle > 0 for p in self.pushes) % 2 == 0 else "beta"

    def push(self, comp: str, kind: str) -> Push:
        self.counter += 1
        tag = f"{comp}-{self.counter}"
        work = self.works[comp]
        sha = work.commit(f"{tag} ({kind})", files_for(kind, tag))
        delivery = None
        if comp == "alpha":
            work.push(self.daemon.hosted("alpha"))
        else:
            work.push()
            delivery = f"soak-{uuid.uuid4().hex[:16]}"
            self.webhook(sha, delivery)
        push = Push(self.cycle, comp, kind, tag, sha, delivery)
        self.pushes.append(push)
        self.report.faults[f"push {kind}"] += 1
        self.note(f"push {comp} {kind} {tag} {sha[:8]}")
        return push

    def webhook(self, sha: str, delivery: str) -> int:
        raw = json.dumps({"ref": "refs/heads/main", "after": sha}).encode()
        digest = hmac.new(SECRET.encode(), raw, hashlib.sha256).hexdigest()
        headers = {
            "Content-Type": "application/json",
            "X-Deployd-Signature": f"sha256={digest}",
            "X-Deployd-Delivery": delivery,
        }
        try:
            resp = httpx.post(
                f"{self.daemon.url}/hooks/beta", headers=headers, content=raw, timeout=10
            )
        except httpx.HTTPError as exc:
            self.report.webhooks[type(exc).__name__] += 1
            return 0
        reason = ""
        if resp.status_code == 200:
            with contextlib.suppress(ValueError):
                reason = str(resp.json().get("reason", ""))
            if reason.startswith("duplicate delivery"):
                reason = "duplicate delivery"
            elif "already built" in reason:
                reason = "already built"
        self.report.webhooks[f"{resp.status_code} {reason[:40]}".strip()] += 1
        if resp.status_code >= 500 or resp.status_code in (400, 401, 404):
            self.report.violations.append(
                f"cycle {self.cycle}: webhook for {sha[:8]} answered {resp.status_code}: "
                f"{resp.text[:200]}"
            )
        return resp.status_code

    def webhook_duplicates(self) -> None:
        last = next((p for p in reversed(self.pushes) if p.component == "beta"), None)
        if last is None:
            return
        if last.delivery is not None:
            self.webhook(last.sha, last.delivery)  # a redelivery: the same delivery id
        self.webhook(last.sha, f"soak-{uuid.uuid4().hex[:16]}")  # same commit, new id
        self.report.faults["webhook duplicates"] += 1
        self.note(f"webhook duplicates of {last.sha[:8]}")

    def _pick_step(self) -> tuple[str, dict[str, Any]] | None:
        """A running step of a flow that we have not killed a step of within the rollback
        window: our kills are single faults, never a crash loop (rollbacks have their own
        tests), so each one must be absorbed by a restart."""
        now = time.monotonic()
        candidates = []
        for flow in self.status()["flows"]:
            if now - self.step_kills.get(flow["name"], -1e9) < ROLLBACK_WINDOW + 1:
                continue
            for step in flow["steps"]:
                if step["kind"] != "mapper" and step["pid"]:
                    candidates.append((flow["name"], step))
        return self.rng.choice(candidates) if candidates else None

    def kill_step(self) -> None:
        picked = self._pick_step()
        if picked is None:
            self.note("kill step: none eligible")
            return
        flow, step = picked
        pid = int(step["pid"])
        if pid not in descendants(self.pid()):  # never signal a process that is not ours
            self.note(f"kill step: {flow}/{step['id']} pid {pid} already gone")
            return
        self.track()
        os.kill(pid, signal.SIGKILL)
        self.step_kills[flow] = time.monotonic()
        self.report.faults["kill -9 step"] += 1
        self.note(f"kill -9 {flow}/{step['id']} (pid {pid})")

    def kill_daemon(self) -> None:
        victims = self.track()
        pid = self.pid()
        self.daemon.kill()
        self.report.faults["kill -9 daemon"] += 1
        self.note(f"kill -9 daemon (pid {pid}, {len(victims) - 1} descendants)")
        # Every process of the killed daemon (fork server, step processes) goes by itself.
        try:
            wait_until(lambda: not self.alive(victims), timeout=30)
        except AssertionError:
            self.report.violations.append(
                f"cycle {self.cycle}: processes of killed daemon {pid} still alive: "
                f"{self.alive(victims)}"
            )
        check = self.query("PRAGMA integrity_check")
        if check != [("ok",)]:
            self.report.violations.append(f"cycle {self.cycle}: integrity_check {check}")
        self.start_daemon()

    def wait_built(self, push: Push) -> None:
        try:
            wait_until(lambda: self.build_done(push.component, push.sha), timeout=90)
        except AssertionError:
            self.report.violations.append(
                f"cycle {self.cycle}: {push.component} {push.tag} ({push.sha[:8]}) never built"
            )

    def quiet(self) -> bool:
        """No build running, no publish under way, every step of both flows running."""
        if self.query("SELECT 1 FROM builds WHERE status IN ('queued', 'building')"):
            return False
        flows = self.status()["flows"]
        return len(flows) == len(FLOWS) and all(
            f["state"] == "running" and all(s["state"] == "running" for s in f["steps"])
            for f in flows
        )

    def sample_fds(self) -> None:
        if self.daemon.proc is None or not self.quiet():
            return
        count = fd_count(self.pid())
        if count is not None:
            children = len(descendants(self.pid()))
            self.fd_samples[self.pid()].append((self.cycle, count, children))

    def plan(self) -> list[str]:
        """The fault of each cycle: every kind once first (in random order), then at random.
        The last fifth kills no daemon, so one daemon run is long enough to show an fd leak."""
        calm = self.cycles - self.cycles // 5  # cycles after this one kill no daemon
        first = self.rng.sample(FAULTS, len(FAULTS))[: self.cycles]
        if "daemon" in first and first.index("daemon") >= calm:
            swap = self.rng.randrange(min(calm, len(first)))
            i = first.index("daemon")
            first[i], first[swap] = first[swap], first[i]
        rest = self.rng.choices(FAULTS, FAULT_WEIGHTS, k=self.cycles - len(first))
        plan = first + rest
        return [
            "step" if kind == "daemon" and cycle > calm else kind
            for cycle, kind in enumerate(plan, start=1)
        ]

    def run_cycle(self, fault: str, daemon_kills: bool) -> None:
        self.track()
        self.sample_fds()
        if fault in PUSH_KINDS:
            comp = self.next_component()
            push = self.push(comp, fault)
            if comp == "beta" and self.rng.random() < 0.3:
                self.webhook_duplicates()
            after = self.rng.random()
            if after < 0.3:  # mid-build, mid-publish, or just after
                time.sleep(self.rng.uniform(0.0, 0.4))
                self.kill_daemon() if after < 0.15 and daemon_kills else self.kill_step()
            self.wait_built(push)
        elif fault == "pair":
            # A good version, then at once one that cannot run: the flow must end up on the
            # good one even when the daemon dies while the first is still being published.
            comp = self.next_component()
            self.report.faults["pair: good then unrunnable"] += 1
            first = self.push(comp, "good")
            self.wait_built(first)
            second = self.push(comp, self.rng.choice(["import_error", "removed_action"]))
            self.wait_built(second)
            if daemon_kills and self.rng.random() < 0.6:  # often while the first warms up
                time.sleep(self.rng.uniform(0.0, 0.2))
                self.kill_daemon()
        elif fault == "webhook":
            self.webhook_duplicates()
        elif fault == "step":
            self.kill_step()
        else:
            self.kill_daemon()
        time.sleep(self.rng.uniform(0.05, 0.5))

    # -- the end ----------------------------------------------------------------------------

    def rows(self, flow: str) -> list[dict[str, Any]]:
        path = self.out(flow)
        if not path.exists():
            return []
        out = []
        for line in path.read_text().splitlines():
            if line.strip():
                out.append(json.loads(line))
        return out

    def expected(self, comp: str) -> Push:
        return next(p for p in reversed(self.pushes) if p.component == comp and p.kind == "good")

    def settle(self) -> None:
        """Until each flow runs its expected version and its queues are (nearly) drained."""
        for push in self.pushes:
            if not self.build_done(push.component, push.sha):
                self.wait_built(push)

        def runs_expected(flow: str) -> bool:
            rows = self.rows(flow)
            return bool(rows) and rows[-1]["by"] == self.expected(FLOWS[flow]).tag

        def drained() -> bool:
            # The fast flow's trigger never stops: its queue stays full (and bounded).
            depth = self.query("SELECT COUNT(*) FROM messages WHERE flow != ?", (FAST_FLOW,))
            return bool(depth[0][0] <= 2 * (len(FLOWS) - 1)) and self.quiet()

        for flow in FLOWS:
            try:
                wait_until(lambda flow=flow: runs_expected(flow), timeout=90, interval=0.1)
            except AssertionError:
                self.report.violations.append(
                    f"{flow}: the sink's last line is not by {self.expected(FLOWS[flow]).tag}"
                )
        try:
            wait_until(drained, timeout=90, interval=0.1)
        except AssertionError:
            self.report.violations.append("the queues did not drain within 90 s")
        self.cycle += 1
        self.track()
        self.sample_fds()
        status = self.status()
        for flow in status["flows"]:
            comp = FLOWS[flow["name"]]
            want = self.query(
                "SELECT version FROM versions WHERE component = ? AND sha = ?",
                (comp, self.expected(comp).sha),
            )
            versions = {s["version"] for s in flow["steps"] if s["kind"] != "mapper"}
            if not want or versions != {want[0][0]}:
                self.report.violations.append(
                    f"{flow['name']}: runs {comp} versions {sorted(versions)}, expected "
                    f"{want[0][0] if want else '?'} ({self.expected(comp).tag})"
                )
            if flow["state"] != "running":
                self.report.violations.append(f"{flow['name']}: state {flow['state']}")

    def check(self) -> None:
        rep = self.report
        # Messages: each flow's trigger produced 1..N (its snapshot), each handled once or queued.
        for flow, comp in FLOWS.items():
            res = FlowResult(flow)
            snap = self.query(
                "SELECT data FROM snapshots WHERE flow = ? AND step = 'tick'", (flow,)
            )
            res.produced = int(json.loads(snap[0][0])["n"]) if snap else 0
            rows = self.rows(flow)
            ids_per_n: dict[int, set[str]] = {}
            for r in rows:
                ids_per_n.setdefault(r["n"], set()).add(r["id"])
            same_id = len(rows) - len({r["id"] for r in rows})
            res.handled = len(ids_per_n)
            res.duplicates = sum(len(ids) - 1 for ids in ids_per_n.values()) + same_id
            queued = {
                json.loads(body)["n"]
                for (body,) in self.query("SELECT body FROM messages WHERE flow = ?", (flow,))
            }
            dead: dict[int, int] = {}
            bad_error = []
            for body, error in self.query(
                "SELECT body, error FROM dead_letters WHERE flow = ?", (flow,)
            ):
                n = int(json.loads(body)["n"])
                dead[n] = dead.get(n, 0) + 1
                if "always fails" not in error or "Traceback" not in error:
                    bad_error.append(n)
            res.dead = sum(dead.values())
            missing = [n for n in range(1, res.produced + 1) if n not in ids_per_n]
            res.queued = sum(1 for n in missing if n in queued)
            lost = [n for n in missing if n not in queued and n not in dead]
            res.lost = len(lost)
            twice = sorted(n for n, c in dead.items() if c > 1)
            if twice:
                rep.violations.append(f"{flow}: dead-lettered more than once, n = {twice[:20]}")
            wrong = sorted(n for n in dead if n % FAIL_EVERY)
            if wrong:
                rep.violations.append(f"{flow}: dead letters of good messages, n = {wrong[:20]}")
            handled_bad = sorted(n for n in ids_per_n if n % FAIL_EVERY == 0)
            if handled_bad:
                rep.violations.append(f"{flow}: failing messages handled, n = {handled_bad[:20]}")
            queued_dead = sorted(n for n in dead if n in queued)
            if queued_dead:
                rep.violations.append(f"{flow}: both queued and dead, n = {queued_dead[:20]}")
            if bad_error:
                rep.violations.append(
                    f"{flow}: dead letters without their error and traceback, n = {bad_error[:20]}"
                )
            extra = sorted(n for n in ids_per_n if not 1 <= n <= res.produced)
            redelivered = self.out(flow).with_name(self.out(flow).name + ".redelivered")
            if redelivered.exists():
                res.redelivered = len(redelivered.read_text().splitlines())
            res.expected_tag = self.expected(comp).tag
            res.running_tag = rows[-1]["by"] if rows else ""
            active = self.query("SELECT active_version FROM flows WHERE name = ?", (flow,))
            res.version = active[0][0] if active else None
            rep.flows[flow] = res
            if res.duplicates:
                dup = sorted(n for n, ids in ids_per_n.items() if len(ids) > 1)
                rep.violations.append(f"{flow}: {res.duplicates} duplicate(s), n = {dup[:20]}")
            if lost:
                rep.violations.append(f"{flow}: {len(lost)} message(s) lost, n = {lost[:20]}")
            if extra:
                rep.violations.append(f"{flow}: handled n beyond what was produced: {extra[:20]}")
            if res.produced < 20 * self.cycles // 10:
                rep.violations.append(f"{flow}: only {res.produced} messages produced")
            # The active flow version's steps all use the newest good push's version.
            want = self.query(
                "SELECT version FROM versions WHERE component = ? AND sha = ?",
                (comp, self.expected(comp).sha),
            )
            steps = self.query(
                "SELECT steps FROM flow_versions WHERE flow = ? AND version = ?",
                (flow, res.version),
            )
            used = {s["version"] for s in json.loads(steps[0][0])} if steps else set()
            if not want or used != {want[0][0]}:
                rep.violations.append(
                    f"{flow}: active v{res.version} uses {comp} {sorted(used)}, expected "
                    f"{want[0][0] if want else '?'} ({res.expected_tag})"
                )
            # Needs attention exactly when the component's newest version is not runnable.
            attention = self.query("SELECT needs_attention FROM flows WHERE name = ?", (flow,))
            newest = self.query(
                "SELECT sha FROM versions WHERE component = ? ORDER BY version DESC LIMIT 1",
                (comp,),
            )
            stale = bool(newest) and newest[0][0] != self.expected(comp).sha
            if stale != bool(attention and attention[0][0]):
                rep.violations.append(
                    f"{flow}: needs_attention = {attention[0][0] if attention else None!r}, but "
                    f"the newest {comp} version is {'not ' if stale else ''}the running one"
                )
        # Versions: one per (component, sha); every good/bad-at-runtime push registered.
        dup_versions = self.query(
            "SELECT component, sha, COUNT(*) FROM versions GROUP BY component, sha"
            " HAVING COUNT(*) > 1"
        )
        if dup_versions:
            rep.violations.append(f"a commit was registered twice: {dup_versions}")
        for comp, n in self.query("SELECT component, COUNT(*) FROM versions GROUP BY component"):
            rep.versions[comp] = n
        registered = {(c, s) for c, s in self.query("SELECT component, sha FROM versions")}
        for p in self.pushes:
            builds = p.kind not in ("build_fail", "test_fail")
            if builds != ((p.component, p.sha) in registered):
                rep.violations.append(
                    f"{p.component} {p.tag} ({p.kind}) is {'not ' if builds else ''}registered"
                )
        # One build per commit: duplicates and redeliveries never build again (a build that a
        # kill interrupted is retried, as a new row; those are marked retryable).
        twice = self.query(
            "SELECT component, sha, COUNT(*) FROM builds WHERE retryable = 0"
            " GROUP BY component, sha HAVING COUNT(*) > 1"
        )
        if twice:
            rep.violations.append(f"a commit was built twice: {twice}")
        # Failures are recorded with their reason.
        for status, n in self.query("SELECT status, COUNT(*) FROM builds GROUP BY status"):
            rep.builds[status] += n
        interrupted = self.query("SELECT COUNT(*) FROM builds WHERE retryable = 1")[0][0]
        if interrupted:
            rep.builds["(of failed: interrupted by a kill)"] = interrupted
        no_error = self.query(
            "SELECT id, sha FROM builds WHERE status = 'failed' AND COALESCE(error, '') = ''"
        )
        if no_error:
            rep.violations.append(f"failed builds without an error: {no_error}")
        for status, n in self.query("SELECT status, COUNT(*) FROM deployments GROUP BY status"):
            rep.deployments[status] += n
        no_reason = self.query(
            "SELECT id, flow, status FROM deployments WHERE status IN ('failed', 'rolled_back')"
            " AND COALESCE(reason, '') = ''"
        )
        if no_reason:
            rep.violations.append(f"failed deployments without a reason: {no_reason}")
        unfinished = self.query(
            "SELECT id, flow, status FROM deployments WHERE status IN ('starting_new', 'switching')"
        )
        if unfinished:
            rep.violations.append(f"deployments left unfinished: {unfinished}")
        for p in self.pushes:
            if p.kind in ("import_error", "removed_action"):
                self._check_refused(p)
        check = self.query("PRAGMA integrity_check")
        if check != [("ok",)]:
            rep.violations.append(f"integrity_check: {check}")

    def _check_refused(self, push: Push) -> None:
        """A version that cannot run is never what a flow runs, and the refusal is recorded."""
        flow = next(f for f, c in FLOWS.items() if c == push.component)
        row = self.query(
            "SELECT version FROM versions WHERE component = ? AND sha = ?",
            (push.component, push.sha),
        )
        if not row:
            return
        version = row[0][0]
        drafts = self.query(
            "SELECT message FROM events WHERE kind = 'draft.created' AND flow = ? AND sha = ?",
            (flow, push.sha),
        )
        if push.kind == "removed_action" and any("needs attention" not in m for (m,) in drafts):
            self.report.violations.append(f"{flow}: a valid draft for {push.tag}: {drafts}")
        if push.kind == "import_error":
            # Deployed, failed with the import error as reason — unless a newer version
            # superseded it before its turn (then it has no deployment at all).
            deps = self.query(
                "SELECT status, reason FROM deployments WHERE flow = ? AND component = ?"
                " AND component_version = ?",
                (flow, push.component, version),
            )
            bad = [d for d in deps if d[0] not in ("failed",)]
            final = [d for d in deps if not (d[1] or "").startswith("interrupted:")]
            if bad or (final and not any("broken at import" in (d[1] or "") for d in final)):
                self.report.violations.append(
                    f"{flow}: import-error version {push.tag} deployments {deps}"
                )

    def finish(self) -> None:
        pid = self.pid()
        self.track()
        code = self.daemon.stop(timeout=30)
        if code != 0:
            self.report.violations.append(f"graceful stop of daemon {pid} exited {code}")
        try:
            wait_until(lambda: not self.alive(), timeout=30)
        except AssertionError:
            self.report.violations.append(f"processes left after the stop: {self.alive()}")
        strays = processes_touching(self.workdir)
        if strays:
            self.report.violations.append(f"processes still using the soak's files: {strays}")
        self.report.pids_tracked = len(self.pids)
        self._check_queue_bound()
        self._check_fds()
        self._check_log()

    def _check_queue_bound(self) -> None:
        """The fast flow's sink queue, sampled the whole run: within its limit plus one call."""
        self.sampler.stop()
        bound = FAST_MAX_QUEUE + BURST
        self.report.fast_queue = (
            f"max {self.sampler.max} (limit {FAST_MAX_QUEUE} + one call's {BURST}), "
            f"{self.sampler.samples} samples"
        )
        if self.sampler.samples < 100:
            self.report.violations.append(
                f"{FAST_FLOW}: queue sampled only {self.sampler.samples}x"
            )
        if self.sampler.max > bound:
            self.report.violations.append(
                f"{FAST_FLOW}: the sink's queue held {self.sampler.max} messages (bound {bound})"
            )
        if self.sampler.max < FAST_MAX_QUEUE - BURST:
            self.report.violations.append(
                f"{FAST_FLOW}: the queue never filled (max {self.sampler.max}): no backpressure"
            )

    def _check_log(self) -> None:
        """The daemon logged no crash: no traceback, no asyncio complaint (an exception nobody
        retrieved, writes to a closed socket, a task destroyed while pending). A failed
        warm-up quotes the step's log tail, where the component's own tracebacks (a message
        that always fails, an import error) are what the step printed, not a crash of the
        daemon: only the daemon's part of such a line counts."""
        bad = [
            line
            for line in self.daemon.log().splitlines()
            if "logger=asyncio" in line
            or "Traceback" in line.split("log tail:", 1)[0]
            or "level=critical" in line
        ]
        if bad:
            self.report.violations.append(
                f"the daemon log has {len(bad)} asyncio/traceback line(s), first: {bad[0][:300]}"
            )

    def _check_fds(self) -> None:
        """The longest-sampled daemon run: fds at its first quiet moment vs. at its last.

        The daemon holds one protocol socket per live descendant (each step process and each
        idle pooled sailor, refilled a moment after a deploy takes some) plus a fixed set (state
        db + WAL + shm, lock, log, listening socket, fork server pipes, epoll, inotify). So
        `open fds - live descendants` is flat when nothing leaks (16-17 here, sample to sample);
        `FD_SLACK` covers a descendant caught mid-start or mid-exit and an HTTP connection
        still closing. A leak of one fd per deploy or step restart exceeds it within a run."""
        runs = [(s[-1][0] - s[0][0], pid, s) for pid, s in self.fd_samples.items() if len(s) >= 2]
        if not runs:
            self.report.fds = "not measured (no run with two quiet moments)"
            return
        _span, pid, samples = max(runs)
        (c0, fds0, kids0), (c1, fds1, kids1) = samples[0], samples[-1]
        base0, base1 = fds0 - kids0, fds1 - kids1
        self.report.fds = (
            f"pid {pid}, cycle {c0} → {c1} ({len(samples)} quiet samples): open {fds0} → {fds1}, "
            f"minus live descendants {base0} → {base1} (range "
            f"{min(f - k for _, f, k in samples)}-{max(f - k for _, f, k in samples)})"
        )
        if base1 > base0 + FD_SLACK:
            self.report.violations.append(
                f"daemon {pid} fds grew: {fds0} with {kids0} descendants (cycle {c0}) → "
                f"{fds1} with {kids1} (cycle {c1})"
            )

    def run(self) -> SoakReport:
        started = time.monotonic()
        try:
            self.setup()
            calm = self.cycles - self.cycles // 5
            for cycle, fault in enumerate(self.plan(), start=1):
                self.cycle = cycle
                self.run_cycle(fault, daemon_kills=cycle <= calm)
            self.settle()
            self.finish()
            self.check()
        except BaseException:
            self.note("aborted:\n" + textwrap.indent(self.daemon.log()[-4000:], "  "))
            raise
        finally:
            self.sampler.stop()
            if self.daemon.proc is not None and self.daemon.proc.poll() is None:
                self.daemon.proc.kill()
                self.daemon.proc.wait(10)
            self.report.seconds = time.monotonic() - started
        return self.report


def run_soak(cycles: int, seed: int, workdir: Path) -> SoakReport:
    """Run the soak in `workdir` (created if needed); the report lists every violation."""
    workdir.mkdir(parents=True, exist_ok=True)
    return Soak(cycles, seed, workdir).run()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cycles", type=int, default=100)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--workdir", type=Path, help="default: a new temporary directory")
    parser.add_argument("--keep", action="store_true", help="keep the workdir")
    parser.add_argument("-v", "--verbose", action="store_true", help="print the fault log")
    args = parser.parse_args(argv)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="deployd-soak-"))
    report = run_soak(args.cycles, args.seed, workdir)
    if args.verbose or not report.ok:
        print("\n".join(report.log))
    print(report.table())
    print(f"workdir: {workdir}" if args.keep or not report.ok else "")
    if report.ok and not args.keep and args.workdir is None:
        import shutil

        shutil.rmtree(workdir, ignore_errors=True)
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
