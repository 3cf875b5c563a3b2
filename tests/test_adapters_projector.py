"""Foundation-embedding adapter and reference-patch mode: projector + null embedding + attention LoRA,
classifier-free guidance against the projected null, the embedding cache, encoder checks."""

import uuid

import numpy as np
import pytest
import torch
from adapters_testkit import SeededEncoder, assert_restored, pixels, snapshot

from histolab.adapters import projector as pj
from histolab.adapters.manifest import Manifest, base_info, read_manifest
from histolab.adapters.reference import image_digest
from histolab.adapters.runtime import default_runtime
from histolab.data.bundled import crops, load_crop
from histolab.errors import AdapterError, InvalidRequest
from histolab.generation import generate


@pytest.fixture()
def encoder():
    enc = SeededEncoder(name=f"seeded-{uuid.uuid4().hex[:8]}", dim=48)
    default_runtime().register_encoder(enc)
    return enc


@pytest.fixture(scope="module")
def patches():
    test = crops("test")
    labels = sorted({c.label for c in test})
    return [load_crop(next(c for c in test if c.label == lab)) for lab in labels[:2]]


def make_projector(model, folder, encoder, seed=0, null_seed=None, rank=4, encoder_hash=None):
    """A projector adapter with seeded weights for ``model`` and ``encoder`` (as training would save it)."""
    cfg = pj.ProjectorConfig(
        encoder_dim=encoder.dim,
        cross_attention_dim=model.cross_attention_dim,
        n_tokens=4,
        depth=2,
        hidden=64,
        rank=rank,
        alpha=float(rank),
    )
    torch.manual_seed(seed)
    proj = pj.Projector(cfg)
    g = torch.Generator().manual_seed(seed if null_seed is None else null_seed)
    null = torch.randn(encoder.dim, generator=g)
    g = torch.Generator().manual_seed(seed + 1)
    layers = []
    for path in pj.attention_lora_modules(model.unet):
        mod = model.unet.get_submodule(path)
        layers.append(
            (
                path,
                torch.randn(rank, mod.in_features, generator=g) * 0.2,
                torch.randn(mod.out_features, rank, generator=g) * 0.2,
            )
        )
    enc = {"name": encoder.name, "weights_hash": encoder_hash or encoder.weights_hash, "dim": encoder.dim}
    manifest = Manifest(kind="projector", name=folder.name, base=base_info(model), training={"steps": 0})
    pj.save(folder, proj, null, layers, enc, manifest)
    return folder


def ref(model, adapter, image, **kw):
    return pixels(model, [(adapter, kw.pop("strength", 1.0))], mode="reference", reference=image, **kw)


def test_manifest_and_file_say_what_the_adapter_needs(tiny_model, tmp_path, encoder):
    folder = make_projector(tiny_model, tmp_path / "uni-proj", encoder)
    m = read_manifest(folder)
    assert m.kind == "projector" and m.encoder == {
        "name": encoder.name,
        "weights_hash": encoder.weights_hash,
        "dim": 48,
    }
    assert (m.config["n_tokens"], m.config["depth"], m.config["hidden"], m.config["rank"]) == (4, 2, 64, 4)
    assert m.base["hash"] == tiny_model.hash and m.base["architecture"]["unet"]["cross_attention_dim"] == 32
    a = default_runtime().load(folder)
    # LoRA on to_q/to_k/to_v/to_out.0 of every attention layer, self and cross
    n_attn = len(tiny_model.unet.attn_processors)
    assert len(a.payload.lora.layers) == 4 * n_attn and n_attn == 2 * 4  # 4 transformer blocks: down 1, mid 1, up 2


def test_reference_mode(tiny_model, tmp_path, encoder, patches):
    folder = make_projector(tiny_model, tmp_path / "proj", encoder)
    snap = snapshot(tiny_model)
    a, b = patches
    out_a = ref(tiny_model, folder, a, guidance_scale=2.0)
    assert encoder.calls == 1
    again = ref(tiny_model, folder, a, guidance_scale=2.0)
    assert np.array_equal(out_a, again), "same patch and seed must give the same image"
    assert encoder.calls == 1, "the second generation from the same patch must not encode it again"
    out_b = ref(tiny_model, folder, b, guidance_scale=2.0)
    assert encoder.calls == 2
    assert not np.array_equal(out_a, out_b), "two different patches gave the same image"
    assert not np.array_equal(out_a, ref(tiny_model, folder, a, guidance_scale=2.0, seed=6))
    assert_restored(tiny_model, snap)


def test_the_same_pixels_from_a_file_hit_the_cache_and_the_recipe_names_them(tiny_model, tmp_path, encoder, patches):
    from adapters_testkit import request

    folder = make_projector(tiny_model, tmp_path / "proj", encoder)
    patch = patches[0]
    patch.save(tmp_path / "patch.png")
    first = generate(tiny_model, request([(folder, 1.0)], mode="reference", reference=patch))[0]
    second = generate(tiny_model, request([(folder, 1.0)], mode="reference", reference=str(tmp_path / "patch.png")))[0]
    assert encoder.calls == 1
    assert np.array_equal(np.asarray(first.image), np.asarray(second.image))
    r = first.recipe
    assert (r.mode, r.reference_hash, r.encoder) == ("reference", image_digest(patch), encoder.name)
    assert r.adapters[0].kind == "projector"


