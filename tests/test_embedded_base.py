"""The shipped embedded base model (checkpoints/embedded-base): present in the checkout, loaded offline
by content, and it draws the tissue class it is asked for.

"Draws the class" is judged by the shipped tissue encoder: a 5-nearest-neighbour classifier over the
bundled *train* crops labels the generated images, and at least two thirds must be of the prompted
class (chance is one third). The same prompts through the same architecture with random weights give noise that cannot do
this, so the check fails for an untrained or broken model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from histolab.config import EMBEDDED_BASE_DIR
from histolab.data import bundled
from histolab.data.prompts import CLASS_PROMPTS
from histolab.encoders import get_encoder
from histolab.generation import GenerationRequest, generate
from histolab.pipeline import load_base

PER_CLASS = 4
STEPS = 12  # DPM++ 2M Karras: enough for recognisable 64 px tissue from this model
GUIDANCE = 3.0


@pytest.fixture(scope="module")
def model():
    return load_base("embedded")


def test_the_embedded_base_is_shipped_as_safetensors():
    assert (EMBEDDED_BASE_DIR / "model_index.json").is_file(), f"{EMBEDDED_BASE_DIR} is missing from the checkout"
    info = json.loads((EMBEDDED_BASE_DIR / "histolab_base.json").read_text())
    assert info["trained_steps"] > 0 and info["resolution"] == 64
    for part in ("unet", "vae", "text_encoder"):
        files = list((EMBEDDED_BASE_DIR / part).glob("*.safetensors"))
        assert files, f"{part}: no safetensors weights"
        assert not list((EMBEDDED_BASE_DIR / part).glob("*.bin")), f"{part}: a pickle beside the safetensors"


def _reference(encoder):
    train = bundled.balanced(bundled.crops("train", 16), 40, seed=0)
    emb = torch.nn.functional.normalize(encoder.encode([bundled.load_crop(c) for c in train]), dim=1)
    return emb, [c.label for c in train]


def _classify(model, encoder, reference, k: int = 5) -> list[tuple[str, str]]:
    ref, ref_labels = reference
    out = []
    for label in sorted(CLASS_PROMPTS):
        request = GenerationRequest(
            prompt=CLASS_PROMPTS[label], steps=STEPS, guidance_scale=GUIDANCE, batch_size=PER_CLASS, seed=0
        )
        images = [g.image for g in generate(model, request)]
        arr = np.stack([np.asarray(im) for im in images])
        assert arr.shape == (PER_CLASS, 64, 64, 3) and arr.std() > 5, f"{label}: flat images"
        emb = torch.nn.functional.normalize(encoder.encode(images), dim=1)
        for row in (emb @ ref.T).topk(k, dim=1).indices.tolist():
            votes = [ref_labels[i] for i in row]
            out.append((label, max(sorted(set(votes)), key=votes.count)))
    return out


def test_it_draws_the_prompted_tissue_class(model):
    encoder = get_encoder("embedded")
    pairs = _classify(model, encoder, _reference(encoder))
    right = sum(a == b for a, b in pairs)
    assert 3 * right >= 2 * len(pairs), pairs  # two thirds at least; chance is one third


def test_random_weights_of_the_same_shape_do_not(model):
    from histolab.embedded.random_init import random_base

    encoder = get_encoder("embedded")
    pairs = _classify(random_base("embedded", seed=0), encoder, _reference(encoder))
    right = sum(a == b for a, b in pairs)
    assert 2 * right <= len(pairs), pairs  # so the check above measures training, not the prompt or encoder
