"""Monorepos (issue 16, section 6): several components in one repository, end to end.

A real remote (`git daemon` on loopback) holds two components under `components/` and a
shared library; real pushes are announced by one webhook each time, to either component's
hook url, and fan out to both. Each component builds only when a push changes something
under its `paths` (a push that does not is recorded as ignored, with the reason, and never
looked at again), builds in its `path`, and both share one mirror of the repository.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.conftest import Daemon, Work, db_rows, default_descriptor, git, wait_until
from tests.sources.conftest import GitDaemon, builds_of, events
from tests.sources.hooks import generic, post

TICKER = 'def process(msg, cfg, snapshot, ctx):\n    return {"text": "hi"}\n'
UPPER = 'def process(msg, cfg):\n    return {"text": "X"}\n'


def component_files(folder: str, title: str) -> dict[str, Any]:
    # The build runs in the component's folder: it fails anywhere else (no marker there).
    desc = default_descriptor(title=title, build="test -f marker && touch built-here")
    return {
        f"{folder}/component.json": desc,
        f"{folder}/marker": "",
        f"{folder}/lib/ticker.py": TICKER,
        f"{folder}/lib/upper.py": UPPER,
    }


def monorepo(tmp_path: Path, base: Path) -> Work:
    """A working clone of a monorepo (billing, crm, libs/common), pushed to base/platform.git."""
    bare = base / "platform.git"
    bare.parent.mkdir(parents=True, exist_ok=True)
    git("init", "-q", "--bare", "-b", "main", str(bare))
    path = tmp_path / "work" / "platform"
    path.mkdir(parents=True)
    git("init", "-q", "-b", "main", cwd=path)
    work = Work(path, remote=bare)
    files = {
        **component_files("components/billing", "Billing"),
        **component_files("components/crm", "CRM"),
        "libs/common/money.py": "CENTS = 100\n",
        "README.md": "platform\n",
    }
    work.commit("initial", files)
    work.push()
    return work


def announce(d: Daemon, component: str, sha: str) -> None:
    """One webhook (the generic kind, unsigned on loopback) for a push to main."""
    resp = post(d.url, component, generic(None, "refs/heads/main", sha))
    assert resp.status_code in (200, 202), resp.text


def ignored(d: Daemon, component: str, sha: str) -> list[dict[str, Any]]:
    return [e for e in events(d, "push.ignored", sha) if e["component"] == component]


def version_of(d: Daemon, component: str, sha: str) -> dict[str, Any] | None:
    rows = db_rows(
        d.state_dir, "SELECT * FROM versions WHERE component = ? AND sha = ?", component, sha
    )
    return rows[0] if rows else None


def test_two_components_in_one_repository_each_built_only_when_its_paths_change(
    tmp_path: Path,
    daemon_factory: Callable[..., Daemon],
    git_daemon: Callable[..., GitDaemon],
) -> None:
    gd = git_daemon()
    work = monorepo(tmp_path, gd.base)
    url = gd.url("platform")
    d = daemon_factory(
        components=[
            {
                "name": "billing",
                "url": url,
                "path": "components/billing",
                "paths": ["components/billing/**", "libs/common/**"],
                "poll_interval": "0",
            },
            {
                "name": "crm",
                "url": url,
                "path": "components/crm/",
                "paths": ["components/crm/**"],
                "poll_interval": "0",
            },
        ]
    ).start()

    # One hook for the repository (billing's url): both components build their first version.
    first = git("rev-parse", "HEAD", cwd=work.path)
    announce(d, "billing", first)
    d.wait_recent("billing", first)
    d.wait_recent("crm", first)
    for name, title in (("billing", "Billing"), ("crm", "CRM")):
        row = version_of(d, name, first)
        assert row is not None
        artifact = Path(row["artifact_dir"])
        # Built in its folder, and only its folder is the version.
        assert (artifact / "built-here").exists() and (artifact / "lib" / "upper.py").exists()
        assert not (artifact / "libs").exists() and not (artifact / "components").exists()
        assert json.loads(row["descriptor"])["title"] == title
    # One mirror for the repository.
    assert sorted(p.name for p in (d.state_dir / "mirrors").iterdir()) == ["billing.git"]

    # A push under crm only, announced to billing's hook: crm builds, billing records why not.
    crm_sha = work.commit_push("crm change", {"components/crm/lib/upper.py": UPPER + "# 2\n"})
    announce(d, "billing", crm_sha)
    d.wait_recent("crm", crm_sha)
    why = wait_until(lambda: ignored(d, "billing", crm_sha), timeout=30)
    assert "changes nothing under paths components/billing/**, libs/common/**" in why[0]["message"]
    assert builds_of(d, "billing", crm_sha) == []

    # A push to the shared library, announced to crm's hook: billing builds, crm does not.
    lib_sha = work.commit_push("lib change", {"libs/common/money.py": "CENTS = 1000\n"})
    announce(d, "crm", lib_sha)
    d.wait_recent("billing", lib_sha)
    wait_until(lambda: ignored(d, "crm", lib_sha), timeout=30)
    assert builds_of(d, "crm", lib_sha) == []

    # A push that touches neither: nothing built; announced again, it is not looked at again.
    doc_sha = work.commit_push("docs", {"README.md": "platform, documented\n"})
    announce(d, "billing", doc_sha)
    wait_until(lambda: ignored(d, "billing", doc_sha) and ignored(d, "crm", doc_sha), timeout=30)
    announce(d, "crm", doc_sha)
    history = d.cli("history", "--component", "billing", "--json").stdout
    assert "changes nothing under paths" in history
    assert builds_of(d, "billing", doc_sha) == [] and builds_of(d, "crm", doc_sha) == []
    assert len(ignored(d, "billing", doc_sha)) == 1
    assert d.recent_sha("billing") == lib_sha and d.recent_sha("crm") == crm_sha

    # `deployd redeploy` builds an ignored commit on purpose.
    d.cli("redeploy", "billing", "--sha", doc_sha)
    d.wait_recent("billing", doc_sha)
