"""The Generate and Compare forms without a browser: every validation message and warning, the token
counter, trigger tokens, reference mode's setup, step progress with an ETA, live previews, "Send to
Compare", and grid labels that are wrapped, never cut."""

from __future__ import annotations

import re
import uuid

import numpy as np
import pytest
import torch
from adapters_testkit import SeededEncoder
from app_testkit import make_services
from PIL import Image, ImageDraw

from histolab.adapters import textual_inversion as ti
from histolab.adapters.manifest import Manifest
from histolab.adapters.recommended import REFERENCE_DEFAULTS
from histolab.errors import InvalidRequest
from histolab.ui import formcheck as fc

# ------------------------------------------------------------------ seeds


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (
            2**32,
            "Seed 4294967296 is out of range: use a whole number from 0 to 4294967295 (2^32-1), or -1 for a random",
        ),
        (10**20, "Seed 100000000000000000000 is out of range: use a whole number from 0 to 4294967295"),
        (-5, "Seed -5 is out of range: use a whole number from 0 to 4294967295 (2^32-1), or -1 for a random seed."),
        (2.5, "`Seed` must be a whole number but is 2.5"),
        ("many", "`Seed` must be a whole number but is 'many'"),
        (None, "`Seed` is empty"),
    ],
)
def test_seed_messages_name_the_value_and_the_range(value, message):
    with pytest.raises(InvalidRequest, match=re.escape(message)):
        fc.check_seed(value)


def test_seeds_in_range_are_kept_and_minus_one_draws_one():
    assert fc.check_seed(0) == 0 and fc.check_seed(4294967295.0) == 2**32 - 1 and fc.check_seed("7") == 7
    drawn = {fc.check_seed(-1) for _ in range(20)}
    assert all(0 <= s <= fc.SEED_MAX for s in drawn) and len(drawn) > 1
    with pytest.raises(
        InvalidRequest, match=r"Seed -1 is out of range: use a whole number from 0 to 4294967295 \(2\^32-1\)\."
    ):
        fc.check_seed(-1, allow_random=False)  # Compare: every row must share the seed


# ------------------------------------------------------------------ progress


def test_step_progress_reports_fraction_and_an_eta():
    t = [100.0]
    seen = []
    prog = fc.StepProgress(lambda f, text: seen.append((f, text)), clock=lambda: t[0])
    t[0] += 2.0
    prog(1, 5)
    t[0] += 2.0
    prog(2, 5)
    t[0] += 6.0
    prog(5, 5)
    assert seen == [(0.2, "step 1 of 5, about 8 s left"), (0.4, "step 2 of 5, about 6 s left"), (1.0, "step 5 of 5")]
    assert fc.eta_text(3, 4, 0.3) == "step 3 of 4, under 1 s left"
    assert fc.eta_text(0, 4, 0.0) == "step 0 of 4"


# ------------------------------------------------------------------ tokens


@pytest.fixture(scope="module")
def tok():
    return fc.tokenizer_for("embedded")  # the project's own vocabulary (no model loaded)


def test_token_counter_counts_as_the_text_encoder_reads(tok):
    got = fc.count_tokens(tok, "an h&e stained histology image of skin")
    assert got.limit == 75 and not got.over
    assert got.count == len(tok("an h&e stained histology image of skin")["input_ids"]) - 2
    assert got.text() == f"{got.count}/75 tokens"
    assert fc.count_tokens(tok, "").text() == "0/75 tokens"


def test_token_counter_warns_past_75_and_names_the_cut_words(tok):
    words = " ".join(["skin"] * 74 + ["glands", "dermis", "epidermis"])
    got = fc.count_tokens(tok, words)
    n = len(tok(words, add_special_tokens=False)["input_ids"])
    assert got.over and got.count == n > 75
    assert got.text().startswith(f"⚠ {n}/75 tokens: CLIP reads only the first 75, so the last {n - 75} are cut (from “")
    assert "epidermis" in got.cut and "Shorten the prompt." in got.text()


def test_a_textual_inversion_token_counts_as_its_vectors(tok):
    plain = fc.count_tokens(tok, "skin, <skin_he>").count
    expanded = fc.count_tokens(tok, "skin, <skin_he>", {"<skin_he>": 2}).count
    assert expanded == fc.count_tokens(tok, "skin,").count + 2 != plain
    assert (
        fc.count_tokens(tok, "<skin_he> and <skin_he>", {"<skin_he>": 3}).count == fc.count_tokens(tok, "and").count + 6
    )


# ------------------------------------------------------------------ trigger tokens


