"""End to end in a real browser: Debian's chromium driven by Playwright (never a downloaded browser).

Generate a batch and an X/Y plot; sign in as admin and build a study from a generated and a real set;
rate it as a rater on the rater page, reload midway and resume, finish; export it. While the rater
works, the page's DOM and every network response it receives (the queue's event stream included)
are scanned for source and model names. Screenshots of every tab go to test-artifacts/browser/.
"""

from __future__ import annotations

import re
import zipfile
from pathlib import Path

import pytest
from app_testkit import ADMIN_PASSWORD, add_lora, make_services
from browser_kit import WAIT, browsing, expect, field, shot, tab

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def env(tiny_model, tmp_path_factory):
    from histolab.cli.demo_data import write_generated_set

    root = tmp_path_factory.mktemp("browser")
    services = make_services(root, tiny_model, max_steps=25)
    add_lora(tiny_model, services.paths.checkpoints, "lora-brown", seed=3)
    write_generated_set(tiny_model, services.sets_root / "model-x", 3.0, per_class=2, steps=2, seed=0)
    with browsing(services) as (url, browser):
        yield {
            "url": url,
            "browser": browser,
            "services": services,
            "forbidden": [
                "model-x",
                "bundled-test",
                "bundled-val",
                "generated",
                "random-tiny",
                "lora-brown",
                "embedded",
                str(root),
                "recipe",
            ],
        }


def gradio_static_file(url: str, body: bytes) -> bool:
    """True when ``url`` is one of Gradio's own front-end files and ``body`` is exactly that file."""
    from urllib.parse import urlparse

    import gradio

    path = urlparse(url).path
    if not path.startswith(("/assets/", "/static/")) or ".." in path:
        return False
    local = Path(gradio.__file__).parent / "templates" / "frontend" / path.lstrip("/")
    return local.is_file() and local.read_bytes() == body


def test_generate_a_batch_and_an_xy_plot(env):
    page = env["browser"].new_page(viewport={"width": 1400, "height": 1000})
    page.goto(env["url"])
    page.locator("#generate-button").wait_for(timeout=WAIT)
    page.locator("#generate-button").click()
    page.locator("#generated-gallery img").nth(2).wait_for(timeout=WAIT)  # 3 images (the batch slider's max here)
    assert page.locator("#generated-gallery img").count() == 3
    shot(page, "tab-generate")
    tab(page, "Compare")
    page.get_by_role("tab", name="X/Y plot").click()
    page.get_by_role("button", name="Plot").click()
    page.locator("#compare-grid img").wait_for(timeout=WAIT)
    shot(page, "tab-compare")
    page.close()


