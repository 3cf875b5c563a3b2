"""DreamBooth: a fine-tuned pipeline folder, a U-Net + text-encoder folder, an LDM single file;
strength interpolation; exact restore; wrong architecture and broken weights refused."""

import copy
import dataclasses

import numpy as np
import pytest
import torch
from adapters_testkit import assert_restored, ldm_vae_state, pixels, save_pipeline, save_safetensors, snapshot

from histolab.adapters.kohya import ldm_unet_state_dict_names
from histolab.adapters.manifest import Manifest, base_info, write_manifest
from histolab.errors import AdapterError, UnsafeFile


@pytest.fixture(scope="module")
def tuned(tiny_model):
    """The tiny base with its networks moved by seeded noise (a 'fine-tune'; the VAE too, to see it swapped)."""
    m = dataclasses.replace(
        tiny_model,
        unet=copy.deepcopy(tiny_model.unet),
        text_encoder=copy.deepcopy(tiny_model.text_encoder),
        vae=copy.deepcopy(tiny_model.vae),
        applied=[],
        conditioners={},
    )
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for net in (m.unet, m.text_encoder, m.vae):
            for p in net.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.02)
    return m


def single_file(model, path, vae=True):
    """An LDM / SD-webui single-file checkpoint of ``model``: U-Net, text encoder and VAE."""
    names = ldm_unet_state_dict_names(model.unet)
    state = {names[k]: v for k, v in model.unet.state_dict().items()}
    state.update({f"cond_stage_model.transformer.{k}": v for k, v in model.text_encoder.state_dict().items()})
    if vae:
        state.update(ldm_vae_state(model.vae))
    return save_safetensors(path, state)


def test_every_layout_reproduces_the_fine_tune(tiny_model, tuned, tmp_path):
    pipeline = save_pipeline(tuned, tmp_path / "pipeline")
    unet_te = tmp_path / "unet_te"
    tuned.unet.save_pretrained(unet_te / "unet")
    tuned.text_encoder.save_pretrained(unet_te / "text_encoder")
    tuned.vae.save_pretrained(unet_te / "vae")
    write_manifest(unet_te, Manifest(kind="dreambooth", name="dreambooth-colon", base=base_info(tiny_model)))
    single = single_file(tuned, tmp_path / "sks-colon.safetensors")

    snap = snapshot(tiny_model)
    want = pixels(tuned)
    base = pixels(tiny_model)
    assert not np.array_equal(want, base)
    for src in (pipeline, unet_te, single):
        assert np.array_equal(pixels(tiny_model, [(src, 1.0)]), want), src.name
    assert np.array_equal(pixels(tiny_model, [(single, 0.0)]), base)
    half = pixels(tiny_model, [(unet_te, 0.5)])
    assert not np.array_equal(half, base) and not np.array_equal(half, want)
    assert_restored(tiny_model, snap)
    assert np.array_equal(pixels(tiny_model), base)


def test_a_unet_only_folder_keeps_the_base_text_encoder(tiny_model, tuned, tmp_path):
    tuned.unet.save_pretrained(tmp_path / "only_unet")  # config.json + diffusion_pytorch_model.safetensors
    from histolab.adapters.loader import locate, open_located

    a = open_located(locate(tmp_path / "only_unet"))
    assert a.kind == "dreambooth" and set(a.payload.sources) == {"unet"}
    snap = snapshot(tiny_model)
    assert not np.array_equal(pixels(tiny_model, [(tmp_path / "only_unet", 1.0)]), pixels(tiny_model))
    assert_restored(tiny_model, snap)


def test_another_architecture_is_refused_by_key_and_shape(tiny_model, tmp_path):
    from diffusers import UNet2DConditionModel

    from histolab.embedded.architecture import TINY

    other = UNet2DConditionModel(**{**TINY.unet, "cross_attention_dim": 48})
    other.save_pretrained(tmp_path / "wide" / "unet")
    snap = snapshot(tiny_model)
    with pytest.raises(AdapterError, match=r"attn2.to_k.weight must have shape \[32, 32\].*but has \[32, 48\]"):
        pixels(tiny_model, [(tmp_path / "wide", 1.0)])
    assert_restored(tiny_model, snap)


def test_broken_weights_in_the_second_adapter_change_nothing(tiny_model, tuned, tmp_path):
    from adapters_testkit import kohya_lora_state

    lora = save_safetensors(tmp_path / "lora.safetensors", kohya_lora_state(tiny_model))
    state = {f"cond_stage_model.transformer.{k}": v for k, v in tuned.text_encoder.state_dict().items()}
    names = ldm_unet_state_dict_names(tuned.unet)
    state.update({names[k]: v.clone() for k, v in tuned.unet.state_dict().items()})
    state[names["conv_in.weight"]][0, 0, 0, 0] = float("inf")
    bad = save_safetensors(tmp_path / "bad.safetensors", state)
    snap = snapshot(tiny_model)
    with pytest.raises(UnsafeFile, match="non-finite values"):
        pixels(tiny_model, [(lora, 1.0), (bad, 1.0), (lora, 0.5)])
    assert_restored(tiny_model, snap)


def test_the_ldm_layout_used_here_is_the_one_diffusers_converts(tiny_model):
    """The test's single files follow the LDM layout exactly: diffusers' converters give every tensor back."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    names = ldm_unet_state_dict_names(tiny_model.unet)
    unet = convert_ldm_unet_checkpoint(
        {names[k]: v for k, v in tiny_model.unet.state_dict().items()}, dict(tiny_model.unet.config)
    )
    vae = convert_ldm_vae_checkpoint(ldm_vae_state(tiny_model.vae), dict(tiny_model.vae.config))
    for got, net in ((unet, tiny_model.unet), (vae, tiny_model.vae)):
        want = net.state_dict()
        assert got.keys() == want.keys() and all(torch.equal(got[k], v) for k, v in want.items())