def test_missing_textual_inversion_tokens_warn_in_the_pages_words():
    chosen = [
        fc.Chosen(1, "lora-a", "lora", ()),
        fc.Chosen(2, "ti-skin", "textual_inversion", ("<skin_he>", "<tumour_he>")),
    ]
    assert fc.missing_trigger_warnings("an image of skin", "", chosen) == [
        "Adapter 2 (ti-skin) is a textual inversion, but none of its tokens (<skin_he>, <tumour_he>) is in the "
        "prompt, so it changes nothing. Click a token under the adapters to add it."
    ]
    assert fc.missing_trigger_warnings("skin, <tumour_he>", "", chosen) == []
    assert fc.missing_trigger_warnings("skin", "<skin_he>", chosen) == []  # a negative embedding is used too
    assert fc.missing_trigger_warnings("skin <skin_he>s", "", chosen)  # part of another word is not the token
    off = [fc.Chosen(2, "ti-skin", "textual_inversion", ("<skin_he>",), strength=0.0)]
    assert fc.missing_trigger_warnings("skin", "", off) == []  # strength 0 applies nothing anyway


def test_insert_token_adds_once_at_the_end():
    assert fc.insert_token("an image of skin", "<skin_he>") == "an image of skin, <skin_he>"
    assert fc.insert_token("an image of skin, ", "<skin_he>") == "an image of skin, <skin_he>"
    assert fc.insert_token("", "<skin_he>") == "<skin_he>"
    assert fc.insert_token("skin <skin_he>", "<skin_he>") == "skin <skin_he>"


# ------------------------------------------------------------------ reference mode


def test_reference_mode_chooses_the_only_projector_and_applies_its_settings():
    rec = {"/ck/embedded-projector": dict(REFERENCE_DEFAULTS)}
    setup = fc.reference_setup(
        ["lora-a", "(none)", "(none)"], [("embedded-projector", "/ck/embedded-projector")], 150, rec.get
    )
    assert setup.slots == ["lora-a", "embedded-projector", "(none)"]
    assert setup.settings == {"guidance": 1.3, "scheduler": "ddpm", "steps": 30}
    assert setup.note == (
        "embedded-projector chosen in Adapter 2 (the only projector here). Recommended settings of "
        "embedded-projector applied: guidance 1.3, sampler ddpm, 30 steps. The prompt boxes are not used in "
        "reference mode."
    )
    low = fc.reference_setup(["(none)"], [("p", "/p")], 10, lambda _p: dict(REFERENCE_DEFAULTS))
    assert low.settings["steps"] == 10  # never silently: the note says what was used instead
    assert "10 steps (it recommends 30; this app allows 10)" in low.note


def test_reference_mode_with_two_projectors_or_none_says_what_to_choose():
    two = [("proj-a", "/a"), ("proj-b", "/b")]
    setup = fc.reference_setup(["(none)", "(none)"], two, 150, lambda _p: {})
    assert setup.slots == ["(none)", "(none)"] and setup.settings == {}
    assert setup.note == "reference mode needs a projector adapter: choose one of proj-a, proj-b in Adapter 1."
    assert fc.reference_problem(["lora-a", "(none)"], [("embedded-projector", "/p")]) == (
        "reference mode needs a projector adapter: choose embedded-projector in Adapter 2."
    )
    assert fc.reference_problem(["embedded-projector"], [("embedded-projector", "/p")]) == ""
    assert fc.reference_problem(["(none)"], []).startswith(
        "reference mode needs a foundation-embedding adapter (a projector), and there is none in checkpoints/ here"
    )


# ------------------------------------------------------------------ the app's handlers


@pytest.fixture(scope="module")
def svc(tiny_model, tmp_path_factory):
    from test_adapters_projector import make_projector

    root = tmp_path_factory.mktemp("genval")
    services = make_services(root, tiny_model)
    ck = services.paths.checkpoints
    vecs = torch.randn(2, 32, generator=torch.Generator().manual_seed(0))
    ti.save(ck / "ti-skin", "<skin_he>", vecs, Manifest(kind="textual_inversion", name="ti-skin"))
    encoder = SeededEncoder(name=f"seeded-{uuid.uuid4().hex[:8]}", dim=48)
    from histolab.adapters.runtime import default_runtime

    default_runtime().register_encoder(encoder)
    make_projector(tiny_model, ck / "proj-one", encoder)
    return services


def form(**kw):
    from histolab.ui.generate import Form

    a = dict(
        base="embedded",
        mode="prompt",
        prompt="an h&e stained histology image of skin",
        negative="",
        reference=None,
        adapters=[("(none)", 1.0)] * 3,
        steps=2,
        guidance=3.0,
        scheduler="ddim",
        seed=5,
        batch=1,
    )
    a.update(kw)
    return Form(**a)


