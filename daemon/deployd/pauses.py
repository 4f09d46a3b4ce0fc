"""What is paused: components (their pushes are not built) and flows (not redeployed by
themselves). One owner of that state, persisted in the store; the pipeline and the deployer
only ask, the operator's pause and resume change it."""

from __future__ import annotations

from typing import Literal

from .store import Store

Kind = Literal["component", "flow"]


class Pauses:
    """The paused components and flows, loaded from the store and kept in step with it."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._paused: dict[str, set[str]] = {"component": set(), "flow": set()}

    def load(self) -> None:
        """Read what was paused before the daemon (re)started."""
        for kind, names in self.store.paused().items():
            self._paused.setdefault(kind, set()).update(names)

    def component(self, name: str) -> bool:
        """True when pushes of component `name` are not built."""
        return name in self._paused["component"]

    def flow(self, name: str) -> bool:
        """True when flow `name` is not redeployed by itself."""
        return name in self._paused["flow"]

    def pause(self, kind: Kind, name: str) -> None:
        self.store.set_paused(kind, name, True)
        self._paused[kind].add(name)

    def resume(self, kind: Kind, name: str) -> None:
        self.store.set_paused(kind, name, False)
        self._paused[kind].discard(name)
