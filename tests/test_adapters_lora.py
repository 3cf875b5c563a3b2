"""LoRA: kohya-ss / SD-webui files (diffusers-style and LDM-style names), diffusers/peft
files, our own format; strengths, several at once, exact unloading, failures that leave
the model untouched. diffusers + peft loading the same files is the reference."""

import copy
import json

import numpy as np
import pytest
import torch
from adapters_testkit import assert_restored, kohya_lora_state, pixels, request, save_safetensors, snapshot
from diffusers.loaders import StableDiffusionLoraLoaderMixin

from histolab.adapters import lora as lora_mod
from histolab.adapters.edit import ModelEdit
from histolab.adapters.manifest import Manifest, base_info
from histolab.adapters.runtime import AdapterRuntime
from histolab.errors import AdapterError, HistolabError, UnsafeFile
from histolab.files import sha256_file
from histolab.generation import AdapterSpec, generate, request_from_recipe
from histolab.recipe import read_recipe, save_png


def unet_out(model):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 4, 16, 16, generator=g)
    ctx = torch.randn(1, 77, model.cross_attention_dim, generator=g)
    with torch.no_grad():
        return model.unet(x, torch.tensor(400), encoder_hidden_states=ctx).sample


def te_out(model, prompt="colon tissue"):
    return model.encode_prompt([prompt])


def ours(model, state, metadata=None, strength=1.0):
    """U-Net and text-encoder outputs with the LoRA applied through histolab, then removed."""
    w = lora_mod.from_state(dict(state), metadata or {}, {}, "test")
    edit = ModelEdit()
    w.apply(model, strength, edit)
    try:
        return unet_out(model), te_out(model)
    finally:
        edit.undo()


def reference(model, state):
    """The same file loaded by diffusers + peft into copies of the networks."""
    unet, te = copy.deepcopy(model.unet), copy.deepcopy(model.text_encoder)
    sd, alphas = StableDiffusionLoraLoaderMixin.lora_state_dict(dict(state), unet_config=unet.config)
    StableDiffusionLoraLoaderMixin.load_lora_into_unet(sd, alphas, unet, adapter_name="ref")
    if any(k.startswith("text_encoder.") for k in sd):
        StableDiffusionLoraLoaderMixin.load_lora_into_text_encoder(sd, alphas, te, adapter_name="ref")
    twin = copy.copy(model)
    twin.unet, twin.text_encoder = unet, te
    return unet_out(twin), te_out(twin)


def test_kohya_file_matches_diffusers_and_peft(tiny_model):
    snap = snapshot(tiny_model)
    # Attention, feed-forward and 1x1 proj_in/proj_out LoRA, plus conv LoRA on resnets; alpha != rank.
    state = kohya_lora_state(
        tiny_model, unet_filter=lambda n, m: "attentions" in n or "resnets" in n, rank=4, alpha=2.0, scale=0.2
    )
    assert any(k.endswith("resnets_0_conv1.lora_down.weight") for k in state)  # 3x3 conv LoRA (LoCon) is in it
    base_u, base_t = unet_out(tiny_model), te_out(tiny_model)
    got_u, got_t = ours(tiny_model, state)
    ref_u, ref_t = reference(tiny_model, state)
    assert (ref_u - base_u).abs().max() > 1e-2 and (ref_t - base_t).abs().max() > 1e-2  # the LoRA does something
    torch.testing.assert_close(got_u, ref_u, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_t, ref_t, rtol=1e-5, atol=1e-5)
    assert_restored(tiny_model, snap)


def test_ldm_names_reach_the_same_modules(tiny_model):
    """kohya files name U-Net blocks either way; both must give the same model, for every layer type."""
    every = lambda n, m: True  # noqa: E731  conv_in, time embedding, resnets, attentions, samplers, conv_out
    by_diffusers = kohya_lora_state(tiny_model, names="diffusers", unet_filter=every, scale=0.05)
    by_ldm = kohya_lora_state(tiny_model, names="ldm", unet_filter=every, scale=0.05)
    assert any("input_blocks_" in k for k in by_ldm) and any("output_blocks_" in k for k in by_ldm)
    assert not any("down_blocks_" in k for k in by_ldm)
    n_unet = len({k.split(".")[0] for k in by_diffusers if k.startswith("lora_unet_")})
    w = lora_mod.from_state(dict(by_ldm), {}, {}, "ldm")
    assert w.format == "kohya-ldm"
    assert len([r for r in w.validate(tiny_model) if r.component == "unet"]) == n_unet
    a_u, a_t = ours(tiny_model, by_diffusers)
    b_u, b_t = ours(tiny_model, by_ldm)
    assert torch.equal(a_u, b_u) and torch.equal(a_t, b_t)


