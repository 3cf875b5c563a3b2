"""Every kind against Stable Diffusion 1.5's own shapes, on meta-device networks (no 4 GB of weights):
key mapping for kohya/SD-webui names in both spellings, shape validation with SDXL/SD2 misfits named,
hypernetwork widths, embeddings, an LDM single file; and one real run at SD-1.5 text width."""

import dataclasses
from collections import OrderedDict

import pytest
import torch
from adapters_testkit import kohya_lora_state, meta_model, snapshot

from histolab.adapters import dreambooth, hypernetwork, lora, textual_inversion
from histolab.adapters.edit import ModelEdit
from histolab.adapters.kohya import ldm_unet_state_dict_names
from histolab.errors import AdapterError


@pytest.fixture(scope="module")
def sd15():
    return meta_model("sd15")


def meta_like(state):
    return {k: torch.empty(v.shape, device="meta") for k, v in state.items()}


def test_kohya_names_in_both_spellings_resolve_on_sd15(sd15):
    every = lambda n, m: "attentions" in n or "resnets" in n or "samplers" in n  # noqa: E731
    d = meta_like(kohya_lora_state(sd15, rank=1, unet_filter=every, alpha=None))
    ldm = meta_like(kohya_lora_state(sd15, rank=1, unet_filter=every, alpha=None, names="ldm"))
    a = lora.from_state(d, {}, {}, "d").validate(sd15)
    b = lora.from_state(ldm, {}, {}, "ldm").validate(sd15)
    assert [(r.component, r.module) for r in a] == [(r.component, r.module) for r in b]
    assert len({r.module for r in a if r.component == "unet"}) == len({k.split(".")[0] for k in d if "unet" in k})
    assert sum(r.component == "text_encoder" for r in a) == 12 * 6  # q, k, v, out, fc1, fc2 per layer
    got = {r.key: r.module for r in b}
    # SD 1.5's LDM layout, spelled out: input block 4 is down block 1's first attention, output block 2 holds
    # up block 0's upsampler (after its resnet: no attention there), middle block 1 is the mid attention.
    assert (
        got["lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k"]
        == "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"
    )
    assert got["lora_unet_output_blocks_2_1_conv"] == "up_blocks.0.upsamplers.0.conv"
    assert got["lora_unet_output_blocks_5_2_conv"] == "up_blocks.1.upsamplers.0.conv"
    assert got["lora_unet_input_blocks_3_0_op"] == "down_blocks.0.downsamplers.0.conv"
    assert got["lora_unet_middle_block_1_proj_in"] == "mid_block.attentions.0.proj_in"
    assert got["lora_unet_output_blocks_11_0_skip_connection"] == "up_blocks.3.resnets.2.conv_shortcut"


def test_ldm_attention_names_agree_with_diffusers_converter(sd15):
    """diffusers' own kohya/SGM conversion is the reference for attention layers."""
    from diffusers.loaders.lora_conversion_utils import (
        _convert_non_diffusers_lora_to_diffusers,
        _maybe_map_sgm_blocks_to_diffusers,
    )

    ldm = meta_like(kohya_lora_state(sd15, rank=1, alpha=None, names="ldm", text_encoder=False))
    mine = {r.key: r.module for r in lora.from_state(ldm, {}, {}, "x").validate(sd15)}
    converted, _ = _convert_non_diffusers_lora_to_diffusers(
        _maybe_map_sgm_blocks_to_diffusers(dict(ldm), sd15.unet.config)
    )
    theirs = set()
    for k in converted:
        if k.endswith("down.weight"):
            k = k.removeprefix("unet.").removesuffix(".lora.down.weight").removesuffix("_lora.down.weight")
            k = k.replace(".processor.", ".")
            theirs.add(k + ".0" if k.endswith(".to_out") else k)
    assert theirs == set(mine.values())


def test_sdxl_and_sd2_shapes_are_named(sd15):
    state = meta_like(kohya_lora_state(sd15, rank=1, text_encoder=False, alpha=None))
    state["lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.lora_down.weight"] = torch.empty(
        1, 2048, device="meta"
    )
    state = {k.replace("down_blocks_1_attentions_0", "input_blocks_4_1"): v for k, v in state.items()}
    with pytest.raises(
        AdapterError,
        match=r"attn2_to_k: lora_down for unet.down_blocks.1.attentions.0.*must have shape \[1, 768\] but has \[1, 2048\]",
    ):
        lora.from_state(state, {}, {}, "xl").validate(sd15)
    deeper = {"lora_unet_input_blocks_4_1_transformer_blocks_1_attn1_to_q.lora_down.weight": torch.empty(1, 640)}
    deeper["lora_unet_input_blocks_4_1_transformer_blocks_1_attn1_to_q.lora_up.weight"] = torch.empty(640, 1)
    with pytest.raises(AdapterError, match="transformer_blocks_1_attn1_to_q"):  # SDXL has 2+ transformer blocks there
        lora.from_state(deeper, {}, {}, "xl").validate(sd15)
    sd2_ti = textual_inversion.from_state({"emb_params": torch.zeros(1, 1024)}, "x", "sd2")
    with pytest.raises(AdapterError, match=r"an SD 2\.x embedding"):
        sd2_ti.validate(sd15)
    textual_inversion.from_state({"emb_params": torch.zeros(4, 768)}, "sd15emb", "sd15").validate(sd15)


