"""The adapters shipped in checkpoints/ (one of each kind, trained on the embedded base by
scripts/train_embedded_adapters.py): listed as fitting the base, each one changes what the base
draws, and the base is bit for bit itself again afterwards."""

from __future__ import annotations

import json

import numpy as np
import pytest

from histolab.adapters.registry import scan
from histolab.config import Paths
from histolab.data import bundled
from histolab.generation import AdapterSpec, GenerationRequest, generate
from histolab.pipeline import load_base

SHIPPED = {
    "embedded-lora": "lora",
    "embedded-dreambooth": "dreambooth",
    "embedded-textual-inversion": "textual_inversion",
    "embedded-hypernetwork": "hypernetwork",
    "embedded-projector": "projector",
}


@pytest.fixture(scope="module")
def model():
    return load_base("embedded")


def test_every_kind_is_shipped_and_fits_the_embedded_base(model):
    entries = {e.name: e for e in scan(Paths.from_env().checkpoints, base=model)}
    for name, kind in SHIPPED.items():
        assert name in entries, f"{name} is missing from checkpoints/"
        e = entries[name]
        assert (e.kind, e.fits) == (kind, True), e
        manifest = json.loads((Paths.from_env().checkpoints / name / "manifest.json").read_text())
        fid = manifest["metrics"]["fid_test"]
        assert fid["fid"] < fid["base_fid_class_label_prompts"], (name, fid)  # as measured when it was shipped
    assert entries["embedded-encoder"].kind == "encoder"


def _pixels(model, **kw) -> np.ndarray:
    request = GenerationRequest(steps=2, seed=3, **kw)
    return np.asarray(generate(model, request)[0].image, dtype=np.int16)


@pytest.mark.parametrize("name", [n for n in SHIPPED if n != "embedded-projector"])
def test_each_text_adapter_changes_the_image_and_leaves_the_base_as_it_was(model, name):
    prompt = "an h&e stained histology image of skin"
    if name == "embedded-textual-inversion":
        prompt = "<skin_he>"
    before = _pixels(model, prompt=prompt)
    with_adapter = _pixels(model, prompt=prompt, adapters=(AdapterSpec(name),))
    after = _pixels(model, prompt=prompt)
    assert np.array_equal(before, after)
    assert np.abs(with_adapter - before).mean() > 0.5, name


def test_reference_patch_mode_with_the_shipped_projector(model):
    patch = bundled.load_crop(bundled.crops("test", 32)[0])
    a = _pixels(
        model,
        mode="reference",
        reference=patch,
        guidance_scale=1.3,
        scheduler="ddpm",
        adapters=(AdapterSpec("embedded-projector"),),
    )
    assert a.shape == (64, 64, 3) and a.std() > 1
