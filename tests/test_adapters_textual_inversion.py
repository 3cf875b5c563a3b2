"""Textual inversion: SD-webui .pt (string_to_param, multi-vector) and .safetensors (emb_params),
diffusers learned_embeds, our format; token handling; exact removal."""

import numpy as np
import pytest
import torch
from adapters_testkit import assert_restored, pixels, save_safetensors, snapshot

from histolab.adapters import textual_inversion as ti
from histolab.adapters.edit import ModelEdit
from histolab.adapters.manifest import Manifest
from histolab.adapters.runtime import AdapterRuntime
from histolab.errors import AdapterError
from histolab.generation import AdapterSpec


def vectors(n, width=32, seed=0):
    return torch.randn(n, width, generator=torch.Generator().manual_seed(seed))


def sdwebui_pt(path, vecs):
    """SD-webui's embedding file (modules/textual_inversion/textual_inversion.py, Embedding.save)."""
    torch.save(
        {
            "string_to_token": {"*": 265},
            "string_to_param": {"*": torch.nn.Parameter(vecs.clone())},
            "name": path.stem,
            "step": 1500,
            "sd_checkpoint": "abcdef0123",
            "sd_checkpoint_name": "v1-5-pruned",
        },
        path,
    )
    return path


def test_sdwebui_pt_multivector_tokens_and_vectors(tiny_model, tmp_path):
    vecs = vectors(3)
    f = sdwebui_pt(tmp_path / "crypt-cells.pt", vecs)
    snap = snapshot(tiny_model)
    rt = AdapterRuntime()
    with rt.applied(tiny_model, [AdapterSpec(str(f), 1.0)]) as uses:
        assert uses[0].kind == "textual_inversion"
        ids = tiny_model.tokenizer(["a crypt-cells photo"]).input_ids[0]
        n = len(snap["tokenizer"])
        assert ids[2:5] == [n, n + 1, n + 2]  # the token from the file name, expanded to its 3 vectors
        assert tiny_model.tokenizer.tokenize("crypt-cells") == ["crypt-cells", "crypt-cells_1", "crypt-cells_2"]
        emb = tiny_model.text_encoder.get_input_embeddings()(torch.tensor([ids]))
        assert torch.equal(emb[0, 2:5], vecs)
        assert torch.equal(emb[0, 1], snap["embedding"](torch.tensor([ids[1]]))[0])
    assert_restored(tiny_model, snap)


def test_generation_differs_strength_zero_is_base_and_unload_is_exact(tiny_model, tmp_path):
    f = sdwebui_pt(tmp_path / "glandemb.pt", vectors(2, seed=1) * 3)
    snap = snapshot(tiny_model)
    prompt = "glandemb colon tissue"
    base = pixels(tiny_model, prompt=prompt)
    assert not np.array_equal(pixels(tiny_model, [(f, 1.0)], prompt=prompt), base)
    assert np.array_equal(pixels(tiny_model, [(f, 0.0)], prompt=prompt), base)
    assert_restored(tiny_model, snap)
    assert np.array_equal(pixels(tiny_model, prompt=prompt), base)


def encoded(model, f, prompt, strength=1.0, **manifest):
    rt = AdapterRuntime()
    if manifest:
        from histolab.adapters.manifest import write_manifest

        write_manifest(f.parent, Manifest(kind="textual_inversion", weights=f.name, **manifest))
    with rt.applied(model, [AdapterSpec(str(f.parent if manifest else f), strength)]):
        return model.encode_prompt([prompt])


def test_every_layout_gives_the_same_conditioning(tiny_model, tmp_path):
    vecs = vectors(2, seed=4)
    (tmp_path / "a").mkdir()
    pt = sdwebui_pt(tmp_path / "a" / "mucosemb.pt", vecs)
    st = save_safetensors(tmp_path / "b" / "mucosemb.safetensors", {"emb_params": vecs})
    diffusers = save_safetensors(tmp_path / "c" / "learned_embeds.safetensors", {"mucosemb": vecs})
    (tmp_path / "d").mkdir()
    ours = ti.save(tmp_path / "d", "mucosemb", vecs, Manifest(kind="textual_inversion", name="mucosemb"))
    prompt = "mucosemb, h&e"
    results = [encoded(tiny_model, f, prompt) for f in (pt, st, diffusers)]
    results.append(encoded(tiny_model, ours.parent, prompt))
    assert all(torch.equal(results[0], r) for r in results[1:])
    assert not torch.equal(results[0], tiny_model.encode_prompt([prompt]))


