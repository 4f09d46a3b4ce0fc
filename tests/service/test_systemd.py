"""The shipped unit passes `systemd-analyze verify` and rates "OK" (≤ 2.5) on its security scan.

Both run on the real files in `systemd/`; they are skipped where systemd-analyze is missing.
`verify` insists that ExecStart exists, so it checks a copy whose ExecStart points at the
`deployd` script of the environment running the tests (the same script, another prefix).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "systemd" / "deployd.service"
SYSUSERS = ROOT / "systemd" / "deployd.sysusers"
INSTALLED = "/opt/deployd/.venv/bin/deployd"
ANALYZE = shutil.which("systemd-analyze")

needs_analyze = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze is not installed")


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), capture_output=True, text=True, timeout=60, check=False)


def test_unit_runs_the_documented_command() -> None:
    text = UNIT.read_text()
    assert f"ExecStart={INSTALLED} serve -c /etc/deployd/config.toml" in text
    assert "Type=notify" in text
    assert "ExecReload=/bin/kill -HUP $MAINPID" in text
    assert re.search(r"^KillMode=mixed$", text, re.M)
    assert re.search(r"^WatchdogSec=\d+", text, re.M)


@needs_analyze
def test_unit_verifies_clean(tmp_path: Path) -> None:
    script = Path(sys.executable).parent / "deployd"
    assert script.exists(), f"{script} missing: install the project into this environment"
    copy = tmp_path / "deployd.service"
    copy.write_text(UNIT.read_text().replace(INSTALLED, str(script)))
    proc = _run(str(ANALYZE), "verify", str(copy))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip() == "" and proc.stderr.strip() == "", proc.stdout + proc.stderr


@needs_analyze
def test_unit_security_rating_is_ok_or_better() -> None:
    proc = _run(str(ANALYZE), "security", "--offline=true", "--no-pager", str(UNIT))
    out = proc.stdout + proc.stderr
    match = re.search(r"Overall exposure level for deployd\.service: (\d+(?:\.\d+)?)", out)
    assert match, out
    assert float(match.group(1)) <= 2.5, out


@pytest.mark.skipif(shutil.which("systemd-sysusers") is None, reason="no systemd-sysusers")
def test_sysusers_creates_the_deployd_user(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    proc = _run("systemd-sysusers", f"--root={tmp_path}", "--dry-run", str(SYSUSERS))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Creating user 'deployd'" in proc.stdout + proc.stderr
