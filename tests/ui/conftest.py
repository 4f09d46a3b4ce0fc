"""Fixtures of the dashboard's tests: a daemon shared by a test module, and a real headless
Chromium (tests/browser.py) that skips — or fails under CI=true — when none can be had."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.browser import browser_unavailable, start_browser
from tests.conftest import Daemon, free_port, under_ci


def require_browser() -> None:
    """Skip the calling test when no Chromium can be had here; under CI=true, fail it."""
    reason = browser_unavailable()
    if reason is None:
        return
    if under_ci():
        pytest.fail(f"CI=true and no browser: {reason}", pytrace=False)
    pytest.skip(reason)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # A test using the browser fixture is a `browser` test: `-m "not browser"` leaves it out.
    for item in items:
        if "browser" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.browser)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """A headless Chromium for the whole module, quit at its end."""
    require_browser()
    try:
        driver = start_browser()
    except Exception as exc:  # the packages are there, the browser does not start
        reason = f"chromium did not start: {str(exc).splitlines()[0] if str(exc) else exc!r}"
        if under_ci():
            pytest.fail(f"CI=true and no browser: {reason}", pytrace=False)
        pytest.skip(reason)
    try:
        yield driver
    finally:
        with contextlib.suppress(Exception):
            driver.quit()


@pytest.fixture(scope="module")
def module_daemon(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Callable[..., Daemon]]:
    """module_daemon(components=[{"name": "hello"}], **daemon_keys) → a started Daemon,
    shared by the module's tests and stopped at its end."""
    made: list[Daemon] = []

    def make(components: list[dict[str, Any]] | None = None, **daemon_extra: Any) -> Daemon:
        root: Path = tmp_path_factory.mktemp("deployd")
        d = Daemon(
            root=root,
            port=free_port(),
            components=components if components is not None else [{"name": "hello"}],
            daemon_extra=daemon_extra,
        )
        made.append(d)
        return d.start()

    yield make
    for d in made:
        with contextlib.suppress(Exception):
            d.stop()
        if d.proc is not None and d.proc.poll() is None:
            d.proc.kill()
            d.proc.wait(10)
