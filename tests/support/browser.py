"""A real headless browser for the tests: Debian's chromium, driven by Playwright.

Playwright's own browser download is never used (`playwright install` is not run: the machine
has no way out but the package registries); it launches the system's `/usr/bin/chromium`, which
`scripts/install-deps --browser` installs (`make test` does). The flags keep Chromium from
reaching out (background networking, component updates, sync, QUIC): on a closed network those
connections are refused, and they would only slow the page. Each launch gets a new empty
profile (Playwright makes one per launch).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

CHROMIUM = "/usr/bin/chromium"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@contextmanager
def chromium() -> Iterator[Any]:
    """A launched browser (playwright.sync_api.Browser); closed afterwards."""
    if shutil.which("chromium") is None:
        pytest.fail("Debian's chromium is not installed: scripts/install-deps --browser (make test does)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("Playwright is not installed: pip install -e '.[browser]' (make test does)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        try:
            yield browser
        finally:
            browser.close()
