"""Frozen data that crosses layers: push notices, registered versions, states.

The enums are `StrEnum`s, so they serialise (JSON, SQLite) to the same strings as before.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PushNotice:
    """ "Something may have changed" for one component; `sha` None means: use the branch head."""

    component: str
    ref: str | None
    sha: str | None
    source: str
    delivery_id: str | None = None
    force: bool = False  # `deployd redeploy`: build again even if the commit already failed


@dataclass(frozen=True)
class VersionRegistered:
    """The pipeline registered a new component version (the deployer's cue to redeploy)."""

    component: str
    version: int
    sha: str
    semver: str | None