def test_build_a_study_rate_it_blind_resume_and_export(env):
    url, browser = env["url"], env["browser"]
    admin = browser.new_page(viewport={"width": 1400, "height": 1000})
    admin.goto(url)
    admin.get_by_text("Admin sign-in").click()
    field(admin, "admin-user").fill("admin")
    field(admin, "admin-password").fill(ADMIN_PASSWORD)
    admin.locator("#admin-signin").click()
    admin.get_by_text("Signed in as admin").wait_for(timeout=WAIT)
    tab(admin, "Studies")
    field(admin, "study-id").fill("browser-study")
    for name in ("model-x (generated)", "bundled-test (real)"):  # a checkbox group: it stays open for each pick
        admin.locator("#study-rated").get_by_label(name, exact=True).check()
    field(admin, "study-raters").fill("rita")
    field(admin, "study-limit").fill("2")  # images per class and set: 6 + 6 tasks
    admin.locator("#study-create").click()
    admin.wait_for_function("() => /rita/.test(document.querySelector('#study-codes').innerText)", timeout=WAIT)
    found = re.search(r"rita\s+([A-Za-z0-9_-]{16})(?![A-Za-z0-9_-])", admin.locator("#study-codes").inner_text())
    assert found, admin.locator("#study-codes").inner_text()
    code = found.group(1)
    # The invitations, all at once: to copy, and as a CSV (rater id, code, link).
    expect(admin.locator("#study-invitations textarea")).to_have_value(re.compile(re.escape(code)))
    csv_link = admin.locator("#study-invitations-csv a").first
    with admin.expect_download() as dl:
        csv_link.click()
    lines = Path(dl.value.path()).read_text(encoding="utf-8").splitlines()
    assert lines == ["rater_id,code,link", f"rita,{code},{url}review?study=browser-study"]
    shot(admin, "tab-studies")
    for name in ("Train", "Evaluate"):
        tab(admin, name)
        admin.wait_for_timeout(500)
        shot(admin, f"tab-{name.lower()}")

    # The rater, in a browser context of their own, on the rater page the owner links to.
    context = browser.new_context(viewport={"width": 1200, "height": 1000})
    rater = context.new_page()
    bodies, doms = [], []

    def capture(route):
        """Every response the rater's page gets passes through here, whole (the queue's event stream too:
        Gradio closes it once the session's events are done), and is kept for the scan below, except
        Gradio's own front-end files, checked byte for byte against the installed package. The heartbeat
        stream (pings that keep the session alive, open as long as the page) passes through unbuffered."""
        if "/gradio_api/heartbeat/" in route.request.url:
            route.continue_()
            return
        # A loaded machine sometimes resets a connection mid-asset; a GET is safe to repeat (and what comes
        # back is still scanned). Anything else fails the test at once.
        attempts = 3 if route.request.method == "GET" else 1
        for attempt in range(attempts):
            try:
                response = route.fetch(timeout=WAIT)
                body = response.body()
                break
            except Exception as exc:
                if "Response has been disposed" in str(exc):
                    # The page navigated (sign-in reloads it) while this request's stream was open: Playwright
                    # dropped the response, so nothing of it reaches a page, and there is nothing to scan.
                    return
                if attempt + 1 == attempts or "ECONNRESET" not in str(exc):
                    raise
        if not gradio_static_file(route.request.url, body):
            bodies.append((route.request.url, body.decode("utf-8", "replace")))
        route.fulfill(response=response, body=body)

    context.route("**/*", capture)

    def sign_in():
        rater.goto(f"{url}review?study=browser-study")
        rater.locator("#rater-signin").wait_for(timeout=WAIT)
        expect(field(rater, "rater-study")).to_have_value("browser-study", timeout=WAIT)  # from the link
        field(rater, "rater-id").fill("rita")
        field(rater, "rater-code").fill(code)
        rater.locator("#rater-signin").click()
        rater.locator("#review-images img").wait_for(timeout=WAIT)

    def rate_one(i: int) -> None:
        header = rater.locator("#review-progress").inner_text()
        expect(rater.locator("#review-submit")).to_be_disabled()  # nothing is pre-set
        n = rater.locator(".hl-scale:visible").count() - 1  # the aspects' scales (the last is "How sure?")
        assert n == 5
        for j in range(n):  # every answer, each on its own scale
            rater.locator(f"#review-aspect-{j} input[type=radio][value='{(i + j) % 11}']").click()
        rater.locator("#review-artefacts").get_by_text("Patchy stromal background").click()
        rater.locator("#review-judgement").get_by_text("Synthetic" if i % 2 else "Real", exact=True).click()
        rater.locator("#review-confidence input[type=radio][value='3']").click()
        field(rater, "review-comment").fill(f"note {i}")
        expect(rater.locator("#review-submit")).to_be_enabled()
        doms.append(rater.content())
        rater.locator("#review-submit").click()
        # The acknowledgement itself, not just a changed header: Gradio re-renders the header while the
        # submit is in flight, and a reload then would cancel the answer's acknowledgement.
        rater.get_by_text(f"answer saved ({i + 1} of 12 done)").wait_for(timeout=WAIT)
        rater.wait_for_function(
            "h => !document.querySelector('#review-progress') || document.querySelector('#review-progress').innerText !== h",
            arg=header,
            timeout=WAIT,
        )

    sign_in()
    assert "Item 1 of 12" in rater.locator("#review-progress").inner_text()
    shot(rater, "tab-review")
    for i in range(3):
        rate_one(i)
    rater.reload()  # midway: a new session; the rater signs in again and resumes where they stopped
    sign_in()
    assert "Item 4 of 12" in rater.locator("#review-progress").inner_text()
    for i in range(3, 12):
        rate_one(i)
    rater.get_by_text("All your tasks are done").wait_for(timeout=WAIT)
    doms.append(rater.content())
    shot(rater, "review-done")

    # Nothing the rater's browser holds or received names a source or a model.
    streamed = "".join(text for u, text in bodies if "queue/data" in u)
    # Every answer's acknowledgement and the task views (with their inline images) came through the stream.
    missing = [k for k in range(1, 13) if f"answer saved ({k} of 12 done)" not in streamed]
    assert not missing, f"acknowledgements {missing} not seen in the captured event stream"
    assert "Item 12 of 12" in streamed and "data:image/png;base64," in streamed
    for text in [*doms, *(t for _, t in bodies)]:
        for word in env["forbidden"]:
            assert word not in text, word
    context.close()

    rows = (
        env["services"]
        .store()
        .db.execute(
            "SELECT COUNT(*), COUNT(DISTINCT unit_id) FROM submissions WHERE study_id = 'browser-study' AND rater_id = 'rita'"
        )
        .fetchone()
    )
    assert rows == (12, 12)

    # The owner exports it.
    tab(admin, "Studies")
    expect(field(admin, "study-chosen")).to_have_value("browser-study")
    admin.locator("#study-export").click()
    link = admin.locator("#study-export-file a").first
    link.wait_for(timeout=WAIT)
    with admin.expect_download() as dl:
        link.click()
    path = dl.value.path()
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
    assert "browser-study_blinded_report.html" in names and "browser-study_blinded.json" in names
    shot(admin, "studies-exported")
    admin.close()
