"""The rating protocol in a real browser (issue 13): Debian's chromium driven by Playwright.

A three-item study (one real and two "generated" patches) where two scales and the real-or-synthetic
judgement are required and a third scale is optional. In the browser: Submit stays disabled until every
required answer is set (nothing starts pre-set); a wrong code leaves the sign-in form usable and the right
code then signs in; a whole study is rated with the keyboard alone; the patch is shown at a chosen whole
zoom with nearest-neighbour pixels; the instructions open with one click. The page never names an origin.
A screenshot of the rater page goes to test-artifacts/browser/rater-page.png.
"""

from __future__ import annotations

import shutil

import pytest
from app_testkit import make_services
from browser_kit import SHOTS, browsing, expect, field
from test_review_support import CLASSES, MODELS, REAL, make_sources

pytestmark = pytest.mark.browser

STUDY = "keys"
RATERS = ("ann", "ben", "cat")
# Every answer radio that is set (the zoom radio is a view setting, not an answer).
ANSWERED = ".hl-scale input[type=radio]:checked, #review-judgement input[type=radio]:checked"
INSTRUCTIONS = "Score what you see; the keys below make it fast."


@pytest.fixture(scope="module")
def env(tiny_model, tmp_path_factory):
    from histolab.data.prompts import CLASS_PROMPTS
    from histolab.review import create_study, parse_config

    root = tmp_path_factory.mktemp("rating")
    sources = make_sources(root, per_class=1)
    # Three items: one real patch of the first class and one generated patch of each of the first two classes.
    real, gen = root / "pick-real", root / "pick-gen"
    real.mkdir()
    gen.mkdir()
    shutil.copy(sorted((sources / "real" / CLASSES[0]).iterdir())[0], real / "a.png")
    for cls in CLASSES[:2]:
        shutil.copy(sources / MODELS[0] / f"GENFILE_{MODELS[0]}_{cls}_0.png", gen / f"{cls}.png")
    services = make_services(root, tiny_model)
    config = {
        "id": STUDY,
        "owner": "olivia",
        "seed": 3,
        "image_size": 48,
        "instructions": INSTRUCTIONS,
        "prompts": dict(CLASS_PROMPTS),
        "show_prompt": False,  # three items cannot balance classes across sources; the prompt would tell
        "aspects": ["clinical_realism", "color_contrast", "confidence_of_use"],
        "required": ["clinical_realism", "color_contrast", "judgement"],  # confidence_of_use is optional
        "sources": [
            {"name": REAL, "kind": "real", "path": str(real), "class": CLASSES[0]},
            {"name": MODELS[0], "kind": "generated", "path": str(gen), "classes": "prompt"},
        ],
        "raters": list(RATERS),
    }
    report = create_study(services.store(), parse_config(config))
    assert report.units == 3
    with browsing(services) as (url, browser):
        yield {
            "url": url,
            "browser": browser,
            "services": services,
            "codes": report.raters,
            "forbidden": [REAL, *MODELS, "GENFILE", "generated", str(root), "recipe", "pick-"],
        }


def rater_page(env):
    page = env["browser"].new_page(viewport={"width": 1200, "height": 1100})
    page.goto(f"{env['url']}review?study={STUDY}")
    page.locator("#rater-signin").wait_for()
    expect(field(page, "rater-study")).to_have_value(STUDY)
    return page


def sign_in(page, rater: str, code: str) -> None:
    field(page, "rater-id").fill(rater)
    field(page, "rater-code").fill(code)
    page.locator("#rater-signin").click()


def radio(page, elem_id: str, value: str):
    return page.locator(f"#{elem_id} input[type=radio][value='{value}']")


def assert_blind(env, page) -> None:
    dom = page.content()
    for word in env["forbidden"]:
        assert word not in dom, word


def stored(env, rater: str) -> list[tuple]:
    db = env["services"].store().db
    return db.execute(
        "SELECT r.aspect, r.value FROM ratings r WHERE r.study_id = ? AND r.rater_id = ? AND r.current = 1 "
        "ORDER BY r.unit_id, r.aspect",
        [STUDY, rater],
    ).fetchall()


def test_a_wrong_code_then_the_right_one_signs_in(env):
    page = rater_page(env)
    sign_in(page, "ann", "not-the-code")
    expect(page.locator("#review-status")).to_contain_text("unknown study, rater or code")
    expect(page.locator("#review-status")).to_contain_text("tries left")
    # Counted for this rater id and for this computer (the browser's address, not one count for everyone).
    guard = env["services"].auth.guard
    assert guard.failures(f"rater:{STUDY}/ann") == 1 and guard.failures("client:127.0.0.1") == 1
    # The form is still there and usable: no error overlay over it, the fields take new text.
    expect(page.locator("#rater-signin")).to_be_enabled()
    assert page.locator("#rater-signin").is_visible()
    sign_in(page, "ann", env["codes"]["ann"])
    page.locator("#review-images img").wait_for()
    expect(page.locator("#review-progress")).to_contain_text("Item 1 of 3")
    assert_blind(env, page)
    page.close()