def test_manifest_token_overrides_the_file(tiny_model, tmp_path):
    (tmp_path / "x").mkdir()
    f = sdwebui_pt(tmp_path / "x" / "embedding-v2.pt", vectors(1, seed=2))
    with_token = encoded(tiny_model, f, "<villi> tissue", trigger_token="<villi>")
    assert not torch.equal(with_token, tiny_model.encode_prompt(["<villi> tissue"]))


def test_a_token_that_already_exists_is_refused(tiny_model, tmp_path):
    f = save_safetensors(tmp_path / "learned_embeds.safetensors", {"tissue": vectors(1)})
    snap = snapshot(tiny_model)
    with pytest.raises(AdapterError, match=r"'tissue' already exists in the tokenizer \('tissue</w>'"):
        encoded(tiny_model, f, "tissue")
    assert_restored(tiny_model, snap)


def test_two_embeddings_at_once_and_token_clash(tiny_model, tmp_path):
    a = save_safetensors(tmp_path / "a" / "learned_embeds.safetensors", {"<a>": vectors(2, seed=5)})
    b = save_safetensors(tmp_path / "b" / "learned_embeds.safetensors", {"<b>": vectors(1, seed=6)})
    clash = save_safetensors(tmp_path / "c" / "learned_embeds.safetensors", {"<a>": vectors(1, seed=7)})
    snap = snapshot(tiny_model)
    rt = AdapterRuntime()
    with rt.applied(tiny_model, [AdapterSpec(str(a), 1.0), AdapterSpec(str(b), 1.0)]):
        ids = tiny_model.tokenizer(["<a> and <b>"]).input_ids[0]
        n = len(snap["tokenizer"])
        assert ids[1:3] == [n, n + 1] and ids[4] == n + 2
        emb = tiny_model.text_encoder.get_input_embeddings()(torch.tensor([ids]))[0]
        assert torch.equal(emb[4], vectors(1, seed=6)[0])
    assert_restored(tiny_model, snap)
    both = [AdapterSpec(str(a), 1.0), AdapterSpec(str(clash), 1.0)]
    with pytest.raises(AdapterError, match="both use the token '<a>'"), rt.applied(tiny_model, both):
        pass
    assert_restored(tiny_model, snap)


@pytest.mark.parametrize(
    "state, message",
    [
        ({"emb_params": torch.zeros(2, 768)}, "width 768, the base text encoder's tokens have width 32 (an SD 1.x"),
        ({"clip_l": torch.zeros(2, 768), "clip_g": torch.zeros(2, 1280)}, "SDXL embedding"),
    ],
)
def test_embeddings_for_other_bases_are_refused(tiny_model, tmp_path, state, message):
    f = save_safetensors(tmp_path / "other.safetensors", state)
    with pytest.raises(AdapterError, match=message.replace("(", r"\(").replace(".", r"\.")):
        encoded(tiny_model, f, "other")


def test_strength_scales_the_vectors(tiny_model, tmp_path):
    vecs = vectors(1, seed=3)
    f = save_safetensors(tmp_path / "learned_embeds.safetensors", {"<s>": vecs})
    w = ti.from_state({"<s>": vecs}, "", "t")
    edit = ModelEdit()
    w.apply(tiny_model, 0.5, edit)
    try:
        ids = tiny_model.tokenizer(["<s>"]).input_ids[0]
        got = tiny_model.text_encoder.get_input_embeddings()(torch.tensor([ids]))[0, 1]
    finally:
        edit.undo()
    assert torch.equal(got, vecs[0] * 0.5)
    assert f.exists()
