"""Gradio's check that the app's own page answers, made patient.

``Blocks.launch()`` asks its freshly started server for the page once (``gradio.networking.url_ok``:
HEAD with a 3 s timeout, and a timeout ends the check) and, when that fails, refuses to start: "When
localhost is not accessible, a shareable link must be created". On a busy machine the first answer
can take longer than 3 s (a Space's two cores with the model loading beside the page; CI beside
other jobs), so the app failed for being slow, not for being unreachable: 7 errors at the launch of
tests/test_app_review.py's app in a run of the suite beside two CPU hogs. ``patient_url_ok`` keeps
the check's meaning (a refused connection is still "not accessible") but retries timed-out requests
until ``DEADLINE_S`` has passed.
"""

from __future__ import annotations

import time

DEADLINE_S = 180.0
ATTEMPT_TIMEOUT_S = 30.0
# What gradio's own check accepts: 401 or a redirect when auth is on.
OK_STATUS = (200, 401, 301, 302, 303, 307, 308)


def patient_url_ok(url: str, *, deadline_s: float = DEADLINE_S, attempt_timeout_s: float = ATTEMPT_TIMEOUT_S) -> bool:
    import httpx

    start = time.monotonic()
    while True:
        try:
            r = httpx.head(url, timeout=attempt_timeout_s, verify=False)
            if r.status_code in OK_STATUS:
                return True
        except httpx.TimeoutException:
            pass  # slow, not unreachable: ask again
        except (ConnectionError, httpx.ConnectError):
            return False
        if time.monotonic() - start > deadline_s:
            return False
        time.sleep(0.5)


def install() -> None:
    """Make gradio's launch use ``patient_url_ok`` (it looks the function up on its module at each launch)."""
    from gradio import networking

    networking.url_ok = patient_url_ok