def test_prepare_warns_for_a_textual_inversion_without_its_token(svc):
    from histolab.ui.generate import prepare

    prep = prepare(svc, form(adapters=[("(none)", 1.0), ("ti-skin", 1.0), ("(none)", 1.0)]))
    assert prep.warnings == [
        "Adapter 2 (ti-skin) is a textual inversion, but none of its tokens (<skin_he>) is in the prompt, so it "
        "changes nothing. Click a token under the adapters to add it."
    ]
    ok = prepare(svc, form(prompt="skin, <skin_he>", adapters=[("ti-skin", 1.0)]))
    assert ok.warnings == [] and ok.notes == []
    drawn = prepare(svc, form(seed=-1))
    assert drawn.notes == [f"seed -1 drew {drawn.request.seed} (image i: {drawn.request.seed} + i)"]


def test_reference_mode_errors_speak_the_pages_words(svc, tmp_path):
    from histolab.ui.generate import make_request

    patch = tmp_path / "patch.png"
    Image.new("RGB", (32, 32), (200, 120, 180)).save(patch)
    with pytest.raises(InvalidRequest, match=re.escape("the reference patch is empty")):
        make_request(svc, form(mode="reference patch"))
    with pytest.raises(InvalidRequest, match=re.escape("choose proj-one in Adapter 1.")):
        make_request(svc, form(mode="reference patch", reference=str(patch)))
    _, req = make_request(svc, form(mode="reference patch", reference=str(patch), adapters=[("proj-one", 1.0)]))
    assert req.mode == "reference"


def test_token_counter_and_trigger_list_of_the_chosen_adapters(svc):
    from histolab.ui.generate import token_counter, trigger_info, trigger_samples

    assert trigger_samples(svc, ["(none)", "ti-skin", "ti-skin"]) == [["<skin_he>"]]
    assert (
        trigger_info(svc, "ti-skin") == "textual inversion tokens: <skin_he> (click one below to add it to the prompt)"
    )
    assert trigger_info(svc, "(none)") == ""
    plain = token_counter(svc, "embedded", "skin <skin_he>", ["(none)"])
    with_ti = token_counter(svc, "embedded", "skin <skin_he>", ["ti-skin"])
    tok = fc.tokenizer_for("embedded")
    assert with_ti == f"{len(tok('skin', add_special_tokens=False)['input_ids']) + 2}/75 tokens" != plain


def test_the_class_prompt_is_a_button_of_its_own():
    from histolab.data.prompts import CLASS_PROMPTS
    from histolab.ui.generate import DEFAULT_PROMPT, class_prompt

    assert DEFAULT_PROMPT in CLASS_PROMPTS.values()  # the default prompt is one of the embedded default's classes
    assert class_prompt("tumour_he") == CLASS_PROMPTS["tumour_he"]
    with pytest.raises(InvalidRequest, match=re.escape("choose a class under 'Real patches of class' first")):
        class_prompt("(none)")


def test_stream_reports_eta_progress_previews_then_the_result(svc):
    from histolab.ui.common import new_session
    from histolab.ui.generate import generate_stream, prepare

    seen = []
    session = new_session()
    outs = list(
        generate_stream(
            svc, session, prepare(svc, form(steps=3, batch=2)), None, lambda f, desc: seen.append(desc), True
        )
    )
    assert [o["preview"][0][1] for o in outs[:-1]] == ["preview: step 1 of 3", "preview: step 2 of 3"]
    assert all(len(o["preview"]) == 2 for o in outs[:-1])
    assert [g[1] for g in outs[-1]["gallery"]] == ["seed 5", "seed 6"]
    assert [d.split(",")[0] for d in seen] == ["step 1 of 3", "step 2 of 3", "step 3 of 3"]
    assert "left" in seen[0] and session["cancel"] is None
    quiet = list(generate_stream(svc, new_session(), prepare(svc, form()), None, None, False))
    assert len(quiet) == 1 and "gallery" in quiet[0]


def test_leaving_the_stream_early_cancels_the_run(svc):
    from histolab.errors import Cancelled
    from histolab.ui.common import new_session
    from histolab.ui.generate import generate_stream, prepare

    session = new_session()
    stream = generate_stream(svc, session, prepare(svc, form(steps=6)), None, None, True)
    first = next(stream)
    assert first["preview"][0][1] == "preview: step 1 of 6"
    ev = session["cancel"]
    stream.close()  # the page went away
    assert ev.is_set()
    with pytest.raises(Cancelled):  # the same event stops a run at its next step
        from histolab.ui.generate import produce

        session2 = new_session()

        def progress(f, desc=""):
            session2["cancel"].set()

        produce(svc, session2, prepare(svc, form(steps=6)), None, progress)


# ------------------------------------------------------------------ previews


