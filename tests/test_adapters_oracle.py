"""Every file of tests/adapter_corpus.py, loaded by histolab and by diffusers (or peft) on the same base model,
compared weight by weight: fused U-Net and text-encoder weights for LoRA-family files, token embeddings and text
encodings for textual inversions, every tensor for single-file checkpoints. Kinds diffusers does not load
(LyCORIS LoHa/LoKr, hypernetworks) are checked against their writers' published formulas, computed here from
the raw file tensors. Each comparison prints ``ORACLE <file> ... max_abs_diff=<x>`` (run with -s to see them).
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from adapter_corpus import ACT, BY_NAME, CORPUS, sdwebui_hypernetwork_layers
from diffusers import PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel

from histolab.adapters.edit import ModelEdit
from histolab.adapters.runtime import AdapterRuntime
from histolab.errors import AdapterError
from histolab.files import load_state_dict

LORA_FILES = [e.name for e in CORPUS if e.kind == "lora"]
DIFFUSERS_LORA = [e.name for e in CORPUS if e.diffusers == "lora"]
TI_FILES = [e.name for e in CORPUS if e.kind == "textual_inversion"]
HN_FILES = [e.name for e in CORPUS if e.kind == "hypernetwork"]
SINGLE_FILES = [e.name for e in CORPUS if e.kind == "checkpoint"]
# LyCORIS layouts diffusers' SD loader refuses (checked below, so a diffusers that learns them shows up here).
DIFFUSERS_REFUSES = {"lycoris-loha", "lycoris-loha-conv", "lycoris-lokr", "lycoris-lokr-conv"}
DIFFUSERS_REFUSES |= {"lycoris-loha-tucker", "lycoris-lokr-tucker", "lycoris-locon-tucker"}
# diffusers loads it but gives one alpha to every attention projection (its kohya alpha names do not match the
# peft module names, so they fall back to the most common alpha): kohya's own maths is the reference there.
# diffusers drops DoRA's dora_scale from kohya/LyCORIS files (it says so and loads plain LoRA): LyCORIS's maths is
# the reference (test_dora_follows_published_formula).
DIFFUSERS_MISREADS = {"kohya-per-module-rank-alpha", "lycoris-dora-kohya"}
# Components diffusers reads right, where it does not read all: with transformers 5, its text-encoder DoRA
# magnitudes are left out of the model ("UNEXPECTED" keys), so the text encoder is checked by formula.
DIFFUSERS_COMPONENTS = {"diffusers-dora": ("unet",)}
# The files diffusers reads right: compared with it. The others are compared with their published formulas
# (test_diffusers_refuses_lycoris_loha_lokr, test_per_module_alpha_follows_kohya, test_dora_follows_...).
DIFFUSERS_READS = [n for n in DIFFUSERS_LORA if n not in DIFFUSERS_REFUSES | DIFFUSERS_MISREADS]


def report(name, what, diff):
    print(f"ORACLE {name} {what} max_abs_diff={diff:.3g}")


# ------------------------------------------------------------------ models


@pytest.fixture(scope="module")
def sd15_layout(tiny_model):
    """SD 1.5's U-Net layout (four levels, two layers per block, attention in the first three, LDM numbering
    up to output_blocks.11) at toy widths, with random weights, over the tiny model's text encoder and VAE."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8,
        block_out_channels=(16, 16, 32, 32),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=32,
        attention_head_dim=4,
        norm_num_groups=8,
    ).eval()
    return dataclasses.replace(tiny_model, unet=unet, applied=[], conditioners={}, source="sd15-layout")


MODELS = {"tiny": "tiny_model", "sd15-layout": "sd15_layout"}


