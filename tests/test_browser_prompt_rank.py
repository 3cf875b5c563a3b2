"""The per-prompt ranking (Prompt-to-Polyp, issue 16) on the rater page in a real browser.

A study with ``prompt_ranking: true`` over one real source and two models, one image per class and source: 3
rank groups of 3 images. The rater's ordinary tasks are answered beforehand through the library, so on sign-in
the page shows the first rank group: the prompt, the three images side by side, one unset rank radio each.
Submit stays disabled until each rank is used once; a duplicate sent anyway (the button forced enabled) is
refused by the server with the library's message on the page and nothing stored; the complete ranks are
stored against the images the rater saw in each slot; the page never names an origin. A screenshot goes to
test-artifacts/browser/prompt-rank.png.
"""

from __future__ import annotations

import base64
import re

import numpy as np
import pytest
from app_testkit import make_services
from browser_kit import SHOTS, browsing, expect, field
from test_review_support import MODELS, REAL, answers_for, make_sources, new_id, study_dict

pytestmark = pytest.mark.browser

STUDY = "s1"


@pytest.fixture(scope="module")
def env(tiny_model, tmp_path_factory):
    from histolab.review import create_study, next_task, parse_config, submit

    root = tmp_path_factory.mktemp("prank")
    sources = make_sources(root, per_class=1)
    services = make_services(root, tiny_model)
    store = services.store()
    report = create_study(store, parse_config(study_dict(sources, prompt_ranking=True, raters=["ann"])))
    assert report.prompt_rank_groups == 3
    rng = np.random.default_rng(0)
    while (task := next_task(store, STUDY, "ann")) is not None:  # the ordinary tasks come first
        submit(store, STUDY, "ann", task.task_id, answers_for(task, rng), new_id())
    with browsing(services) as (url, browser):
        yield {
            "url": url,
            "browser": browser,
            "services": services,
            "codes": report.raters,
            "forbidden": [REAL, *MODELS, "GENFILE", "generated", str(root), "recipe", "sources/"],
        }


def choice(page, slot: int, rank: int):
    return page.locator(f"#rank-choice-{slot} input[type=radio][value='{rank}']")


def assert_blind(env, page) -> None:
    dom = page.content()
    for word in env["forbidden"]:
        assert word not in dom, word
    section = page.locator("#rank-task").inner_html().lower()
    for word in ("real", "synthetic", "source", "model"):
        assert not re.search(rf"\b{word}\b", section), word


def stored(env) -> list[tuple]:
    """(item's image file bytes, rank) of ann's current ranks."""
    store = env["services"].store()
    rows = store.db.execute(
        "SELECT i.image_file, r.rank FROM prompt_ranks r JOIN items i ON i.item_id = r.item_id "
        "WHERE r.rater_id = 'ann' AND r.current = 1"
    ).fetchall()
    return [((store.study_dir(STUDY) / f).read_bytes(), rank) for f, rank in rows]


def shown_pngs(page, n: int) -> list[bytes]:
    out = []
    for i in range(n):
        src = page.locator(f"#rank-image-{i} img").get_attribute("src")
        assert src.startswith("data:image/png;base64,")  # inline: no file name or URL to read an origin from
        out.append(base64.b64decode(src.split(",", 1)[1]))
    return out


def test_a_rater_ranks_a_group_with_the_real_image_blind(env):
    page = env["browser"].new_page(viewport={"width": 1200, "height": 1100})
    page.goto(f"{env['url']}review?study={STUDY}")
    page.locator("#rater-signin").wait_for()
    expect(field(page, "rater-study")).to_have_value(STUDY)  # the link's study is filled in before signing in
    field(page, "rater-id").fill("ann")
    field(page, "rater-code").fill(env["codes"]["ann"])
    page.locator("#rater-signin").click()

    expect(page.locator("#rank-progress")).to_contain_text("Group 1 of 3")
    expect(page.locator("#review-progress")).to_contain_text("Your scoring tasks are done")
    expect(page.locator("#rank-prompt")).to_contain_text("Prompt:")
    assert page.locator("#rank-task img").count() == 3
    assert page.locator("#rank-task input[type=radio]:checked").count() == 0  # nothing pre-selected
    send = page.locator("#rank-submit")
    expect(send).to_be_disabled()
    expect(page.locator("#rank-todo")).to_contain_text("a rank for image 1")

    # A rank used twice keeps Submit disabled and says which.
    choice(page, 0, 1).click()
    choice(page, 1, 1).click()
    choice(page, 2, 3).click()
    expect(page.locator("#rank-todo")).to_contain_text("rank 1 is given more than once")
    expect(send).to_be_disabled()
    # Sent anyway (the button forced enabled): the server refuses with the library's message, on the page.
    page.evaluate("() => { document.querySelector('#rank-submit').disabled = false; }")
    send.click()
    expect(page.locator("#rank-status")).to_contain_text("each rank 1..3 must be given exactly once")
    assert stored(env) == []
    expect(page.locator("#rank-progress")).to_contain_text("Group 1 of 3")  # the form stays, usable

    choice(page, 1, 2).click()
    expect(send).to_be_enabled()
    expect(page.locator("#rank-status")).to_have_text("")  # the refusal is gone with the new choice
    expect(page.locator("#rank-todo")).to_contain_text("Each rank is used once")
    pngs = shown_pngs(page, 3)
    page.screenshot(path=str(SHOTS / "prompt-rank.png"), full_page=True)
    assert_blind(env, page)

    send.click()
    expect(page.locator("#rank-status")).to_contain_text("ranks saved (1 of 3 groups done)")
    expect(page.locator("#rank-progress")).to_contain_text("Group 2 of 3")
    expect(send).to_be_disabled()  # the next group starts unset again
    assert page.locator("#rank-task input[type=radio]:checked").count() == 0
    # Stored against the images shown in each slot: slot 1 got rank 1, slot 2 rank 2, slot 3 rank 3.
    assert sorted(stored(env), key=lambda r: r[1]) == [(pngs[0], 1), (pngs[1], 2), (pngs[2], 3)]
    assert_blind(env, page)
    assert page.get_by_text("currently busy").count() == 0
    page.close()