def test_guidance_one_is_the_conditional_branch_alone(tiny_model, tmp_path, encoder, patches):
    """With w = 1 the null embedding must not matter; with w != 1 it must."""
    p1 = make_projector(tiny_model, tmp_path / "null1", encoder, seed=0, null_seed=100)
    p2 = make_projector(tiny_model, tmp_path / "null2", encoder, seed=0, null_seed=200)
    patch = patches[0]
    assert np.array_equal(
        ref(tiny_model, p1, patch, guidance_scale=1.0), ref(tiny_model, p2, patch, guidance_scale=1.0)
    )
    assert not np.array_equal(
        ref(tiny_model, p1, patch, guidance_scale=3.0), ref(tiny_model, p2, patch, guidance_scale=3.0)
    )


def test_guidance_uses_the_projected_null_embedding(tiny_model, tmp_path, encoder, patches):
    """The conditioner's (cond, uncond) are projector(encoder(patch)) and projector(null), n times."""
    folder = make_projector(tiny_model, tmp_path / "proj", encoder)
    a = default_runtime().load(folder).payload
    from histolab.generation import GenerationRequest

    req = GenerationRequest(mode="reference", reference=patches[0])
    from histolab.adapters.edit import ModelEdit

    edit = ModelEdit()
    a.apply(tiny_model, 1.0, edit, runtime=default_runtime())
    try:
        cond, uncond, digest, name = tiny_model.conditioners["reference"](tiny_model, req, 3)
    finally:
        edit.undo()
    emb = torch.as_tensor(encoder.encode([patches[0]]))
    with torch.no_grad():
        want_cond = a.projector(emb)
        want_null = a.projector(a.null_embedding[None])
    assert cond.shape == uncond.shape == (3, 4, 32)
    assert all(torch.equal(cond[i], want_cond[0]) and torch.equal(uncond[i], want_null[0]) for i in range(3))
    assert (digest, name) == (image_digest(patches[0]), encoder.name)
    assert "reference" not in tiny_model.conditioners


def test_prompt_mode_strength_zero_and_restore(tiny_model, tmp_path, encoder):
    folder = make_projector(tiny_model, tmp_path / "proj", encoder)
    snap = snapshot(tiny_model)
    base = pixels(tiny_model)
    assert np.array_equal(pixels(tiny_model, [(folder, 0.0)]), base)
    assert not np.array_equal(pixels(tiny_model, [(folder, 1.0)]), base)  # its LoRA is on
    assert_restored(tiny_model, snap)


def test_reference_mode_needs_the_adapter_and_its_encoder(tiny_model, tmp_path, encoder, patches):
    with pytest.raises(InvalidRequest, match="needs a foundation-embedding adapter"):
        pixels(tiny_model, mode="reference", reference=patches[0])
    wrong = make_projector(tiny_model, tmp_path / "wrong", encoder, encoder_hash="f" * 64)
    snap = snapshot(tiny_model)
    with pytest.raises(AdapterError, match=r"trained with encoder .* weights ffffffffff"):
        ref(tiny_model, wrong, patches[0])
    assert_restored(tiny_model, snap)
    other = SeededEncoder(name=encoder.name, dim=64)
    default_runtime().register_encoder(other)
    ok = make_projector(tiny_model, tmp_path / "ok", encoder)
    with pytest.raises(AdapterError, match=r"takes 48-d embeddings but encoder .* gives 64-d"):
        ref(tiny_model, ok, patches[0])
    assert_restored(tiny_model, snap)


def test_a_projector_for_another_base_is_refused(tiny_model, tmp_path, encoder):
    from adapters_testkit import meta_model

    sd15 = meta_model("sd15")
    folder = tmp_path / "sd15-proj"
    cfg = pj.ProjectorConfig(encoder_dim=48, cross_attention_dim=768, hidden=32, rank=1, alpha=1.0)
    layers = []
    for path in pj.attention_lora_modules(sd15.unet):
        mod = sd15.unet.get_submodule(path)
        layers.append((path, torch.zeros(1, mod.in_features), torch.zeros(mod.out_features, 1)))
    enc = {"name": encoder.name, "weights_hash": encoder.weights_hash, "dim": 48}
    pj.save(folder, pj.Projector(cfg), torch.zeros(48), layers, enc, Manifest(kind="projector"))
    a = default_runtime().load(folder)
    a.payload.validate(sd15)  # fits SD 1.5's shapes: 16 transformer blocks x 2 attentions x 4 projections
    assert len(a.payload.lora.layers) == 128
    with pytest.raises(AdapterError, match="tokens of width 768, but the base U-Net's cross-attention width is 32"):
        pixels(tiny_model, [(folder, 1.0)])
