"""Browser tests: the pages of `tunelab serve` in headless Chromium through Playwright.

Chromium is Debian's (`apt-get install chromium`, /usr/bin/chromium; `$TUNELAB_CHROMIUM` names another), never
one that `playwright install` downloads: nothing in the suite needs the network. Without Chromium or the
playwright package the tests are skipped, with the reason; `.ci/run` installs Chromium and sets
TUNELAB_REQUIRE_BROWSER=1, so on CI a missing browser fails instead."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src"
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def serve():
    """`serve(MODEL, CWD, *options)`: a generator that runs `tunelab serve` and yields its URL (for a fixture)."""
    return _serve


def _serve(model: Path, cwd: Path, *extra: str):
    """Run `tunelab serve MODEL ...` in `cwd`; yield its base URL once /health answers; stop it afterwards."""
    import httpx

    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    log = tempfile.TemporaryFile(mode="w+")  # a file, not a pipe: a full pipe would block the server
    process = subprocess.Popen([sys.executable, "-m", "tunelab", "serve", str(model), "--port", str(port),
                                "--threads", "1", *extra], env=env, cwd=cwd, stderr=log, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600  # importing torch takes a minute on a busy 2-core machine
        while True:
            if process.poll() is not None:
                log.seek(0)
                pytest.fail(f"tunelab serve exited: {log.read()}")
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("tunelab serve did not answer /health within 600 s")
            time.sleep(0.25)
        yield url
    finally:
        process.terminate()  # uvicorn shuts down gracefully on SIGTERM
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()
