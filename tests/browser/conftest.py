"""Browser tests: the pages of `tunelab serve` in headless Chromium through Playwright.

Chromium is Debian's (`apt-get install chromium`, /usr/bin/chromium; `$TUNELAB_CHROMIUM` names another), never
one that `playwright install` downloads: nothing in the suite needs the network. Without Chromium or the
playwright package the tests are skipped, with the reason; `.ci/run` installs Chromium and sets
TUNELAB_REQUIRE_BROWSER=1, so on CI a missing browser fails instead."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _missing(reason: str) -> None:
    if os.environ.get("TUNELAB_REQUIRE_BROWSER"):
        pytest.fail(f"{reason} (TUNELAB_REQUIRE_BROWSER is set)")
    pytest.skip(reason)


def chromium_path() -> str | None:
    """$TUNELAB_CHROMIUM when set (and only it), else Debian's /usr/bin/chromium or a chromium on the PATH."""
    named = os.environ.get("TUNELAB_CHROMIUM")
    for candidate in ([named] if named else ["/usr/bin/chromium", shutil.which("chromium")]):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None


@pytest.fixture(scope="module")
def browser():
    """A headless Chromium (skipped, with the reason, when Chromium or playwright is missing). Module scope, not
    session: Playwright's sync API keeps an event loop running in this thread while it is open, and tests after
    these ones call asyncio.run()."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _missing("the playwright package is not installed (pip install playwright; no `playwright install`)")
    path = chromium_path()
    if path is None:
        named = os.environ.get("TUNELAB_CHROMIUM")
        _missing(f"TUNELAB_CHROMIUM={named} is not an executable" if named else
                 "Chromium is not installed: apt-get install chromium (or set TUNELAB_CHROMIUM to a Chromium)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=path, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()
