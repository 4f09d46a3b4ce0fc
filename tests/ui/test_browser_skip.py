"""Without a browser the browser tests skip with one line saying why; under CI=true they
fail instead (as the RabbitMQ tests do: tests/conftest.py)."""

from __future__ import annotations

import pytest

import tests.ui.conftest as ui
from tests import browser


def test_no_browser_skips_with_the_reason_or_fails_under_ci(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(browser, "_which", lambda names: None)
    reason = browser.browser_unavailable()
    assert reason is not None
    assert "apt-get install chromium chromium-driver" in reason
    assert "\n" not in reason
    monkeypatch.setattr(ui, "browser_unavailable", lambda: reason)
    monkeypatch.setenv("CI", "false")
    with pytest.raises(pytest.skip.Exception, match="no chromium here"):
        ui.require_browser()
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true and no browser: no chromium"):
        ui.require_browser()