def test_the_vae_preview_of_the_last_latents_is_the_image(tiny_model):
    from histolab.generation import GenerationRequest, generate
    from histolab.preview import latent_rgb_map, preview_images

    kept = {}
    out = generate(
        tiny_model,
        GenerationRequest(prompt="skin", steps=2, batch_size=1, scheduler="ddim"),
        on_latents=lambda d, n, lat: kept.update({d: lat.clone()}),
    )
    assert sorted(kept) == [1, 2]
    pic = preview_images(tiny_model, kept[2], show_side=64)[0]
    assert pic.size == (64, 64)  # 32 px, shown twice as large with nearest neighbour
    final = np.asarray(out[0].image).astype(int)
    assert np.abs(np.asarray(pic)[::2, ::2].astype(int) - final).max() <= 1
    m = latent_rgb_map(tiny_model)
    assert tuple(m.shape) == (tiny_model.unet.config.in_channels + 1, 3) and latent_rgb_map(tiny_model) is m


def test_the_linear_preview_for_large_latents(tiny_model):
    from histolab.preview import preview_images

    lat = torch.zeros(2, tiny_model.unet.config.in_channels, 20, 20)
    pics = preview_images(tiny_model, lat, show_side=128)
    assert [p.size for p in pics] == [(120, 120), (120, 120)]  # 20 px latents x6, nearest neighbour


# ------------------------------------------------------------------ Compare


def test_send_to_compare_takes_the_form_and_says_what_it_changed():
    from histolab.ui.compare import from_generate

    values = ["embedded", "prompt", "skin", "blurry", None, "lora-a", 0.7, "(none)", 1.0, 12, 4.5, "ddim", 9, 3]
    got = from_generate(values, 2)
    assert got == {
        "base": "embedded",
        "prompt": "skin",
        "negative": "blurry",
        "steps": 12,
        "guidance": 4.5,
        "scheduler": "ddim",
        "seed": 9,
        "adapter": "lora-a",
        "strength": 0.7,
        "chosen": ["lora-a"],
        "n_seeds": 3,
        "note": "Settings from the Generate tab.",
    }
    ref = ["embedded", "reference patch", "", "", "p.png", "proj", 1.0, "lora-a", 0.5, 30, 1.3, "ddpm", -1, 12]
    got = from_generate(ref, 2, {"proj"})
    assert got["chosen"] == ["lora-a"] and 0 <= got["seed"] <= fc.SEED_MAX and got["n_seeds"] == 8
    assert got["note"] == (
        "Settings from the Generate tab. Compare works from the prompt: the reference patch and proj are left out. "
        f"Generate's seed is -1 (random); Compare uses seed {got['seed']}, the same for every row. "
        "Generate makes 12 images; Compare shows 8 seeds (columns) at most, so 8."
    )
    with pytest.raises(InvalidRequest, match="Seed 4294967296 is out of range"):
        from_generate([*values[:-2], 2**32, 1], 2)


def test_grid_labels_are_wrapped_never_cut():
    from histolab.ui.images import CELL_MIN, HEADER_H, LABEL_W, grid

    prompt = "an immunohistochemistry image of colon glands with brown dab staining"
    im = Image.new("RGB", (32, 32), (255, 0, 0))
    g = grid([[im, im]], [prompt], ["guidance 3", prompt], title="X: prompt, Y: adapter; seed 0")
    assert g.width == LABEL_W + 2 * CELL_MIN and g.height > HEADER_H * 2 + CELL_MIN  # the header grew
    from histolab.ui.images import _label_lines

    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    lines, _font, _lh = _label_lines([prompt], CELL_MIN - 8, 4, draw)
    assert " ".join(lines[0]) == prompt and all("…" not in x for x in lines[0])
    long_word = "x" * 80
    lines, font, _ = _label_lines([long_word], 60, 3, draw)
    assert "".join(lines[0]) == long_word and all(draw.textlength(x, font=font) <= 60 for x in lines[0])


def test_an_xy_seed_axis_beyond_the_range_names_it():
    from histolab.ui.compare import parse_axis

    with pytest.raises(
        InvalidRequest, match=re.escape("`seed value` must be at most 4294967295 here but is 4294967296")
    ):
        parse_axis("seed", "1, 4294967296", None)
    assert parse_axis("seed", "0, 4294967295", None) == [0, 4294967295]


def test_a_streaming_handlers_errors_become_gradio_errors_while_it_is_iterated():
    import inspect

    import gradio as gr

    from histolab.ui.common import ui_errors

    @ui_errors
    def handler():
        yield "preview"
        raise InvalidRequest("Seed 5 is out of range")

    assert inspect.isgeneratorfunction(handler)  # Gradio streams it only if it still looks like a generator
    it = handler()
    assert next(it) == "preview"
    with pytest.raises(gr.Error, match="Seed 5 is out of range"):
        next(it)
