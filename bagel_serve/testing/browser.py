"""A headless Chromium for the playground's browser test and its screenshot: the distribution's `chromium`
and `chromium-driver` packages driven by selenium. Nothing is downloaded at run time: the driver's path is
given (so selenium-manager is never asked) and `SE_OFFLINE` forbids it anyway.

`BAGEL_CHROMIUM` / `BAGEL_CHROMEDRIVER` point elsewhere than Debian's /usr/bin paths.
"""

from __future__ import annotations

import os
import shutil
from typing import Any

CHROMIUM = os.environ.get("BAGEL_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("BAGEL_CHROMEDRIVER", "/usr/bin/chromedriver")
INSTALL_HINT = ("install them with `apt-get install chromium chromium-driver` (scripts/test.sh does when they are "
                "missing), or set BAGEL_CHROMIUM / BAGEL_CHROMEDRIVER")


class BrowserUnavailable(RuntimeError):
    """Chromium, its driver or selenium is missing; the message says how to install it."""


def headless_chromium(width: int = 1280, height: int = 900) -> Any:
    """A selenium WebDriver of a fresh headless Chromium (its own temporary profile), `width` x `height`
    CSS pixels; `quit()` it when done."""
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not (os.path.isfile(p) and os.access(p, os.X_OK))]
    if missing:
        raise BrowserUnavailable(f"{' and '.join(missing)} not found (the playground's browser test needs "
                                 f"Chromium and its driver): {INSTALL_HINT}")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        raise BrowserUnavailable("selenium is not installed: pip install '.[test]'") from None
    os.environ["SE_OFFLINE"] = "true"
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which(CHROMIUM) or CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--disable-extensions", "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", f"--window-size={width},{height}"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