def test_generation_differs_strength_zero_is_base_and_unload_is_exact(tiny_model, tmp_path):
    f = save_safetensors(tmp_path / "kohya.safetensors", kohya_lora_state(tiny_model))
    snap = snapshot(tiny_model)
    base = pixels(tiny_model)
    with_lora = pixels(tiny_model, [(f, 1.0)])
    assert not np.array_equal(base, with_lora)
    assert np.array_equal(pixels(tiny_model, [(f, 0.0)]), base)
    assert not np.array_equal(pixels(tiny_model, [(f, 0.5)]), with_lora)
    assert_restored(tiny_model, snap)
    assert np.array_equal(pixels(tiny_model), base)


def test_recipe_records_the_adapter(tiny_model, tmp_path):
    f = save_safetensors(tmp_path / "style.safetensors", kohya_lora_state(tiny_model))
    out = generate(tiny_model, request([(f, 0.7)]))[0]
    (use,) = out.recipe.adapters
    assert (use.name, use.kind, use.strength, use.hash) == ("style", "lora", 0.7, sha256_file(f))
    png = save_png(out.image, out.recipe, tmp_path / "x.png")
    again = generate(tiny_model, request_from_recipe(read_recipe(png)))
    assert np.array_equal(np.asarray(again[0].image), np.asarray(out.image))


def test_peft_files_with_metadata_alpha_match_diffusers(tiny_model, tmp_path):
    """Our saved format is diffusers' (peft keys + lora_adapter_metadata): diffusers reads it, and so do we."""
    kohya = kohya_lora_state(tiny_model, alpha=None, rank=4)
    w = lora_mod.from_state(kohya, {}, {}, "k")
    layers = [(r.component, r.module, r.down, r.up) for r in w.validate(tiny_model)]
    manifest = Manifest(kind="lora", name="ours", base=base_info(tiny_model))
    out = lora_mod.save(tmp_path / "ours", layers, alpha=2.0, manifest=manifest)
    from safetensors import safe_open

    with safe_open(str(out), "pt") as fh:
        meta = fh.metadata()
        state = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118
    assert json.loads(meta["lora_adapter_metadata"])["unet.lora_alpha"] == 2.0
    assert all(k.startswith(("unet.", "text_encoder.")) and (".lora_A." in k or ".lora_B." in k) for k in state)
    # diffusers reads alpha from the metadata through its own loader
    ref_unet = copy.deepcopy(tiny_model.unet)
    sd, alphas, lora_meta = StableDiffusionLoraLoaderMixin.lora_state_dict(str(out), return_lora_metadata=True)
    assert lora_meta["unet.lora_alpha"] == 2.0
    StableDiffusionLoraLoaderMixin.load_lora_into_unet(sd, alphas, ref_unet, adapter_name="r", metadata=lora_meta)
    twin = copy.copy(tiny_model)
    twin.unet = ref_unet
    got_u, _ = ours(tiny_model, state, meta)
    torch.testing.assert_close(got_u, unet_out(twin), rtol=1e-5, atol=1e-5)
    # the same file through the engine, by folder (manifest) and by file
    with_folder = pixels(tiny_model, [(tmp_path / "ours", 1.0)])
    with_file = pixels(tiny_model, [(out, 1.0)])
    assert np.array_equal(with_folder, with_file) and not np.array_equal(with_folder, pixels(tiny_model))


