"""The Generate tab in a real browser (Debian's chromium driven by Playwright), on the embedded default base:
step progress and a live preview while it runs, Ctrl+Enter, the prompt's token counter, the seed's range,
a textual inversion's tokens (shown, inserted with a click, warned about when missing), reference mode's
set-up, the real class beside, and "Send to Compare" into a grid whose labels stay whole.

Every wait is on a DOM state. To see a run part-way, the U-Net is held at the start of its second step
(a forward pre-hook the test arms and releases), so "step 1 of 2" is on the page for as long as the test
needs it, on any machine. Screenshots: test-artifacts/browser/generate-progress.png and compare-grid.png.
"""

from __future__ import annotations

import re
import shutil
import threading
from pathlib import Path

import pytest
from app_testkit import make_services
from browser_kit import SHOTS, WAIT, browsing, expect, field, tab
from waiting import GENEROUS

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parent.parent
TI = "embedded-textual-inversion"
PROJECTOR = "embedded-projector"


class Gate:
    """Holds the U-Net at the start of step ``at`` (1-based) while armed, until released."""

    def __init__(self, at: int = 2):
        self.at, self.calls, self.armed = at, 0, False
        self.reached, self.release = threading.Event(), threading.Event()

    def arm(self) -> None:
        self.calls, self.armed = 0, True
        self.reached.clear()
        self.release.clear()

    def __call__(self, module, args):
        if not self.armed:
            return
        self.calls += 1
        if self.calls == self.at:
            self.reached.set()
            assert self.release.wait(GENEROUS), "the test never released the U-Net"
            self.armed = False


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from histolab.pipeline import load_base

    model = load_base("embedded")  # the embedded default, as a first visitor gets it
    gate = Gate()
    handle = model.unet.register_forward_pre_hook(gate)
    root = tmp_path_factory.mktemp("browser-generate")
    services = make_services(root, model, max_steps=40)
    for name in (TI, PROJECTOR):
        shutil.copytree(ROOT / "checkpoints" / name, services.paths.checkpoints / name)
    try:
        with browsing(services) as (url, browser):
            yield {"url": url, "browser": browser, "gate": gate, "services": services}
    finally:
        gate.release.set()
        handle.remove()


@pytest.fixture()
def page(env):
    page = env["browser"].new_page(viewport={"width": 1400, "height": 1100})
    page.goto(env["url"])
    page.locator("#generate-button").wait_for()
    expect(page.locator("#prompt-tokens")).to_contain_text("/75 tokens")  # the page's load events have run
    yield page
    page.close()


def set_number(page, elem_id: str, value) -> None:
    """A slider's or number box's value, typed as a user does (then the box loses the focus)."""
    box = page.locator(f"#{elem_id} input[type=number]").first
    box.fill(str(value))
    box.press("Tab")
    expect(box).to_have_value(str(value))


def choose(page, elem_id: str, option: str) -> None:
    page.locator(f"#{elem_id} input").first.click()
    page.get_by_role("option", name=option, exact=True).click()
    expect(page.locator(f"#{elem_id} input").first).to_have_value(option)


def captions(page) -> list[str]:
    return page.locator("#generated-gallery .caption-label, #generated-gallery figcaption").all_inner_texts()


def wait_for_result(page, seed: int) -> None:
    """The final gallery (its first image captioned with the run's seed), and the run finished."""
    expect(page.locator("#generated-gallery").get_by_text(f"seed {seed}", exact=True).first).to_be_visible()
    expect(page.locator("#generate-button")).to_be_enabled()


def test_progress_with_eta_and_a_live_preview_while_generating(env, page):
    set_number(page, "generate-steps", 2)
    set_number(page, "generate-seed", 11)
    page.locator("#live-preview input").check()
    gate = env["gate"]
    gate.arm()
    page.locator("#generate-button").click()
    # Held at the start of step 2: step 1's progress (with its ETA) and its preview are on the page.
    progress = page.get_by_text(re.compile(r"step 1 of 2, (about \d+ s|under 1 s) left")).first
    expect(progress).to_be_visible()
    expect(page.locator("#generated-gallery").get_by_text("preview: step 1 of 2").first).to_be_visible()
    assert gate.reached.is_set() and not gate.release.is_set()
    page.screenshot(path=str(SHOTS / "generate-progress.png"), full_page=True)
    gate.release.set()
    wait_for_result(page, 11)
    expect(page.locator("#generated-gallery").get_by_text("preview: step 1 of 2")).to_have_count(0)
    expect(page.get_by_text(re.compile(r"step \d of 2"))).to_have_count(0)  # the progress is gone


def test_ctrl_enter_in_the_prompt_generates(page):
    set_number(page, "generate-steps", 1)
    set_number(page, "generate-seed", 21)
    prompt = field(page, "prompt")
    prompt.click()
    page.wait_for_function("() => window.__histolabCtrlEnter === true")  # installed by the page's load
    prompt.press("Control+Enter")
    wait_for_result(page, 21)
    assert field(page, "prompt").input_value() == "an h&e stained histology image of skin"  # no newline typed


def test_a_seed_out_of_range_is_named_and_the_next_good_run_clears_the_error(page):
    set_number(page, "generate-steps", 1)
    set_number(page, "generate-seed", 4294967296)
    page.locator("#generate-button").click()
    toast = page.locator(".toast-body.error")
    expect(toast).to_contain_text(
        "Seed 4294967296 is out of range: use a whole number from 0 to 4294967295 (2^32-1), or -1 for a random seed."
    )
    set_number(page, "generate-seed", 4294967295)  # the top of the range is fine
    page.locator("#generate-button").click()
    wait_for_result(page, 4294967295)
    expect(page.locator(".toast-body.error")).to_have_count(0)