def pipe_for(model) -> StableDiffusionPipeline:
    """A diffusers pipeline over copies of the model's networks (the model itself stays untouched)."""
    return StableDiffusionPipeline(
        vae=model.vae,
        text_encoder=copy.deepcopy(model.text_encoder),
        tokenizer=copy.deepcopy(model.tokenizer),
        unet=copy.deepcopy(model.unet),
        scheduler=PNDMScheduler.from_config(model.scheduler_config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def fused_weights(network) -> dict[str, torch.Tensor]:
    """Linear/Conv weights of a network after peft fused into it, under the base names."""
    return {
        n.replace(".base_layer.", "."): p.detach().clone()
        for n, p in network.named_parameters()
        if n.endswith(".weight") and "lora_" not in n
    }


def ours_weights(model, payload, strength=1.0) -> dict[str, dict[str, torch.Tensor]]:
    deltas = payload.delta_weights(model, strength)
    out = {}
    for comp in ("unet", "text_encoder"):
        net = getattr(model, comp)
        weights = {n: p.detach().clone() for n, p in net.named_parameters() if n.endswith(".weight")}
        for (c, mod), d in deltas.items():
            if c == comp:
                weights[f"{mod}.weight"] = weights[f"{mod}.weight"] + d
        out[comp] = weights
    return out


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def unet_out(unet, width):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 4, unet.config.sample_size, unet.config.sample_size, generator=g)
    ctx = torch.randn(1, 77, width, generator=g)
    with torch.no_grad():
        return unet(x, torch.tensor(400), encoder_hidden_states=ctx).sample


def encode(text_encoder, tokenizer, prompt):
    ids = tokenizer([prompt], padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt")
    with torch.no_grad():
        return text_encoder(ids.input_ids)[0]


PROMPT = "an h&e stained histology image of colon tissue"


def load(path):
    return AdapterRuntime().load(path)


# ------------------------------------------------------------------ LoRA family vs diffusers


@pytest.mark.parametrize("model_name", list(MODELS))
@pytest.mark.parametrize("name", DIFFUSERS_READS)
def test_lora_file_matches_diffusers(name, model_name, request, tmp_path):
    model = request.getfixturevalue(MODELS[model_name])
    entry = BY_NAME[name]
    path = entry.build(model, tmp_path)
    oracle = path
    if entry.twin is not None:
        # diffusers 0.42 does not map SD 1.x LDM block names (its SGM mapping is SDXL's): it refuses the file,
        # and reads the same tensors under diffusers names, which is what histolab's LDM reading must equal.
        with pytest.raises(ValueError, match="not found in the base model"):
            pipe_for(model).load_lora_weights(str(path))
        oracle = entry.twin(model, tmp_path / "twin")
    pipe = pipe_for(model)
    pipe.load_lora_weights(str(oracle))
    pipe.fuse_lora(components=["unet", "text_encoder"], lora_scale=1.0)
    theirs = {"unet": fused_weights(pipe.unet), "text_encoder": fused_weights(pipe.text_encoder)}

    loaded = load(path)
    payload = loaded.payload
    mine = ours_weights(model, payload)
    rep = payload.load_report(model, loaded.name)
    assert not rep.ignored, rep.summary()
    for comp in DIFFUSERS_COMPONENTS.get(name, ("unet", "text_encoder")):
        diff = max_diff(mine[comp], theirs[comp])
        changed = sum(not torch.equal(theirs[comp][k], getattr(model, comp).state_dict()[k]) for k in theirs[comp])
        report(f"{name}@{model_name}", f"{comp} modules={changed}", diff)
        assert diff < 1e-5, f"{comp}: histolab and diffusers differ by {diff}"
        assert changed == (rep.unet_modules if comp == "unet" else rep.text_encoder_modules)

    if model_name != "tiny":
        return  # the hooks' forward check below runs on the tiny model; here the layout is what is tested
    # The hooks histolab applies compute the same networks as diffusers' fused weights.
    edit = ModelEdit()
    payload.apply(model, 1.0, edit, loaded.name)
    try:
        got_u = unet_out(model.unet, model.cross_attention_dim)
        got_t = encode(model.text_encoder, model.tokenizer, PROMPT)
    finally:
        edit.undo()
    torch.testing.assert_close(got_u, unet_out(pipe.unet, model.cross_attention_dim), rtol=1e-4, atol=1e-5)
    if "text_encoder" in DIFFUSERS_COMPONENTS.get(name, ("text_encoder",)):
        torch.testing.assert_close(got_t, encode(pipe.text_encoder, pipe.tokenizer, PROMPT), rtol=1e-4, atol=1e-5)


# Files whose writer put text-encoder layers in them (every LoRA-family file but the U-Net-only ones).
UNET_ONLY = {"kohya-locon-ldm-names", "lycoris-loha-conv", "lycoris-lokr-conv", "peft-adapter-folder"}
UNET_ONLY |= {"lycoris-loha-tucker", "lycoris-lokr-tucker", "lycoris-locon-tucker"}


# Files the corpus writes from module shapes alone (peft needs real weights to make its files).
SHAPE_BUILT = [n for n in LORA_FILES if not n.startswith(("diffusers-", "peft-"))]


@pytest.fixture(scope="module")
def sd15_meta():
    from adapters_testkit import meta_model

    return meta_model("sd15")


@pytest.mark.parametrize("name", SHAPE_BUILT)
def test_every_layer_finds_its_module_in_real_sd15_shapes(name, sd15_meta, tmp_path):
    """Stable Diffusion 1.5's own networks (meta device): every layer of the file matched and shape-checked."""
    path = BY_NAME[name].build(sd15_meta, tmp_path)
    tensors, _ = load_state_dict(path)
    layers = {k.split(".")[0] for k in tensors}
    loaded = load(path)
    rep = loaded.payload.load_report(sd15_meta, loaded.name)
    assert not rep.ignored and rep.unet_modules + rep.text_encoder_modules == len(layers), rep.summary()
    te = {k for k in layers if k.startswith(("lora_te_", "lora_te1_"))}
    assert rep.text_encoder_modules == len(te) and (not te or len(te) == 12 * 6)  # q, k, v, out, fc1, fc2 x 12


@pytest.mark.parametrize("name", [n for n in LORA_FILES if n not in UNET_ONLY])
def test_text_encoder_layers_change_the_text_embeddings(name, tiny_model, tmp_path):
    """Text-encoder parts are never lost: a file with text-encoder layers changes the prompt's embedding."""
    path = BY_NAME[name].build(tiny_model, tmp_path)
    loaded = load(path)
    rep = loaded.payload.load_report(tiny_model, loaded.name)
    assert rep.text_encoder_modules > 0, rep.summary()
    base = encode(tiny_model.text_encoder, tiny_model.tokenizer, PROMPT)
    edit = ModelEdit()
    loaded.payload.apply(tiny_model, 1.0, edit, loaded.name)
    try:
        with_lora = tiny_model.encode_prompt([PROMPT])
    finally:
        edit.undo()
    assert (with_lora - base).abs().max() > 1e-3
    assert torch.equal(encode(tiny_model.text_encoder, tiny_model.tokenizer, PROMPT), base)


def test_per_module_alpha_follows_kohya(tiny_model, tmp_path):
    """Each module's own alpha / rank, as sd-scripts and SD-webui apply it (networks/lora.py: scale = alpha / dim)."""
    path = BY_NAME["kohya-per-module-rank-alpha"].build(tiny_model, tmp_path)
    tensors, _ = load_state_dict(path)
    deltas = load(path).payload.delta_weights(tiny_model, 1.0)
    keys = sorted({k.split(".")[0] for k in tensors})
    assert len(deltas) == len(keys) and len({float(tensors[f"{k}.alpha"]) for k in keys}) == 4
    worst = 0.0
    for key in keys:
        comp, mod, m = kohya_module(tiny_model, key)
        down, up = tensors[f"{key}.lora_down.weight"], tensors[f"{key}.lora_up.weight"]
        want = (
            (up.flatten(1) @ down.flatten(1)).reshape(m.weight.shape) * float(tensors[f"{key}.alpha"]) / down.shape[0]
        )
        worst = max(worst, float((deltas[(comp, mod)] - want).abs().max()))
    report("kohya-per-module-rank-alpha", f"kohya formula modules={len(keys)}", worst)
    assert worst < 1e-6
    # diffusers, for the record (the closing note lists it): it scales attention projections by the common alpha.
    pipe = pipe_for(tiny_model)
    pipe.load_lora_weights(str(path))
    pipe.fuse_lora(components=["unet", "text_encoder"], lora_scale=1.0)
    mine = ours_weights(tiny_model, load(path).payload)
    for comp in ("unet", "text_encoder"):
        report(
            "kohya-per-module-rank-alpha",
            f"{comp} vs diffusers",
            max_diff(mine[comp], fused_weights(getattr(pipe, comp))),
        )


@pytest.mark.parametrize("name", ["lycoris-dora-kohya", "diffusers-dora"])
def test_dora_follows_published_formula(name, tiny_model, tmp_path):
    """DoRA (peft / LyCORIS wd_on_out): W' = m * (W + dW) / ||W + dW||, the norm per output row."""
    import json

    path = BY_NAME[name].build(tiny_model, tmp_path)
    tensors, meta = load_state_dict(path)
    deltas = load(path).payload.delta_weights(tiny_model, 1.0)
    packed = json.loads(meta.get("lora_adapter_metadata", "{}"))
    worst, n = 0.0, 0
    for key in [k for k in tensors if k.endswith((".dora_scale", ".lora_magnitude_vector"))]:
        if name == "lycoris-dora-kohya":
            base = key.removesuffix(".dora_scale")
            comp, mod, m = kohya_module(tiny_model, base)
            down, up = tensors[f"{base}.lora_down.weight"], tensors[f"{base}.lora_up.weight"]
            scale = float(tensors[f"{base}.alpha"]) / down.shape[0]
        else:
            base = key.removesuffix(".lora_magnitude_vector")
            comp, mod = base.split(".", 1)
            m = getattr(tiny_model, comp).get_submodule(mod)
            layer = "lora" if f"{base}.lora.down.weight" in tensors else "lora_linear_layer"  # text encoder's
            down, up = tensors[f"{base}.{layer}.down.weight"], tensors[f"{base}.{layer}.up.weight"]
            scale = packed[f"{comp}.lora_alpha"] / down.shape[0]
        w = m.weight.detach()
        merged = w + (up.flatten(1) @ down.flatten(1)).reshape(w.shape) * scale
        norm = merged.flatten(1).norm(dim=1).reshape(-1, *[1] * (w.ndim - 1))
        want = tensors[key].reshape(norm.shape) * merged / norm - w
        worst = max(worst, float((deltas[(comp, mod)] - want).abs().max()))
        n += 1
    report(name, f"DoRA formula modules={n}", worst)
    assert n == len(deltas) and worst < 1e-5


@pytest.mark.parametrize(
    "name, component, modules",
    # U-Net: 4 transformer blocks x (to_q, to_k, to_v, to_out.0) x (attn1, attn2); text encoder: 2 layers x 3
    [("peft-adapter-folder", "unet", 32), ("peft-adapter-folder-text-encoder", "text_encoder", 6)],
)
def test_peft_adapter_folder_matches_peft(name, component, modules, tiny_model, tmp_path):
    """peft's own reader (PeftModel.from_pretrained + merge) is the reference for its folders."""
    from peft import PeftModel

    folder = BY_NAME[name].build(tiny_model, tmp_path)
    merged = PeftModel.from_pretrained(copy.deepcopy(getattr(tiny_model, component)), str(folder)).merge_and_unload()
    loaded = load(folder)
    mine = ours_weights(tiny_model, loaded.payload)[component]
    theirs = {n: p.detach() for n, p in merged.named_parameters() if n.endswith(".weight")}
    diff = max_diff(mine, theirs)
    report(name, component, diff)
    assert diff < 1e-5
    rep = loaded.payload.load_report(tiny_model, loaded.name)
    got = (rep.unet_modules, rep.text_encoder_modules)
    assert got == ((modules, 0) if component == "unet" else (0, modules)), rep.summary()


def test_mixed_diffusers_file_matches_the_peft_model_it_was_saved_from(tiny_model, tmp_path):
    """A save_lora_weights file with convolutions: diffusers 0.42 drops its linear layers on loading (the file mixes
    lora_A and lora.down keys), so the peft model it was saved from, merged, is the reference."""
    from adapter_corpus import UNET_TARGETS_CONV, _peft_copies
    from peft.tuners.tuners_utils import BaseTunerLayer

    path = BY_NAME["diffusers-save-lora-weights-convs"].build(tiny_model, tmp_path)
    unet, _, text, _ = _peft_copies(tiny_model, seed=17, rank=4, alpha=8.0, targets=UNET_TARGETS_CONV)
    for net in (unet, text):
        for m in net.modules():
            if isinstance(m, BaseTunerLayer):
                m.merge()
    mine = ours_weights(tiny_model, load(path).payload)
    worst = max(max_diff(mine["unet"], fused_weights(unet)), max_diff(mine["text_encoder"], fused_weights(text)))
    report("diffusers-save-lora-weights-convs", "unet+text_encoder vs peft", worst)
    assert worst < 1e-5
    pipe = pipe_for(tiny_model)
    pipe.load_lora_weights(str(path))
    dropped = [n for n, m in pipe.unet.named_modules() if n.endswith("attn1.to_q") and not hasattr(m, "lora_A")]
    report("diffusers-save-lora-weights-convs", f"diffusers left out attn1.to_q in {len(dropped)} blocks", 0.0)


# ------------------------------------------------------------------ LyCORIS maths (diffusers refuses these)


@pytest.mark.parametrize("name", sorted(DIFFUSERS_REFUSES))
def test_diffusers_refuses_lycoris_loha_lokr(name, tiny_model, tmp_path):
    path = BY_NAME[name].build(tiny_model, tmp_path)
    with pytest.raises(ValueError, match="not been correctly renamed"):
        pipe_for(tiny_model).load_lora_weights(str(path))


def kohya_module(model, key):
    """The module a kohya key names, found by spelling every module's name the kohya way (independent of histolab)."""
    for comp, prefix in (("unet", "lora_unet_"), ("text_encoder", "lora_te_")):
        for n, m in getattr(model, comp).named_modules():
            for spelled in (n, "text_model." + n):
                if prefix + spelled.replace(".", "_") == key:
                    return comp, n, m
    raise KeyError(key)


def make_weight_cp(t, wa, wb):
    """SD-webui lyco_helpers.make_weight_cp, written out: einsum('ijkl,jr->irkl') then einsum('ijkl,ir->rjkl')."""
    temp = torch.einsum("i j k l, j r -> i r k l", t, wb)
    return torch.einsum("i j k l, i r -> r j k l", temp, wa)


def loha_formula(t, key, shape):
    """LyCORIS / SD-webui: dW = (w1_a @ w1_b) * (w2_a @ w2_b) * alpha / rank (Tucker: each half rebuilt by CP)."""
    scale = float(t[f"{key}.alpha"]) / t[f"{key}.hada_w1_b"].shape[0]
    if f"{key}.hada_t1" in t:
        w1 = make_weight_cp(t[f"{key}.hada_t1"], t[f"{key}.hada_w1_a"], t[f"{key}.hada_w1_b"])
        return w1 * make_weight_cp(t[f"{key}.hada_t2"], t[f"{key}.hada_w2_a"], t[f"{key}.hada_w2_b"]) * scale
    w = (t[f"{key}.hada_w1_a"] @ t[f"{key}.hada_w1_b"]) * (t[f"{key}.hada_w2_a"] @ t[f"{key}.hada_w2_b"])
    return w.reshape(shape) * scale


def locon_formula(t, key, shape):
    """SD-webui network_lora: rebuild_cp_decomposition(up, down, mid) * alpha / rank, or up @ down for 1x1."""
    up, down = t[f"{key}.lora_up.weight"].flatten(1), t[f"{key}.lora_down.weight"].flatten(1)
    scale = float(t[f"{key}.alpha"]) / down.shape[0]
    if f"{key}.lora_mid.weight" in t:
        return torch.einsum("n m k l, i n, m j -> i j k l", t[f"{key}.lora_mid.weight"], up, down) * scale
    return (up @ down).reshape(shape) * scale


def lokr_formula(t, key, shape):
    """LyCORIS / SD-webui: dW = kron(w1, w2) * scale, w2 = w2_a @ w2_b (scale alpha / rank) or whole (scale 1)."""
    w1 = t[f"{key}.lokr_w1"]
    if f"{key}.lokr_w2" in t:
        w2, scale = t[f"{key}.lokr_w2"], 1.0
    else:
        if f"{key}.lokr_t2" in t:
            w2 = make_weight_cp(t[f"{key}.lokr_t2"], t[f"{key}.lokr_w2_a"], t[f"{key}.lokr_w2_b"])
        else:
            w2 = t[f"{key}.lokr_w2_a"] @ t[f"{key}.lokr_w2_b"]
        scale = float(t[f"{key}.alpha"]) / t[f"{key}.lokr_w2_b"].shape[0]
    if w2.ndim == 4:
        w1 = w1[:, :, None, None]
    return torch.kron(w1, w2).reshape(shape) * scale


@pytest.mark.parametrize("name", sorted(DIFFUSERS_REFUSES))
def test_lycoris_file_matches_published_formula(name, tiny_model, tmp_path):
    path = BY_NAME[name].build(tiny_model, tmp_path)
    tensors, _ = load_state_dict(path)
    formula = loha_formula if "loha" in name else locon_formula if "locon" in name else lokr_formula
    loaded = load(path)
    deltas = loaded.payload.delta_weights(tiny_model, 0.7)
    keys = sorted({k.split(".")[0] for k in tensors})
    assert len(deltas) == len(keys)
    worst = 0.0
    for key in keys:
        comp, mod, m = kohya_module(tiny_model, key)
        want = formula(tensors, key, tuple(m.weight.shape)) * 0.7
        worst = max(worst, float((deltas[(comp, mod)] - want).abs().max()))
    report(name, f"formula modules={len(keys)}", worst)
    assert worst < 1e-5
    # ...and the hooks compute the layer with that update fused in, for a 3x3 convolution or a linear layer.
    comp, mod, m = kohya_module(tiny_model, keys[0])
    x = torch.randn(2, m.in_channels, 6, 6) if isinstance(m, torch.nn.Conv2d) else torch.randn(2, m.in_features)
    fused = copy.deepcopy(m)
    with torch.no_grad():
        fused.weight += deltas[(comp, mod)]
    edit = ModelEdit()
    loaded.payload.apply(tiny_model, 0.7, edit, loaded.name)
    try:
        with torch.no_grad():
            torch.testing.assert_close(m(x), fused(x), rtol=1e-5, atol=1e-5)
    finally:
        edit.undo()


def test_lycoris_strength_zero_is_the_base_and_dora_at_zero_too(tiny_model, tmp_path):
    for name in ("lycoris-loha", "lycoris-dora-kohya"):
        loaded = load(BY_NAME[name].build(tiny_model, tmp_path / name))
        assert all(float(d.abs().max()) == 0 for d in loaded.payload.delta_weights(tiny_model, 0.0).values())


# ------------------------------------------------------------------ textual inversion vs diffusers


@pytest.mark.parametrize("name", TI_FILES)
def test_textual_inversion_matches_diffusers(name, tiny_model, tmp_path):
    entry = BY_NAME[name]
    path = entry.build(tiny_model, tmp_path)
    pipe = pipe_for(tiny_model)
    pipe.load_textual_inversion(str(path), token=entry.token)
    prompt = f"a {entry.token} patch of colon tissue"
    theirs = encode(pipe.text_encoder, pipe.tokenizer, pipe.maybe_convert_prompt(prompt, pipe.tokenizer))

    loaded = load(path)
    rep = loaded.payload.load_report(tiny_model, loaded.name)
    assert rep.tokens and rep.tokens[0] == entry.token
    edit = ModelEdit()
    loaded.payload.apply(tiny_model, 1.0, edit, loaded.name)
    try:
        mine = tiny_model.encode_prompt([prompt])
        tokens = list(rep.tokens)
        ids = tiny_model.tokenizer.convert_tokens_to_ids(tokens)
        rows = tiny_model.text_encoder.get_input_embeddings()(torch.tensor([ids]))[0]
    finally:
        edit.undo()
    their_rows = pipe.text_encoder.get_input_embeddings().weight[pipe.tokenizer.convert_tokens_to_ids(tokens)]
    diff = float((rows - their_rows).abs().max())
    report(name, f"embedding rows={len(tokens)}", diff)
    assert diff < 1e-6
    diff = float((mine - theirs).abs().max())
    report(name, "text encoding", diff)
    assert diff < 1e-5


# ------------------------------------------------------------------ hypernetworks vs SD-webui's formula


def sdwebui_mlp(state, width, opts):
    """SD-webui HypernetworkModule.forward from the raw tensors: x + linear(x), the Sequential rebuilt here."""
    structure = opts["layer_structure"]
    layers = sdwebui_hypernetwork_layers(width, structure, opts["activation_func"], opts["is_layer_norm"],
                                         opts["dropout_structure"], opts["activate_output"])  # fmt: skip

    def f(x):
        h = x
        for idx, (kind, _a, b) in enumerate(layers):
            if kind == "linear":
                h = h @ state[f"linear.{idx}.weight"].T + state[f"linear.{idx}.bias"]
            elif kind == "act":
                h = ACT[opts["activation_func"]]()(h)
            elif kind == "norm":
                h = torch.nn.functional.layer_norm(h, (b,), state[f"linear.{idx}.weight"], state[f"linear.{idx}.bias"])
            # dropout: identity at inference
        return x + h

    return f


def attention_by_formula(attn, hidden, context, k_mlp, v_mlp):
    """softmax(q k^T / sqrt(d)) v with k = to_k(context + mlp_k(context)), v = to_v(context + mlp_v(context))."""
    q, k, v = attn.to_q(hidden), attn.to_k(k_mlp(context)), attn.to_v(v_mlp(context))
    b, n, _ = q.shape
    heads = attn.heads
    split = lambda t: t.view(b, -1, heads, t.shape[-1] // heads).transpose(1, 2)  # noqa: E731
    q, k, v = split(q), split(k), split(v)
    w = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
    out = (w @ v).transpose(1, 2).reshape(b, n, -1)
    return attn.to_out[1](attn.to_out[0](out))


@pytest.mark.parametrize("name", HN_FILES)
def test_hypernetwork_matches_sdwebui_formula(name, tiny_model, tmp_path):
    path = BY_NAME[name].build(tiny_model, tmp_path)
    obj = torch.load(path, weights_only=True)
    loaded = load(path)
    rep = loaded.payload.load_report(tiny_model, loaded.name)
    assert rep.unet_modules == len(loaded.payload.validate(tiny_model)) > 0
    edit = ModelEdit()
    loaded.payload.apply(tiny_model, 1.0, edit, loaded.name)
    worst = 0.0
    try:
        for proc_name in loaded.payload.validate(tiny_model):
            attn = tiny_model.unet.get_submodule(proc_name.removesuffix(".processor"))
            width = attn.cross_attention_dim
            g = torch.Generator().manual_seed(1)
            hidden = torch.randn(1, 16, attn.to_q.in_features, generator=g)
            cross = proc_name.endswith("attn2.processor")
            context = torch.randn(1, 7, width, generator=g) if cross else hidden
            k_state, v_state = obj[width]
            with torch.no_grad():
                want = attention_by_formula(
                    attn, hidden, context, sdwebui_mlp(k_state, width, obj), sdwebui_mlp(v_state, width, obj)
                )
                got = attn(hidden, encoder_hidden_states=context if cross else None)
            worst = max(worst, float((got - want).abs().max()))
    finally:
        edit.undo()
    report(name, f"attention layers={rep.unet_modules}", worst)
    assert worst < 1e-5


# ------------------------------------------------------------------ single files vs diffusers' from_single_file


@pytest.fixture(scope="module")
def config_folder(tiny_model, tmp_path_factory):
    """The tiny model as a diffusers folder: from_single_file reads its component configs from it (no hub)."""
    from histolab.pipeline import save_pipeline_folder

    return save_pipeline_folder(tiny_model, tmp_path_factory.mktemp("cfg") / "tiny")


@pytest.mark.parametrize("name", SINGLE_FILES)
def test_single_file_matches_diffusers(name, tiny_model, config_folder, tmp_path):
    from histolab.single_file import load_single_file

    path = BY_NAME[name].build(tiny_model, tmp_path)
    pipe = StableDiffusionPipeline.from_single_file(
        str(path), config=str(config_folder), safety_checker=None, torch_dtype=torch.float32, local_files_only=True
    )
    base = load_single_file(path)  # as a base model
    as_adapter = load(path).payload.state_for(tiny_model, real=True)  # as a DreamBooth over the tiny base
    worst = 0.0
    for comp in ("unet", "vae", "text_encoder"):
        theirs = {k: v for k, v in getattr(pipe, comp).state_dict().items() if not k.endswith("position_ids")}
        mine = {k: v for k, v in getattr(base, comp).state_dict().items() if not k.endswith("position_ids")}
        worst = max(worst, max_diff(mine, theirs))
        adapter = {k: v for k, v in as_adapter[comp].items() if not k.endswith("position_ids")}
        worst = max(worst, max_diff(adapter, theirs))
    report(name, "unet+vae+text_encoder", worst)
    assert worst == 0.0


def test_single_file_with_ema_uses_the_trained_weights_and_says_so(tiny_model, tmp_path):
    path = BY_NAME["single-file-fp32-ema.safetensors"].build(tiny_model, tmp_path)
    loaded = load(path)
    rep = loaded.payload.load_report(tiny_model, loaded.name)
    assert any("model_ema" in k for k in rep.ignored), rep.summary()
    assert any("EMA" in n for n in rep.notes)
    unet = loaded.payload.state_for(tiny_model, real=True)["unet"]
    assert all(torch.equal(unet[k], v) for k, v in tiny_model.unet.state_dict().items())


# ------------------------------------------------------------------ nothing matches: a clear error


def test_sdxl_lora_on_sd15_names_the_cause(tiny_model, tmp_path):
    from adapter_corpus import _save

    te2 = {
        "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.zeros(4, 1280),
        "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.zeros(1280, 4),
        "lora_unet_input_blocks_4_1_transformer_blocks_1_attn1_to_q.lora_down.weight": torch.zeros(4, 640),
        "lora_unet_input_blocks_4_1_transformer_blocks_1_attn1_to_q.lora_up.weight": torch.zeros(640, 4),
    }
    loaded = load(_save(tmp_path / "xl.safetensors", te2))
    with pytest.raises(AdapterError, match=r"none of its 2 layers.*SDXL LoRA"):
        loaded.payload.load_report(tiny_model, loaded.name)


# ------------------------------------------------------------------ what loading says


def partial_kohya_file(model, folder):
    """The kohya file plus one layer for a module an SD-1.5-family base lacks (SDXL's second transformer block)."""
    from adapter_corpus import _save, kohya_state

    state = kohya_state(model, seed=1)
    extra = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_1_attn1_to_q"
    state[f"{extra}.lora_down.weight"] = torch.zeros(4, 32)
    state[f"{extra}.lora_up.weight"] = torch.zeros(32, 4)
    return _save(folder / "style.safetensors", state), extra


def test_cli_adapters_says_what_each_file_patches_and_ignores(tiny_model, tmp_path, capsys):
    import json

    from adapters_testkit import save_pipeline

    from histolab.cli import main

    root = tmp_path / "checkpoints"
    save_pipeline(tiny_model, root / "tiny-base")
    _, extra = partial_kohya_file(tiny_model, root)
    BY_NAME["ti-sdwebui-pt-several"].build(tiny_model, root)
    assert main(["adapters", "--checkpoints", str(root), "--base", str(root / "tiny-base")]) == 0
    lines = capsys.readouterr().out.splitlines()
    row = next(ln for ln in lines if ln.startswith("style "))
    assert " yes " in row and "U-Net 48 modules, text encoder 12" in row
    assert f"ignored 1 keys: {extra} (no such module in this base model)" in row
    emb = next(ln for ln in lines if ln.startswith("glandemb "))
    assert "SD-webui embedding (.pt" in emb and "tokens glandemb, glandemb_1, glandemb_2, glandemb_3" in emb
    assert main(["adapters", "--checkpoints", str(root), "--base", str(root / "tiny-base"), "--json"]) == 0
    rows = {r["name"]: r for r in map(json.loads, capsys.readouterr().out.splitlines())}
    assert rows["style"]["ignored"] == [f"{extra} (no such module in this base model)"]
    assert "kohya / SD-webui network (diffusers block names)" in rows["style"]["report"]


def test_a_partly_matching_file_applies_the_rest_and_warns(tiny_model, tmp_path):
    """As diffusers/peft do, layers for modules the base lacks are left out; here the user is told which."""
    from histolab.adapters.spec import AdapterSpec
    from histolab.errors import AdapterWarning

    path, extra = partial_kohya_file(tiny_model, tmp_path)
    rt = AdapterRuntime()
    warned = pytest.warns(AdapterWarning, match=f"ignored 1 keys: {extra}")
    with warned, rt.applied(tiny_model, [AdapterSpec(str(path), 1.0)]):
        got = unet_out(tiny_model.unet, 32), tiny_model.encode_prompt([PROMPT])
    whole = BY_NAME["kohya-unet-te-diffusers-names"].build(tiny_model, tmp_path / "whole")  # the same, without it
    with rt.applied(tiny_model, [AdapterSpec(str(whole), 1.0)]):
        want = unet_out(tiny_model.unet, 32), tiny_model.encode_prompt([PROMPT])
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    rep = rt.report(tiny_model, path)
    assert (rep.unet_modules, rep.text_encoder_modules, len(rep.ignored)) == (48, 12, 1)


@pytest.mark.parametrize(
    "edit_state, message",
    [
        (lambda s, k: s.update({f"{k}.hada_w2_b": torch.zeros(3, 32)}), "hada_w1_a/b and hada_w2_a/b do not chain"),
        (lambda s, k: s.pop(f"{k}.hada_w2_a"), "has no hada_w2_a"),
        (
            lambda s, k: s.update({f"{k}.hada_w1_b": torch.zeros(4, 48), f"{k}.hada_w2_b": torch.zeros(4, 48)}),
            "the layer's weight is \\[32, 32\\]",
        ),
        (lambda s, k: s.update({f"{k}.dora_scale": torch.ones(7, 1)}), "DoRA magnitude has shape \\[7, 1\\]"),
        (lambda s, k: s.update({f"{k}.hada_t1": torch.zeros(4, 4, 3, 3)}), "hada_t1 or hada_t2 but not both"),
        (lambda s, k: s.update({f"{k}.lokr_t1": torch.zeros(4, 4, 3, 3)}), "LoKr with a Tucker-decomposed first"),
    ],
)
def test_malformed_lycoris_layers_are_named(edit_state, message, tiny_model, tmp_path):
    from adapter_corpus import _save, loha_state

    state = loha_state(tiny_model, seed=1, te=False)
    key = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
    edit_state(state, key)
    with pytest.raises(AdapterError, match=message):
        load(_save(tmp_path / "bad.safetensors", state)).payload.validate(tiny_model)


def test_sdxl_shaped_layers_name_sdxl(tiny_model, tmp_path):
    from adapter_corpus import _save, kohya_state

    state = kohya_state(tiny_model, seed=1, te=None)
    key = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight"
    state[key] = torch.zeros(4, 2048)
    with pytest.raises(AdapterError, match=r"but has \[4, 2048\] \(2048 wide, SDXL's text tokens"):
        load(_save(tmp_path / "xl.safetensors", state)).payload.validate(tiny_model)
