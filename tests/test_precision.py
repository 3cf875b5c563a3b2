"""The CPU fast path: dtype detection and choice, bfloat16 images against float32,
traced U-Net graphs, the prompt-embedding cache, the dtype in recipes."""

import json

import numpy as np
import pytest
import torch
from test_adapters_textual_inversion import sdwebui_pt, vectors

from histolab import precision
from histolab.adapters.runtime import AdapterRuntime
from histolab.cli.generate import recipe_dtype
from histolab.embedded.random_init import random_base
from histolab.errors import InvalidRequest
from histolab.generation import AdapterSpec, GenerationRequest, generate, request_from_recipe
from histolab.pipeline import optimize_for_inference, resolve_dtype
from histolab.recipe import read_recipe, save_png

FLAGS = "fpu vme de pse tsc msr pae mce cx8 apic sep avx2 avx512f avx512bw"


def cpuinfo(tmp_path, extra: str):
    p = tmp_path / "cpuinfo"
    p.write_text(f"processor\t: 0\nflags\t\t: {FLAGS} {extra}\n\nprocessor\t: 1\nflags\t\t: {FLAGS} {extra}\n")
    return p


def req(**kw):
    base = dict(prompt="an h&e stained histology image of skin", steps=3, guidance_scale=3.0, seed=11)
    return GenerationRequest(**{**base, **kw})


def px(images):
    return np.stack([np.asarray(g.image).astype(np.int16) for g in images])


@pytest.fixture(scope="module")
def bf16_model():
    """The tiny model's weights in bfloat16, on the fast path (traced U-Net)."""
    return optimize_for_inference(random_base("tiny", seed=0, dtype=torch.bfloat16))


# ------------------------------------------------------------------ choice


@pytest.mark.parametrize(("extra", "flag"), [("avx512_bf16", "avx512_bf16"), ("amx_bf16 avx512_bf16", "amx_bf16")])
def test_detector_names_the_flag_found(tmp_path, extra, flag):
    found = precision.detect_cpu_bf16(cpuinfo(tmp_path, extra))
    assert found.supported and found.flag == flag
    assert flag in found.describe()


def test_detector_without_the_flags_or_cpuinfo(tmp_path):
    assert not precision.detect_cpu_bf16(cpuinfo(tmp_path, "avx512_vnni")).supported
    missing = precision.detect_cpu_bf16(tmp_path / "absent")
    assert not missing.supported and "unreadable" in missing.source


def test_auto_is_bfloat16_on_cpu_only_when_the_flag_is_present(monkeypatch):
    for extra, want in (("avx512_bf16", torch.bfloat16), ("", torch.float32)):
        found = precision.CpuBf16("avx512_bf16" if extra else "", "test")
        monkeypatch.setattr(precision, "detect_cpu_bf16", lambda found=found: found)
        assert resolve_dtype("auto", "cpu") is want  # histolab.pipeline's entry, as the CLI and app call it
        assert resolve_dtype("float32", "cpu") is torch.float32  # an explicit choice stays
    with pytest.raises(InvalidRequest, match="dtype must be one of"):
        resolve_dtype("half", "cpu")


def test_only_a_bfloat16_cpu_model_is_traced(tiny_model, bf16_model):
    assert bf16_model.optimizations["trace"] and bf16_model.traced_unet is not None
    f32 = random_base("tiny", seed=0)
    optimize_for_inference(f32)
    assert not f32.optimizations["trace"] and f32.traced_unet is None  # float32 keeps the eager path


# ------------------------------------------------------------------ images


def test_bfloat16_images_differ_from_float32_by_rounding_only(tiny_model, bf16_model):
    a = px(generate(tiny_model, req(batch_size=2)))
    b = px(generate(bf16_model, req(batch_size=2)))
    diff = np.abs(a - b)
    assert diff.mean() < 3.0, f"mean |diff| {diff.mean():.2f} levels"  # rounding, not another image
    other_seed = px(generate(tiny_model, req(batch_size=2, seed=99)))
    assert diff.mean() * 5 < np.abs(a - other_seed).mean()


def test_traced_graph_gives_the_eager_bits_and_is_batch_independent(bf16_model):
    eager = random_base("tiny", seed=0, dtype=torch.bfloat16)
    optimize_for_inference(eager, trace=False)
    batch = generate(bf16_model, req(batch_size=3))
    assert np.array_equal(px(batch), px(generate(eager, req(batch_size=3))))
    alone = generate(bf16_model, req(batch_size=1, seed=13))
    assert np.array_equal(px(alone)[0], px(batch)[2])
    assert bf16_model.traced_unet.traces >= 2  # one graph per batch shape


def test_adapters_run_the_eager_unet_on_the_fast_path(bf16_model, tmp_path):
    f = sdwebui_pt(tmp_path / "glandemb.pt", vectors(2, seed=1) * 3)
    eager = random_base("tiny", seed=0, dtype=torch.bfloat16)
    optimize_for_inference(eager, trace=False)
    r = req(prompt="glandemb colon tissue", adapters=(AdapterSpec(str(f), 1.0),))
    before = bf16_model.traced_unet.traces
    assert np.array_equal(px(generate(bf16_model, r)), px(generate(eager, r)))
    assert bf16_model.traced_unet.traces == before


