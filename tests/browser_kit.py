"""What the browser tests share: Debian's chromium driven by Playwright (never a downloaded browser),
patient waits, and the app served to it."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
from app_testkit import served
from waiting import GENEROUS_MS

ROOT = Path(__file__).resolve().parent.parent
SHOTS = ROOT / "test-artifacts" / "browser"
CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# ms; a guard against a hang, not a speed limit: the tiny model answers in well under a second idle, and
# every wait is on a DOM state, so a loaded CI machine only makes it take longer.
WAIT = GENEROUS_MS


def expect(locator):
    from playwright.sync_api import expect as pw_expect

    pw_expect.set_options(timeout=WAIT)  # its own default is 5 s
    return pw_expect(locator)


class PatientBrowser:
    """The browser, with every page and context it opens waiting ``WAIT`` by default (Playwright's own
    default is 30 s for each click, fill and read)."""

    def __init__(self, browser):
        self._browser = browser

    def new_page(self, **kw):
        return self._patient(self._browser.new_page(**kw))

    def new_context(self, **kw):
        return self._patient(self._browser.new_context(**kw))

    @staticmethod
    def _patient(target):
        target.set_default_timeout(WAIT)
        target.set_default_navigation_timeout(WAIT)
        return target


@contextlib.contextmanager
def browsing(services):
    """The app for ``services`` served on a free port and a chromium to visit it: yields (url, browser)."""
    if not Path(CHROMIUM).exists():
        pytest.fail(
            f"{CHROMIUM} is missing: install Debian's chromium (apt-get install chromium); scripts/test.sh does"
        )
    from playwright.sync_api import sync_playwright

    SHOTS.mkdir(parents=True, exist_ok=True)
    with served(services) as (_, url), sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            yield url, PatientBrowser(browser)
        finally:
            browser.close()


def field(page, elem_id: str):
    return page.locator(f"#{elem_id} textarea, #{elem_id} input").first


def tab(page, name: str) -> None:
    page.get_by_role("tab", name=name).click()


def shot(page, name: str) -> None:
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)