def test_older_diffusers_layouts_equal_peft(tiny_model):
    """lora.down/up (diffusers 0.17-0.20), attention-processor to_q_lora and text-encoder lora_linear_layer."""
    peft = {}
    w = lora_mod.from_state(kohya_lora_state(tiny_model, alpha=None), {}, {}, "k")
    for r in w.validate(tiny_model):
        peft[f"{r.component}.{r.module}.lora_A.weight"] = r.down
        peft[f"{r.component}.{r.module}.lora_B.weight"] = r.up
    legacy = {}
    for k, v in peft.items():
        comp, _, rest = k.partition(".")
        mod, ab = rest.rsplit(".lora_", 1)
        du = "down" if ab.startswith("A") else "up"
        if comp == "unet" and mod.endswith(("attn1.to_q", "attn2.to_k", "attn1.to_out.0")):
            attn, proj = (mod[: -len(".to_out.0")], "to_out") if mod.endswith("to_out.0") else mod.rsplit(".", 1)
            legacy[f"unet.{attn}.processor.{proj}_lora.{du}.weight"] = v
        elif comp == "unet":
            legacy[f"unet.{mod}.lora.{du}.weight"] = v
        else:
            legacy[f"text_encoder.{mod}.lora_linear_layer.{du}.weight"] = v
    assert any(".processor.to_out_lora." in k for k in legacy)
    a_u, a_t = ours(tiny_model, peft)
    b_u, b_t = ours(tiny_model, legacy)
    assert torch.equal(a_u, b_u) and torch.equal(a_t, b_t)


