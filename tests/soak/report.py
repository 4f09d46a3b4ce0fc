"""The soak's report: what happened, what was checked, and the summary table."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


@dataclass
class FlowResult:
    name: str
    produced: int = 0
    handled: int = 0
    duplicates: int = 0
    lost: int = 0
    queued: int = 0
    dead: int = 0  # dead letters (the sink fails n % 7 == 0)
    redelivered: int = 0
    expected_tag: str = ""
    running_tag: str = ""
    version: int | None = None


@dataclass
class SoakReport:
    cycles: int
    seed: int
    seconds: float = 0.0
    faults: Counter[str] = field(default_factory=Counter)
    flows: dict[str, FlowResult] = field(default_factory=dict)
    versions: dict[str, int] = field(default_factory=dict)
    builds: Counter[str] = field(default_factory=Counter)
    deployments: Counter[str] = field(default_factory=Counter)
    webhooks: Counter[str] = field(default_factory=Counter)
    daemon_runs: int = 0
    pids_tracked: int = 0
    fds: str = ""
    fast_queue: str = ""  # the fast flow's sink queue, as sampled
    violations: list[str] = field(default_factory=list)
    log: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.violations

    def table(self) -> str:
        rows: list[tuple[str, str]] = [
            ("cycles / seed", f"{self.cycles} / {self.seed}"),
            ("time", f"{self.seconds:.1f} s"),
            ("daemon runs", str(self.daemon_runs)),
        ]
        for kind in sorted(self.faults):
            rows.append((f"fault: {kind}", str(self.faults[kind])))
        for name, f in sorted(self.flows.items()):
            rows.append(
                (
                    f"{name} messages",
                    f"produced {f.produced}, handled {f.handled}, queued {f.queued}, "
                    f"dead letters {f.dead}, duplicates {f.duplicates}, lost {f.lost}, "
                    f"redelivered (absorbed by sink dedup) {f.redelivered}",
                )
            )
            rows.append(
                (
                    f"{name} version",
                    f"v{f.version} running {f.running_tag!r} (expected {f.expected_tag!r})",
                )
            )
        rows.append(
            ("versions registered", ", ".join(f"{c} {n}" for c, n in sorted(self.versions.items())))
        )
        rows.append(("builds", _counts(self.builds)))
        rows.append(("deployments", _counts(self.deployments)))
        rows.append(("webhook answers", _counts(self.webhooks)))
        rows.append(("pids tracked", str(self.pids_tracked)))
        rows.append(("daemon fds", self.fds))
        rows.append(("fast flow queue", self.fast_queue))
        rows.append(("result", "OK" if self.ok else f"{len(self.violations)} violation(s)"))
        width = max(len(k) for k, _ in rows)
        lines = [f"{k.ljust(width)}  {v}" for k, v in rows]
        lines += [f"VIOLATION: {v}" for v in self.violations]
        return "\n".join(lines)


def _counts(c: Counter[str]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(c.items())) or "none"
