"""Where everything lives under `state_dir` (one place, so no module invents a path)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Paths:
    """The layout of the state directory."""

    root: Path

    @property
    def db(self) -> Path:
        return self.root / "deployd.db"

    @property
    def inbox(self) -> Path:
        """Push records written by the post-receive hook; survives a stopped daemon."""
        return self.root / "inbox"

    @property
    def repos(self) -> Path:
        """Bare repositories that deployd hosts (components without a url)."""
        return self.root / "repos"

    @property
    def mirrors(self) -> Path:
        """Mirrors of remote repositories, fetched incrementally."""
        return self.root / "mirrors"

    @property
    def versions(self) -> Path:
        """Artifact folders of registered component versions: versions/<name>/<n>."""
        return self.root / "versions"

    @property
    def builds(self) -> Path:
        """Scratch folders of running builds; emptied at start."""
        return self.root / "builds"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def build_logs(self) -> Path:
        return self.logs / "builds"

    @property
    def step_logs(self) -> Path:
        return self.logs / "steps"

    @property
    def pidfile(self) -> Path:
        """The daemon's pid, alone on one line: `kill -HUP $(cat <state_dir>/deployd.pid)`."""
        return self.root / "deployd.pid"

    def read_pid(self) -> int | None:
        """The pid in the pid file (also the JSON one of older daemons), or None."""
        import json

        try:
            text = self.pidfile.read_text().strip()
        except OSError:
            return None
        if text.isdigit():
            return int(text)
        try:
            return int(json.loads(text)["pid"])
        except (ValueError, KeyError, TypeError):
            return None

    @property
    def lockfile(self) -> Path:
        return self.root / "deployd.lock"

    @property
    def token_file(self) -> Path:
        return self.root / "api-token"

    @property
    def objects(self) -> Path:
        """The object store's files (attachments): objects/<id[:2]>/<id> and <id>.json."""
        return self.root / "objects"

    @property
    def object_key(self) -> Path:
        """The key the object store's per-flow tokens are derived from (0600)."""
        return self.root / "object-storage-key"

    @property
    def artifacts(self) -> Path:
        """Component versions as pods download them: <component>-<version>.tar.gz, .sha256."""
        return self.root / "artifacts"

    def hosted_repo(self, name: str) -> Path:
        return self.repos / f"{name}.git"

    def mirror(self, name: str) -> Path:
        return self.mirrors / f"{name}.git"

    def dirs(self) -> list[Path]:
        return [
            self.root,
            self.inbox,
            self.repos,
            self.mirrors,
            self.versions,
            self.builds,
            self.build_logs,
            self.step_logs,
        ]
