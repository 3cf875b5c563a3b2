import threading

import numpy as np
import pytest

from histolab.errors import Cancelled, InvalidRequest
from histolab.generation import GenerationRequest, generate, request_from_recipe
from histolab.recipe import read_recipe, save_png
from histolab.schedulers import SCHEDULER_NAMES


def _px(img):
    return np.asarray(img).astype(np.int16)


def req(**kw):
    base = dict(prompt="an h&e stained histology image of skin", steps=2, guidance_scale=3.0, seed=11)
    base.update(kw)
    return GenerationRequest(**base)


def test_same_recipe_same_pixels(tiny_model):
    a = generate(tiny_model, req(batch_size=2))
    b = generate(tiny_model, req(batch_size=2))
    for x, y in zip(a, b, strict=True):
        assert np.array_equal(_px(x.image), _px(y.image))
    assert not np.array_equal(_px(a[0].image), _px(a[1].image)), "two seeds gave the same image"


@pytest.mark.parametrize("scheduler", SCHEDULER_NAMES)
def test_seed_is_independent_of_batch_size(tiny_model, scheduler):
    batch = generate(tiny_model, req(batch_size=3, scheduler=scheduler))
    alone = generate(tiny_model, req(batch_size=1, seed=13, scheduler=scheduler))
    assert batch[2].recipe.seed == 13 == alone[0].recipe.seed
    assert np.array_equal(_px(batch[2].image), _px(alone[0].image))


def test_png_recipe_round_trip_reproduces_pixels(tiny_model, tmp_path):
    out = generate(tiny_model, req(batch_size=2, negative_prompt="blurry", scheduler="euler_a"))[1]
    path = save_png(out.image, out.recipe, tmp_path / "x.png")
    recipe = read_recipe(path)
    assert recipe == out.recipe
    again = generate(tiny_model, request_from_recipe(recipe))[0]
    assert np.array_equal(_px(again.image), _px(out.image))


def test_parameters_text_is_sdwebui_style(tiny_model):
    r = generate(tiny_model, req(negative_prompt="blurry"))[0].recipe
    text = r.to_parameters()
    assert text.splitlines()[0] == r.prompt
    assert text.splitlines()[1] == "Negative prompt: blurry"
    assert "Steps: 2, Sampler: DPM++ 2M Karras, CFG scale: 3.0, Seed: 11, Size: 32x32" in text


def test_guidance_one_is_the_conditional_branch(tiny_model):
    a = generate(tiny_model, req(guidance_scale=1.0, negative_prompt="anything"))[0]
    b = generate(tiny_model, req(guidance_scale=1.0, negative_prompt="something else"))[0]
    assert np.array_equal(_px(a.image), _px(b.image))  # the negative prompt is unused


def test_prompt_changes_output(tiny_model):
    a = generate(tiny_model, req(prompt="a photo of a cat"))[0]
    b = generate(tiny_model, req(prompt="colon tissue, dab immunostain"))[0]
    assert not np.array_equal(_px(a.image), _px(b.image))


@pytest.mark.parametrize(
    "kw, fragment",
    [
        (dict(guidance_scale=-1.0), "`guidance_scale` must be >= 0 but is -1.0"),
        (dict(steps=0), "`steps` must be an integer from 1 to 1000 but is 0"),
        (dict(width=34), "divisible by 4 but are 32 and 34"),
        (dict(scheduler="k_lms_fancy"), "unknown scheduler 'k_lms_fancy'"),
        (dict(batch_size=0), "`batch_size` must be from 1 to 64 but is 0"),
        (dict(mode="reference"), "needs a reference patch"),
        (dict(seed=-3), "`seed` must be an integer"),
    ],
)
def test_bad_requests_name_the_value(tiny_model, kw, fragment):
    with pytest.raises(InvalidRequest) as exc:
        generate(tiny_model, req(**kw))
    assert fragment in str(exc.value)


def test_progress_and_cancel(tiny_model):
    seen = []
    generate(tiny_model, req(steps=3), progress=lambda i, n: seen.append((i, n)))
    assert seen == [(1, 3), (2, 3), (3, 3)]
    ev = threading.Event()
    ev.set()
    with pytest.raises(Cancelled):
        generate(tiny_model, req(steps=3), cancel=ev)
    calls = iter([False, True])
    with pytest.raises(Cancelled, match="after 1 of 3"):
        generate(tiny_model, req(steps=3), cancel=lambda: next(calls))