# ------------------------------------------------------------------ prompt cache


def test_prompt_cache_hit_is_the_same_embedding():
    model = random_base("tiny", seed=0)
    a = model.prompt_embedding("colon tissue")
    b = model.prompt_embedding("colon tissue")
    assert b is a and model.prompt_cache.hits == 1
    assert torch.equal(a, model.encode_prompt(["colon tissue"]))


def test_prompt_cache_sees_adapters_that_change_the_text_encoder(tmp_path):
    model = random_base("tiny", seed=0)
    f = sdwebui_pt(tmp_path / "glandemb.pt", vectors(2, seed=1) * 3)
    prompt = "glandemb colon tissue"
    base = model.prompt_embedding(prompt)
    with AdapterRuntime().applied(model, [AdapterSpec(str(f), 1.0)]):
        with_ti = model.prompt_embedding(prompt)
        assert torch.equal(with_ti, model.encode_prompt([prompt]))
        assert not torch.equal(with_ti, base)
    assert torch.equal(model.prompt_embedding(prompt), base)


def test_prompt_cache_sees_weight_edits_made_outside_the_adapters():
    model = random_base("tiny", seed=0)
    base = model.prompt_embedding("colon tissue")
    w = model.text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        w.mul_(1.5)
    try:
        edited = model.prompt_embedding("colon tissue")
        assert not torch.equal(edited, base)
        assert torch.equal(edited, model.encode_prompt(["colon tissue"]))
    finally:
        with torch.no_grad():
            w.div_(1.5)


def test_generation_with_the_cache_gives_the_same_pixels(tiny_model):
    model = random_base("tiny", seed=0)
    first = px(generate(model, req(negative_prompt="blurry")))
    again = px(generate(model, req(negative_prompt="blurry")))
    assert model.prompt_cache.hits == 2  # prompt and negative prompt
    assert np.array_equal(first, again)
    assert np.array_equal(first, px(generate(tiny_model, req(negative_prompt="blurry"))))


# ------------------------------------------------------------------ recipes


def test_recipe_records_the_dtype_and_a_rerun_reproduces_exactly(bf16_model, tiny_model, tmp_path):
    out = generate(bf16_model, req(batch_size=2, scheduler="euler_a"))[1]
    assert out.recipe.dtype == "bfloat16"
    assert generate(tiny_model, req())[0].recipe.dtype == "float32"
    recipe = read_recipe(save_png(out.image, out.recipe, tmp_path / "x.png"))
    assert recipe == out.recipe
    assert recipe_dtype("auto", recipe) == "bfloat16"  # the CLI loads the recipe's dtype
    assert recipe_dtype("float32", recipe) == "float32"  # unless told otherwise
    again = generate(bf16_model, request_from_recipe(recipe))[0]
    assert np.array_equal(np.asarray(again.image), np.asarray(out.image))


def test_recipes_from_before_the_dtype_field_still_read(tiny_model):
    from histolab.recipe import Recipe

    d = generate(tiny_model, req())[0].recipe.to_dict()
    del d["dtype"]
    old = Recipe.from_dict(d)
    assert old.dtype == "" and recipe_dtype("auto", old) == "auto"


def test_app_rerun_loads_the_recipe_dtype_and_reproduces_exactly(bf16_model, tiny_model, tmp_path):
    """The app's model is float32 here; a bfloat16 PNG re-runs in bfloat16 (a second model, loaded once)
    and a float32 PNG on the app's own model: both give the same pixels back."""
    from histolab.config import Paths
    from histolab.recipe import JSON_KEY, Recipe
    from histolab.ui.generate import rerun_recipe
    from histolab.ui.services import Services
    from histolab.ui.settings import AppSettings

    calls = []

    def loader(source, dtype=None):
        calls.append(dtype)
        return {None: tiny_model, "bfloat16": bf16_model}[dtype]

    paths = Paths.from_env({"HISTOLAB_DATA_DIR": str(tmp_path)})
    services = Services(AppSettings(local_admin=False), paths, model_loader=loader)
    for model, name in ((bf16_model, "bf16.png"), (tiny_model, "f32.png"), (bf16_model, "bf16.png")):
        made = generate(model, req(steps=2))[0]
        png = save_png(made.image, made.recipe, tmp_path / name)
        out = rerun_recipe(services, {}, str(png), None)
        (image, _), note = out["gallery"][0], out["note"]
        assert np.array_equal(np.asarray(image.convert("RGB")), np.asarray(made.image)), note
        assert "rounding" not in note and Recipe.from_dict(json.loads(image.info[JSON_KEY])).dtype == made.recipe.dtype
    assert calls == [None, "bfloat16"]  # the app's model, then the bfloat16 one, kept for the third re-run
