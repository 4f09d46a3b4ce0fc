"""Drafts: turning flow-file text or a new component version into checked flow steps.

Pure with respect to running things: it reads the store (recent versions, descriptors) and
validates against the new `component.json`, and it resolves stored steps into the typed
`FlowVersionToRun` that a runtime starts. The publish state machine is `publish.py`.
"""

from __future__ import annotations

import tomllib
from collections.abc import Sequence
from typing import Any

from ..config import Config
from ..errors import FlowError
from ..store import FlowStore, Store
from ..store.credentials import CredentialKeyStore
from ..toolchains import node as nodetool
from ..types import DEFAULT_PREFETCH, FlowVersionToRun, RunStep, StepKind
from . import model, schema, secrets

Descriptors = dict[tuple[str, int], dict[str, Any]]


class Drafts:
    """Parses, resolves and validates flow steps against registered component versions."""

    def __init__(self, config: Config, store: Store) -> None:
        self.config = config
        self.store = store

    def parse(self, text: str) -> model.FlowSpec:
        """Flow-file text → a checked spec whose components all exist in the config."""
        try:
            raw = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise FlowError(f"flow file is not valid TOML: {exc}") from exc
        except RecursionError as exc:
            raise FlowError("flow file is nested too deeply to read; flatten it") from exc
        spec = model.parse(raw, "flow file")
        self._check_http(spec)
        self._check_canary(spec)
        for step in spec.steps:
            if step.builtin is not None:
                continue
            if self.config.component(step.component) is None:
                known = ", ".join(c.name for c in self.config.components) or "none"
                raise FlowError(
                    f"step {step.id}: unknown component {step.component!r} (known: {known})"
                )
        refs = secrets.problems(spec, self.config)
        if refs:
            raise FlowError("flow file is invalid: " + "; ".join(refs))
        return spec

    def _check_http(self, spec: model.FlowSpec) -> None:
        """What an HTTP-fed flow needs of the daemon: the embedded runtime, and a loopback
        listen address when its requests are not authenticated."""
        http = spec.http
        if http is None:
            return
        runtime = spec.runtime or self.config.runtime.default
        if runtime != "embedded":
            raise FlowError(
                f'step {http.id}: builtin = "http" flows run on the embedded runtime only '
                f'(this one would run on {runtime}); set runtime = "embedded" in the flow file'
            )
        if http.auth == "none" and not self.config.daemon.listen_is_loopback:
            raise FlowError(
                f'step {http.id}: auth = "none" is allowed only while daemon.listen is a '
                f'loopback address (it is {self.config.daemon.listen}); use auth = "hmac" '
                'or "token" with secret = "${VAR}"'
            )

    def _check_canary(self, spec: model.FlowSpec) -> None:
        """A [canary] table needs a runtime that can run two versions of a step on one queue:
        the embedded one (the others refuse it here rather than publish at once silently)."""
        if spec.canary is None:
            return
        runtime = spec.runtime or self.config.runtime.default
        if runtime != "embedded":
            where = "kubernetes" if self.config.runtime.rabbitmq.placement == "kubernetes" else ""
            raise FlowError(
                f"canary: canary publishes run on the embedded runtime only so far; this flow "
                f"would run on {runtime}" + (f" (placed on {where})" if where else "") + "; set "
                'runtime = "embedded" in the flow file, or remove [canary]'
            )

    def resolve(self, spec: model.FlowSpec) -> list[model.Step]:
        """Pin every step to its own `version` or its component's recent one."""
        recent = self.store.recent_all()  # one query, no descriptor decoding
        versions = {
            s.component: (recent[s.component]["version"] if s.component in recent else None)
            for s in spec.steps
        }
        return model.resolve(spec, versions)

    def with_version(
        self, steps: Sequence[dict[str, Any]], component: str, version: int
    ) -> list[model.Step]:
        """Stored steps with every unpinned step of `component` moved to `version`."""
        return [
            model.Step.model_validate(
                {**s, "version": version} if s["component"] == component and not s["pinned"] else s
            )
            for s in steps
        ]

    def validate(
        self,
        steps: list[model.Step],
        extra: Descriptors | None = None,
        before: list[model.Step] | None = None,
    ) -> list[str]:
        """Every reason `steps` cannot run (empty: valid), as `step ID: what` lines.

        `extra`: descriptors of versions not registered (a `plan`'s build), by (component,
        version); `before`: the steps running now (a function they ran that the new version
        lacks "no longer exists")."""
        descriptors = {**self._descriptors(steps), **(extra or {})}
        problems = model.validate(
            steps, descriptors, self._node_error(), self.credential_info(), before
        )
        refused = {s.id for s in steps if any(p.startswith(f"step {s.id}: ") for p in problems)}
        return problems + schema.input_problems(
            [s for s in steps if s.id not in refused], descriptors
        )

    def schema_edges(
        self,
        before: list[model.Step] | None,
        after: list[model.Step],
        extra: Descriptors | None = None,
        label: Any = None,
    ) -> list[schema.Edge]:
        """The schema check of every edge of `after` whose steps changed component version
        against `before` (the steps that run now); see `schema.py`."""
        descriptors = {**self._descriptors([*(before or []), *after]), **(extra or {})}
        return schema.check(before, after, descriptors, label)

    def credential_info(self) -> dict[str, model.CredentialInfo]:
        """The config's credentials for validation: component and field names (the config's
        and those of keys refreshed for the same component), never a value."""
        stored = CredentialKeyStore(self.store).summary()
        out = {}
        for cred in self.config.credentials:
            names = set(cred.fields)
            row = stored.get(cred.name)
            if row is not None and row["component"] == cred.component:
                names |= set(row["fields"])
            out[cred.name] = model.CredentialInfo(cred.component, frozenset(names))
        return out

    def _descriptors(self, steps: list[model.Step]) -> dict[tuple[str, int], dict[str, Any]]:
        out = {}
        for s in steps:
            if s.version is not None and (s.component, s.version) not in out:
                row = self.store.version(s.component, s.version)
                if row:
                    desc = dict(row["descriptor"])
                    desc.setdefault("runtime", row["runtime"])
                    out[(s.component, s.version)] = desc
        return out

    def _node_error(self) -> str | None:
        """Why `runtime = "node"` steps cannot run here (None: they can)."""
        return nodetool.detect(self.config.daemon.node).error

    def runnable(
        self, flow: str, version: int, steps: Sequence[dict[str, Any]], expand: bool = True
    ) -> FlowVersionToRun:
        """Stored steps with their artifact folder, `main` file and language: what a runtime
        starts. Raises FlowError when a version's code is gone. `expand=False` keeps the
        `${VAR}` references as written (to show, never to run)."""

        def values(table: dict[str, str], where: str) -> dict[str, str]:
            return secrets.expand(table, where, self.config) if expand else dict(table)

        out = []
        rows: dict[tuple[str, int], Any] = {}
        fv = FlowStore(self.store).flow_version(flow, version)
        flow_spec = (fv["spec"] if fv else None) or {}
        for i, s in enumerate(steps):
            if s.get("builtin") == "http":
                out.append(self._http_step(s, i))
                continue
            key = (s["component"], s["version"])
            if key not in rows:  # 30 steps of one component: one read, one JSON decode
                rows[key] = self.store.version(*key)
            row = rows[key]
            if row is None:
                raise FlowError(f"step {s['id']}: {s['component']} v{s['version']} is gone")
            if not row["artifact_dir"]:
                raise FlowError(
                    f"step {s['id']}: the code of {s['component']} v{s['version']} was removed "
                    "by retention (raise daemon.keep_versions, or use a newer version)"
                )
            desc = row["descriptor"]
            group = "triggers" if s["kind"] == "trigger" else "actions"
            func = (desc.get(group) or {}).get(s["function"])
            if func is None:
                raise FlowError(f"step {s['id']}: {s['function']!r} is not in {s['component']}")
            out.append(
                RunStep(
                    id=s["id"],
                    kind=StepKind(s["kind"]),
                    component=s["component"],
                    version=int(s["version"]),
                    function=s["function"],
                    artifact_dir=row["artifact_dir"],
                    main=func["main"],
                    runtime=desc.get("runtime") or row["runtime"],
                    config=s.get("config") or {},
                    mapping=s.get("mapping"),
                    interval=float(s.get("interval", 1.0)),
                    prefetch=int(s.get("prefetch") or DEFAULT_PREFETCH),
                    max_queue=s.get("max_queue"),
                    env=values(s.get("env") or {}, f"steps[{i}].env"),
                    credential=s.get("credential"),
                    input_schema=schema.input_schema(func) if s.get("validate_input") else None,
                    replicas=int(s.get("replicas") or 1),
                    cpu=_resource(s.get("cpu")),
                    memory=_resource(s.get("memory")),
                )
            )
        runtime = flow_spec.get("runtime")
        variables = values(flow_spec.get("variables") or {}, "variables")
        return FlowVersionToRun(
            flow, version, tuple(out), str(runtime) if runtime else None, variables
        )

    def _http_step(self, s: dict[str, Any], index: int) -> RunStep:
        """The builtin HTTP trigger of a stored flow version, its secret expanded."""
        http = dict(s.get("http") or {})
        if http.get("secret"):
            where = f"steps[{index}]"
            http["secret"] = secrets.expand({"secret": http["secret"]}, where, self.config)[
                "secret"
            ]
        return RunStep(
            id=s["id"],
            kind=StepKind.TRIGGER,
            component="",
            version=0,
            function="http",
            artifact_dir="",
            main="",
            runtime="builtin",
            builtin="http",
            http=http,
        )


def _resource(value: Any) -> dict[str, str] | None:
    """A stored step's cpu or memory as {request, limit} (a string means both)."""
    if isinstance(value, str):
        return {"request": value, "limit": value}
    if isinstance(value, dict):
        return {"request": str(value["request"]), "limit": str(value["limit"])}
    return None