def test_submit_stays_disabled_until_every_required_answer_is_set(env):
    page = rater_page(env)
    sign_in(page, "ben", env["codes"]["ben"])
    page.locator("#review-images img").wait_for()
    send = page.locator("#review-submit")
    # Nothing starts set: no scale, no judgement, no confidence.
    assert page.locator(ANSWERED).count() == 0
    expect(send).to_be_disabled()
    expect(page.locator("#review-todo")).to_contain_text("Clinical realism")
    steps = [
        ("review-aspect-0", "6", "Color and contrast"),
        ("review-aspect-1", "4", "real or synthetic"),
        ("review-judgement", "real", "how sure"),
    ]
    for elem_id, value, still_missing in steps:
        radio(page, elem_id, value).click()
        expect(page.locator("#review-todo")).to_contain_text(still_missing)
        expect(send).to_be_disabled()
    radio(page, "review-confidence", "2").click()
    expect(send).to_be_enabled()  # the optional confidence_of_use is still unset
    expect(page.locator("#review-todo")).to_contain_text("Every required answer is given")

    # Pixel-exact zoom: a 48 px patch at "Auto" is 8x (384 px), at 2x 96 px, nearest-neighbour either way.
    img = page.locator("#review-images img").first
    assert img.evaluate("e => getComputedStyle(e).imageRendering") == "pixelated"
    assert img.evaluate("e => [e.naturalWidth, Math.round(e.getBoundingClientRect().width)]") == [48, 384]
    page.locator("#review-zoom").get_by_text("2×", exact=True).click()
    page.wait_for_function(
        "() => Math.round(document.querySelector('#review-images img').getBoundingClientRect().width) === 96"
    )
    # The instructions: one click away.
    page.locator("#review-instructions").get_by_text("Instructions (I)").click()
    expect(page.get_by_text(INSTRUCTIONS)).to_be_visible()
    page.locator("#review-zoom").get_by_text("Auto", exact=True).click()
    page.screenshot(path=str(SHOTS / "rater-page.png"), full_page=True)
    # Quick answering never fills the app's queue: no "currently busy" toast reached the rater.
    assert page.get_by_text("currently busy").count() == 0
    assert_blind(env, page)

    send.click()
    expect(page.locator("#review-status")).to_contain_text("answer saved (1 of 3 done)")
    expect(page.locator("#review-progress")).to_contain_text("Item 2 of 3")
    expect(send).to_be_disabled()  # the next item starts unset again
    assert page.locator(ANSWERED).count() == 0
    assert stored(env, "ben") == [("clinical_realism", 6.0), ("color_contrast", 4.0)]  # no default for the rest
    db = env["services"].store().db
    assert db.execute("SELECT says_synthetic, confidence FROM judgements WHERE rater_id = 'ben'").fetchall() == [(0, 2)]
    page.close()


def test_a_whole_study_rated_with_the_keyboard_alone(env):
    page = rater_page(env)
    field(page, "rater-id").fill("cat")
    field(page, "rater-code").fill(env["codes"]["cat"])
    page.keyboard.press("Enter")  # in the code field: signs in
    page.locator("#review-images img").wait_for()
    expect(page.locator("#review-keys")).to_contain_text("Enter")  # the legend is on the page
    # I opens the instructions; + and - step the zoom through whole factors (Auto, 1x, 2x, ...).
    page.keyboard.press("i")
    expect(page.get_by_text(INSTRUCTIONS)).to_be_visible()
    page.keyboard.press("+")
    page.keyboard.press("+")
    expect(page.locator("#review-zoom input[value='2']")).to_be_checked()
    width = "() => Math.round(document.querySelector('#review-images img').getBoundingClientRect().width)"
    page.wait_for_function(f"() => ({width})() === 96")
    page.keyboard.press("-")
    page.keyboard.press("-")
    expect(page.locator("#review-zoom input[value='auto']")).to_be_checked()
    page.wait_for_function(f"() => ({width})() === 384")
    plan = [("7", "3", "t", "s", "4"), ("0", "9", "5", "r", "1"), ("10", "2", "", "s", "5")]
    for k, (a, b, c, judge, sure) in enumerate(plan, 1):
        expect(page.locator("#review-progress")).to_contain_text(f"Item {k} of 3")
        expect(page.locator("#review-submit")).to_be_disabled()
        for key in (a if a != "10" else "t", b, c):
            if key:
                page.keyboard.press(key)
        page.keyboard.press(judge)
        page.keyboard.press(sure)
        expect(page.locator("#review-submit")).to_be_enabled()
        assert_blind(env, page)
        page.keyboard.press("Enter")
        if k < 3:
            expect(page.locator("#review-status")).to_contain_text(f"answer saved ({k} of 3 done)")
    expect(page.locator("#review-progress")).to_contain_text("All your tasks are done")
    assert page.get_by_text("currently busy").count() == 0  # keys at speed never filled the app's queue
    rows = (
        env["services"]
        .store()
        .db.execute(
            "SELECT a.position, r.aspect, r.value FROM ratings r JOIN assignments a "
            "ON a.unit_id = r.unit_id AND a.rater_id = r.rater_id WHERE r.rater_id = 'cat' ORDER BY a.position, r.aspect"
        )
        .fetchall()
    )
    assert rows == [
        (1, "clinical_realism", 7.0),
        (1, "color_contrast", 3.0),
        (1, "confidence_of_use", 10.0),  # T: ten
        (2, "clinical_realism", 0.0),
        (2, "color_contrast", 9.0),
        (2, "confidence_of_use", 5.0),
        (3, "clinical_realism", 10.0),
        (3, "color_contrast", 2.0),  # the optional scale left unset: nothing stored
    ]
    judged = (
        env["services"]
        .store()
        .db.execute(
            "SELECT a.position, j.says_synthetic, j.confidence FROM judgements j JOIN assignments a "
            "ON a.unit_id = j.unit_id AND a.rater_id = j.rater_id WHERE j.rater_id = 'cat' ORDER BY a.position"
        )
        .fetchall()
    )
    assert judged == [(1, 1, 4), (2, 0, 1), (3, 1, 5)]
    page.close()
