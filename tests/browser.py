"""A real browser for tests: Debian's headless Chromium driven by selenium through Debian's chromedriver.

`.ci/run` installs both (apt packages `chromium` and `chromium-driver`). Without them a test that needs the
browser is skipped on a developer's machine and fails under CI (CI=true), so a broken install cannot pass
silently.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1280,1150", "--hide-scrollbars"]


def find_browser() -> tuple[str, str]:
    """(chromium, chromedriver) paths, or skip (fail under CI)."""
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if chromium is None or driver is None:
        message = "Debian's chromium and chromium-driver are needed (apt-get install -y chromium chromium-driver)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return chromium, driver


@contextmanager
def chromium(profile_dir: Path) -> Iterator:
    """A headless Chromium with a fresh profile in `profile_dir`, quit (and reaped by chromedriver) on exit."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary, driver_path = find_browser()
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in [*CHROMIUM_FLAGS, f"--user-data-dir={profile_dir}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        yield driver
    finally:
        driver.quit()
