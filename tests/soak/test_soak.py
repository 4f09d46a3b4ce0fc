"""The short soak: 10 random fault cycles (fixed seed) with every invariant checked.

`make soak` runs the long version (100 cycles); see tests/soak/soak.py for what is injected
and what is asserted.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.soak.soak import run_soak


@pytest.mark.timeout(240)
def test_short_soak_keeps_every_invariant(tmp_path: Path) -> None:
    report = run_soak(cycles=10, seed=7, workdir=tmp_path / "soak")
    print(report.table())
    assert report.ok, "\n".join([*report.log, report.table()])
    assert sum(report.faults.values()) >= 10
    for flow in report.flows.values():
        assert flow.produced > 0 and flow.lost == 0 and flow.duplicates == 0