def test_hypernetwork_widths_on_sd15(sd15):
    opts = hypernetwork.HypernetworkOptions(layer_structure=[1.0, 1.0], activation_func=None)
    states = {
        w: tuple(OrderedDict(hypernetwork.HypernetworkModule(w, opts).state_dict()) for _ in "kv")
        for w in (768, 320, 640, 1280)
    }
    net = hypernetwork.Hypernetwork(opts, hypernetwork._build(states, opts, "sd15"), "sd-webui-pt")
    targets = net.validate(sd15)
    assert len(targets) == 32  # 16 transformer blocks: cross-attention (768) and self-attention (320/640/1280)
    assert sorted(set(targets.values())) == [320, 640, 768, 1280]
    before = dict(sd15.unet.attn_processors)
    edit = ModelEdit()
    net.apply(sd15, 1.0, edit)
    assert sum(isinstance(p, hypernetwork.HypernetworkAttnProcessor) for p in sd15.unet.attn_processors.values()) == 32
    edit.undo()
    assert all(sd15.unet.attn_processors[k] is v for k, v in before.items())
    only768 = hypernetwork.Hypernetwork(opts, {768: net.modules[768]}, "sd-webui-pt")
    assert all(k.endswith("attn2.processor") for k in only768.validate(sd15))


def test_single_file_checkpoint_maps_onto_sd15(sd15):
    names = ldm_unet_state_dict_names(sd15.unet)
    ldm = {names[k]: v for k, v in sd15.unet.state_dict().items()}
    ldm.update({f"cond_stage_model.transformer.{k}": v for k, v in sd15.text_encoder.state_dict().items()})
    db = dreambooth.DreamBooth({"single": []}, "single-file", _shapes={"single": ldm})
    comps = db.validate(sd15)
    assert len(comps["unet"]) == 686 and set(comps) == {"unet", "text_encoder"}
    sd2 = dict(ldm)
    key = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    sd2[key] = torch.empty(320, 1024, device="meta")  # SD 2's 1024-wide text tokens
    with pytest.raises(AdapterError, match=r"attn2.to_k.weight must have shape \[320, 768\].*but has \[320, 1024\]"):
        dreambooth.DreamBooth({"single": []}, "single-file", _shapes={"single": sd2}).validate(sd15)


def test_a_real_run_at_sd15_text_width(sd15):
    """Real tensors at SD 1.5's text width (768, 12 heads, MLP 3072), one layer: LoRA + a 3-vector embedding."""
    from transformers import CLIPTextConfig, CLIPTextModel

    from histolab.embedded.architecture import SD15

    torch.manual_seed(0)
    cfg = {**SD15.text_encoder, "num_hidden_layers": 1, "vocab_size": len(sd15.tokenizer)}
    te = CLIPTextModel(CLIPTextConfig(**cfg)).eval()
    model = dataclasses.replace(sd15, text_encoder=te, dtype=torch.float32, device="cpu", applied=[], conditioners={})
    snap = snapshot(model)
    lora_state = kohya_lora_state(model, rank=4, unet_filter=lambda n, m: False)
    base = model.encode_prompt(["sd15emb colon tissue"])
    edit = ModelEdit()
    lora.from_state(lora_state, {}, {}, "l").apply(model, 1.0, edit)
    textual_inversion.from_state({"emb_params": torch.randn(3, 768)}, "sd15emb", "t").apply(model, 1.0, edit)
    got = model.encode_prompt(["sd15emb colon tissue"])
    edit.undo()
    assert got.shape == base.shape == (1, 77, 768) and not torch.allclose(got, base)
    for k, v in snap["tensors"]["text_encoder"].items():
        assert torch.equal(model.text_encoder.state_dict()[k], v)
    assert model.tokenizer is snap["tokenizer"]
    assert torch.equal(model.encode_prompt(["sd15emb colon tissue"]), base)