def test_alpha_scales_and_strength_is_linear(tiny_model):
    state = kohya_lora_state(tiny_model, alpha=4.0, rank=4, text_encoder=False)
    base = unet_out(tiny_model)
    full, _ = ours(tiny_model, state)
    half_alpha = {k: (torch.tensor(2.0) if k.endswith(".alpha") else v) for k, v in state.items()}
    by_alpha, _ = ours(tiny_model, half_alpha)
    by_strength, _ = ours(tiny_model, state, strength=0.5)
    torch.testing.assert_close(by_alpha, by_strength, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(full, by_alpha) and not torch.allclose(by_alpha, base)
    no_alpha = {k: v for k, v in state.items() if not k.endswith(".alpha")}  # kohya: alpha = rank, scale 1
    torch.testing.assert_close(ours(tiny_model, no_alpha)[0], full, rtol=1e-5, atol=1e-6)


def test_several_loras_at_once(tiny_model, tmp_path):
    a = save_safetensors(tmp_path / "a.safetensors", kohya_lora_state(tiny_model, seed=1))
    b = save_safetensors(tmp_path / "b.safetensors", kohya_lora_state(tiny_model, seed=2, names="ldm"))
    snap = snapshot(tiny_model)
    only_a, only_b = pixels(tiny_model, [(a, 1.0)]), pixels(tiny_model, [(b, 0.8)])
    both = pixels(tiny_model, [(a, 1.0), (b, 0.8)])
    swapped = pixels(tiny_model, [(b, 0.8), (a, 1.0)])
    assert not np.array_equal(both, only_a) and not np.array_equal(both, only_b)
    assert np.abs(both - swapped).max() <= 1  # the same sum, added in another order
    assert np.array_equal(pixels(tiny_model, [(a, 1.0), (b, 0.0)]), only_a)
    assert_restored(tiny_model, snap)


def test_loads_are_cached_by_content(tiny_model, tmp_path):
    f = save_safetensors(tmp_path / "a.safetensors", kohya_lora_state(tiny_model))
    rt = AdapterRuntime()
    for _ in range(3):
        with rt.applied(tiny_model, [AdapterSpec(str(f), 1.0)]):
            pass
    assert rt.loads == 1
    save_safetensors(f, kohya_lora_state(tiny_model, seed=9))  # new content, same name
    with rt.applied(tiny_model, [AdapterSpec(str(f), 1.0)]):
        pass
    assert rt.loads == 2
    copy_ = tmp_path / "copy.safetensors"
    copy_.write_bytes(f.read_bytes())  # same content, another name: not parsed again, but named as itself
    with rt.applied(tiny_model, [AdapterSpec(str(copy_), 1.0)]) as uses:
        assert uses[0].name == "copy" and uses[0].path == str(copy_.resolve())
    assert rt.loads == 2


def sdxl_shaped(model):
    """A kohya LoRA whose cross-attention keys take SDXL's 2048-wide text tokens."""
    state = kohya_lora_state(model, text_encoder=False)
    key = next(k for k in state if k.endswith("attn2_to_k.lora_down.weight"))
    state[key] = torch.randn(4, 2048)
    return state, key


def test_wrong_base_names_the_key_and_shapes(tiny_model, tmp_path):
    state, key = sdxl_shaped(tiny_model)
    f = save_safetensors(tmp_path / "xl.safetensors", state)
    with pytest.raises(AdapterError) as exc:
        pixels(tiny_model, [(f, 1.0)])
    msg = str(exc.value)
    assert key.split(".")[0] in msg and "[4, 32]" in msg and "[4, 2048]" in msg
    te2 = {"lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.zeros(4, 1280)}
    te2["lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight"] = torch.zeros(1280, 4)
    f2 = save_safetensors(tmp_path / "xl2.safetensors", te2)
    with pytest.raises(AdapterError, match="SDXL"):
        pixels(tiny_model, [(f2, 1.0)])


def test_a_failing_adapter_leaves_the_model_as_it_was(tiny_model, tmp_path, monkeypatch):
    good = save_safetensors(tmp_path / "good.safetensors", kohya_lora_state(tiny_model, seed=1))
    good2 = save_safetensors(tmp_path / "good2.safetensors", kohya_lora_state(tiny_model, seed=2))
    bad = save_safetensors(tmp_path / "bad.safetensors", sdxl_shaped(tiny_model)[0])
    snap = snapshot(tiny_model)
    base = pixels(tiny_model)
    with pytest.raises(AdapterError):
        pixels(tiny_model, [(good, 1.0), (bad, 1.0), (good2, 1.0)])
    assert_restored(tiny_model, snap)
    # A failure while applying (after validation passed): what was applied is taken off again.
    original = lora_mod.LoraWeights.apply
    calls = []

    def flaky(self, model, strength, edit, name="LoRA"):
        calls.append(name)
        if len(calls) == 2:
            raise RuntimeError("out of memory")
        return original(self, model, strength, edit, name)

    monkeypatch.setattr(lora_mod.LoraWeights, "apply", flaky)
    with pytest.raises(RuntimeError, match="out of memory"):
        pixels(tiny_model, [(good, 1.0), (good2, 1.0)])
    monkeypatch.undo()
    assert_restored(tiny_model, snap)
    assert np.array_equal(pixels(tiny_model), base)


def write_pickle_with_reduce(path, marker):
    import pickle

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path.write_bytes(pickle.dumps({"lora_unet_x.lora_down.weight": Evil()}, protocol=2))


@pytest.mark.parametrize(
    "make, error",
    [
        ("nan", UnsafeFile),
        ("pickle_reduce", UnsafeFile),
        ("truncated", UnsafeFile),
        ("empty", UnsafeFile),
        ("oversized_header", UnsafeFile),
        ("loha", AdapterError),
        ("missing_up", AdapterError),
        ("int_weights", AdapterError),
    ],
)
def test_broken_and_hostile_files_give_clear_errors(tiny_model, tmp_path, make, error):
    f = tmp_path / "lora.safetensors"
    state = kohya_lora_state(tiny_model, text_encoder=False)
    marker = tmp_path / "code_ran"
    if make == "nan":
        k = next(iter(state))
        state[k] = state[k].clone()
        state[k][0, 0] = float("nan")
        save_safetensors(f, state)
    elif make == "pickle_reduce":
        write_pickle_with_reduce(f, marker)
    elif make == "truncated":
        save_safetensors(f, state)
        f.write_bytes(f.read_bytes()[:-100])
    elif make == "empty":
        f.write_bytes(b"")
    elif make == "oversized_header":
        f.write_bytes((2**40).to_bytes(8, "little") + b'{"a": 1}')
    elif make == "loha":
        save_safetensors(f, {"lora_unet_down_blocks_1_attentions_0_proj_in.hada_w1_a": torch.zeros(4, 4)})
    elif make == "missing_up":
        save_safetensors(f, {k: v for k, v in state.items() if "lora_up" not in k})
    elif make == "int_weights":
        save_safetensors(f, {k: (v.to(torch.int32) if "lora_down" in k else v) for k, v in state.items()})
    snap = snapshot(tiny_model)
    with pytest.raises(error) as exc:
        pixels(tiny_model, [(f, 1.0)])
    assert isinstance(exc.value, HistolabError) and "lora" in str(exc.value).lower()
    assert not marker.exists(), "loading the file ran code"
    assert_restored(tiny_model, snap)