def test_a_typed_value_beyond_a_sliders_range_is_never_clamped_silently(page):
    box = page.locator("#generate-steps input[type=number]").first
    box.fill("99")
    box.press("Tab")
    expect(box).to_have_value("40")  # Gradio's slider keeps to its range...
    note = page.locator("#generate-steps .histolab-clamp-note")
    expect(note).to_have_text("Steps: 99 is above the maximum 40, so 40 is used.")  # ...and the page says so
    set_number(page, "generate-steps", 3)
    expect(note).to_have_count(0)


def test_the_token_counter_warns_when_clip_will_cut_the_prompt(page):
    counter = page.locator("#prompt-tokens")
    expect(counter).to_have_text(re.compile(r"^\s*\d+/75 tokens\s*$"))
    field(page, "prompt").fill(" ".join(["skin tissue"] * 40) + " with brown glands")
    expect(counter).to_contain_text("/75 tokens: CLIP reads only the first 75, so the last")
    expect(counter).to_contain_text("glands")  # the words that are cut, named
    field(page, "prompt").fill("an h&e stained histology image of a tumour")
    expect(counter).to_have_text(re.compile(r"^\s*\d+/75 tokens\s*$"))


def test_textual_inversion_tokens_are_shown_inserted_and_warned_about(page):
    set_number(page, "generate-steps", 1)
    set_number(page, "generate-seed", 31)
    expect(page.locator("#trigger-tokens")).to_be_hidden()  # no adapter with tokens chosen yet
    choose(page, "adapter-1", TI)
    expect(page.locator("#adapter-1")).to_contain_text("textual inversion tokens: <colon_ihc> <skin_he> <tumour_he>")
    tokens = page.locator("#trigger-tokens")
    expect(tokens.get_by_text("<skin_he>", exact=True)).to_be_visible()
    page.locator("#generate-button").click()  # the default prompt has none of its tokens
    warning = "Adapter 1 (embedded-textual-inversion) is a textual inversion, but none of its tokens"
    expect(page.locator(".toast-body.warning").first).to_contain_text(warning)
    wait_for_result(page, 31)
    expect(page.locator("#generate-status")).to_contain_text(warning)
    tokens.get_by_text("<skin_he>", exact=True).click()
    expect(field(page, "prompt")).to_have_value("an h&e stained histology image of skin, <skin_he>")
    set_number(page, "generate-seed", 32)
    page.locator("#generate-button").click()
    wait_for_result(page, 32)
    expect(page.locator("#generate-status")).not_to_contain_text("none of its tokens")  # the warning went away


def test_choosing_a_real_class_never_overwrites_the_prompt(page):
    field(page, "prompt").fill("my own words about skin")
    choose(page, "real-class", "tumour_he")
    page.locator("#use-class-prompt").wait_for()
    expect(field(page, "prompt")).to_have_value("my own words about skin")
    page.locator("#use-class-prompt").click()
    expect(field(page, "prompt")).to_have_value("an h&e stained histology image of a tumour")


def test_reference_mode_chooses_the_projector_applies_its_settings_and_shows_the_reference(page, tmp_path):
    from histolab.data.bundled import crops, load_crop

    page.locator("#generate-mode").get_by_text("reference patch").click()
    expect(page.locator("#adapter-1 input").first).to_have_value(PROJECTOR)
    expect(page.locator("#mode-note")).to_contain_text(
        f"{PROJECTOR} chosen in Adapter 1 (the only projector here). Recommended settings of {PROJECTOR} "
        "applied: guidance 1.3, sampler ddpm, 30 steps."
    )
    expect(page.locator("#generate-steps input[type=number]").first).to_have_value("30")
    expect(page.locator("#generate-guidance input[type=number]").first).to_have_value("1.3")
    expect(field(page, "prompt")).to_be_disabled()
    expect(field(page, "negative-prompt")).to_be_disabled()
    patch = tmp_path / "reference.png"
    load_crop(crops("test")[0]).save(patch)
    page.locator("#reference input[type=file]").set_input_files(str(patch))
    set_number(page, "generate-steps", 2)
    set_number(page, "generate-seed", 41)
    page.locator("#generate-button").click()
    wait_for_result(page, 41)
    expect(page.locator("#beside-gallery").get_by_text("reference patch", exact=True)).to_be_visible()
    page.locator("#generate-mode").get_by_text("prompt", exact=True).click()
    expect(field(page, "prompt")).to_be_enabled()
    expect(page.locator("#mode-note")).to_contain_text(f"Prompt mode: {PROJECTOR} (Adapter 1) stays chosen")


def test_send_to_compare_starts_from_the_generate_settings_and_the_grid_labels_stay_whole(page):
    tumour = "an h&e stained histology image of a tumour"
    skin = "an h&e stained histology image of skin"
    field(page, "prompt").fill(tumour)
    set_number(page, "generate-steps", 2)
    set_number(page, "generate-seed", 7)
    page.locator("#send-to-compare").click()
    expect(page.get_by_role("tab", name="Compare")).to_have_attribute("aria-selected", "true")
    expect(field(page, "compare-prompt")).to_have_value(tumour)
    expect(page.locator("#compare-seed input").first).to_have_value("7")
    expect(page.locator("#compare-status")).to_contain_text("Settings from the Generate tab.")
    tab(page, "X/Y plot")
    choose(page, "xy-x-axis", "prompt")
    field(page, "xy-x-values").fill(f"{skin} | {tumour}")
    page.locator("#xy-plot-button").click()
    page.locator("#compare-grid img").wait_for(timeout=WAIT)
    grid = page.locator("#compare-grid img").first
    expect(grid).to_have_attribute("src", re.compile(r"."))
    page.screenshot(path=str(SHOTS / "compare-grid.png"), full_page=True)
