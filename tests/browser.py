"""A real headless Chromium for the dashboard's tests: Debian's `chromium` and
`chromium-driver` (`make test` installs them as root; scripts/ensure-packages), driven by
selenium with that system browser and driver: nothing is downloaded at test time.

`browser_unavailable()` says in one line why no browser can be had here (None: one can);
the tests skip with it, or fail under CI=true (tests/ui/conftest.py).
"""

from __future__ import annotations

import os
import shutil
from typing import Any

BROWSERS = ("chromium", "chromium-browser")
DRIVERS = ("chromedriver",)
PACKAGES = "chromium chromium-driver"


def _which(names: tuple[str, ...]) -> str | None:
    for name in names:
        path = shutil.which(name) or (
            f"/usr/bin/{name}" if os.path.exists(f"/usr/bin/{name}") else None
        )
        if path:
            return path
    return None


def browser_unavailable() -> str | None:
    """Why no headless Chromium can be started here, in one line; None when it can."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "no selenium (pip install -e '.[dev]')"
    hint = f"Debian: apt-get install {PACKAGES}; `make test` does it as root"
    if _which(BROWSERS) is None:
        return f"no chromium here ({hint})"
    if _which(DRIVERS) is None:
        return f"no chromedriver here ({hint})"
    return None


def start_browser(width: int = 1400, height: int = 1000) -> Any:
    """A headless Chromium (selenium WebDriver) on the system's browser and driver, with its
    console log readable (`driver.get_log("browser")`)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = _which(BROWSERS) or ""
    for arg in (
        "--headless=new",
        "--no-sandbox",  # root in a container has no user namespace for the sandbox
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--disable-extensions",
        "--disable-background-networking",
        f"--window-size={width},{height}",
    ):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = Service(executable_path=_which(DRIVERS) or "")
    return webdriver.Chrome(service=service, options=opts)


def severe(driver: Any) -> list[dict[str, Any]]:
    """The console entries of level SEVERE since the last call (errors, CSP violations,
    failed loads)."""
    return [e for e in driver.get_log("browser") if e.get("level") == "SEVERE"]
