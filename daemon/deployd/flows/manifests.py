"""`deployd flow manifests`: the Kubernetes objects deployd applies for one flow version, to
review or keep in a GitOps repository. Read-only (the state database, the artifact folders);
Secret values are placeholders, `${VAR}` references stay as written."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from ..config import Config
from ..errors import FlowError, UnknownFlow
from ..paths import Paths
from ..runtime.kubernetes import artifacts
from ..runtime.kubernetes.manifests import PodSecrets, render
from ..store import FlowStore, Store
from .drafts import Drafts


def digests(paths: Paths, spec_steps: list[tuple[str, int, str]]) -> dict[tuple[str, int], str]:
    """The sha256 of each (component, version, artifact folder)'s archive: the one the daemon
    built, else computed from the folder (the same bytes: the archive is reproducible)."""
    out: dict[tuple[str, int], str] = {}
    for component, version, folder in spec_steps:
        if (component, version) in out:
            continue
        sha = ""
        with contextlib.suppress(OSError):
            sha = (paths.artifacts / f"{component}-{version}.sha256").read_text().strip()
        out[(component, version)] = sha or artifacts.digest(Path(folder))
    return out


def manifests(
    config: Config,
    store: Store,
    name: str,
    version: int | None,
    secrets: PodSecrets | None = None,
) -> list[dict[str, Any]]:
    """The Secrets and Deployments of `name`'s `version` (default: the active one, else the
    newest), in flow order. FlowError names an unknown flow or version. `secrets` None: the
    Secrets' values are placeholders (for review); else they are filled, `${VAR}` expanded."""
    fs = FlowStore(store)
    flow = fs.flow(name)
    if flow is None:
        raise UnknownFlow(name)
    known = [int(v["version"]) for v in fs.flow_versions(name)]
    if version is None:
        version = flow["active_version"] or (known[0] if known else None)
        if version is None:
            raise FlowError(f"flow {name} has no version yet: publish it first")
    row = fs.flow_version(name, int(version))
    if row is None:
        listed = ", ".join(str(v) for v in sorted(known)) or "none"
        raise FlowError(f"flow {name} has no version {version} (its versions: {listed})")
    expand = secrets is not None
    spec = Drafts(config, store).runnable(name, int(version), row["steps"], expand=expand)
    sums = digests(
        Paths(config.daemon.state_dir),
        [(s.component, s.version, s.artifact_dir) for s in spec.steps],
    )
    return render(
        spec,
        config.runtime.kubernetes,
        sums,
        stop_timeout=config.daemon.stop_timeout,
        secrets=secrets,
        max_queue=config.daemon.max_queue,
    )
