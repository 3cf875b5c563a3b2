"""Base-model loading: diffusers folders, single files both ways, hub ids offline, refusals."""

import json
import os
import pickle
import re
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from histolab import pipeline
from histolab.clip_tokenizer import CLIP_VOCAB_SIZE, tokenizer_for_vocab_size, write_clip_tokenizer
from histolab.embedded.architecture import SD15, TINY, build_components
from histolab.embedded.random_init import random_base
from histolab.errors import InvalidRequest, ModelNotFound, OfflineError, UnsafeFile
from histolab.files import sha256_file
from histolab.generation import GenerationRequest, generate
from histolab.pipeline import load_base
from histolab.single_file import (
    POSITION_IDS,
    expected_shapes,
    identify,
    load_single_file,
    read_shapes,
    save_single_file,
    to_ldm,
)


@pytest.fixture(scope="module")
def model():
    """A seeded TINY model with a VAE scaling factor of its own (not SD's 0.18215)."""
    m = random_base("tiny", seed=5)
    m.vae.register_to_config(scaling_factor=0.731)
    return m


@pytest.fixture(scope="module")
def single(model, tmp_path_factory):
    return save_single_file(model, tmp_path_factory.mktemp("sf") / "tiny.safetensors")


def assert_same_weights(a, b):
    for name in ("vae", "unet", "text_encoder"):
        sa, sb = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        assert sa.keys() == sb.keys(), name
        different = [k for k in sa if not torch.equal(sa[k], sb[k])]
        assert not different, f"{name}: {different[:3]}"


def same_image(a, b):
    req = GenerationRequest(prompt="an h&e stained histology image of skin", steps=2, guidance_scale=3.0, seed=4)
    x, y = generate(a, req)[0].image, generate(b, req)[0].image
    return np.array_equal(np.asarray(x), np.asarray(y))


def write_pickle_bomb(path: Path, marker: Path) -> None:
    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path.write_bytes(pickle.dumps({"state_dict": Payload()}, protocol=2))


# ------------------------------------------------------------ diffusers folder


def test_diffusers_folder_round_trip(model, tmp_path):
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    folder = tmp_path / "my-sd"
    StableDiffusionPipeline(
        vae=model.vae,
        text_encoder=model.text_encoder,
        tokenizer=model.tokenizer,
        unet=model.unet,
        scheduler=PNDMScheduler.from_config(model.scheduler_config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    ).save_pretrained(folder)
    loaded = load_base(folder)
    assert loaded.source == str(folder) and len(loaded.hash) == 64
    assert_same_weights(model, loaded)
    assert loaded.vae.config.scaling_factor == 0.731
    assert loaded.tokenizer("colon tissue").input_ids == model.tokenizer("colon tissue").input_ids
    assert loaded.scheduler_config["beta_schedule"] == "scaled_linear"
    assert same_image(model, loaded)


def test_folder_names_resolve_under_checkpoints(model, paths, tmp_path):
    save_single_file(model, paths.checkpoints / "mine.safetensors")
    assert load_base("mine.safetensors", paths=paths).source == str(paths.checkpoints / "mine.safetensors")


def test_folder_without_model_index(tmp_path):
    (tmp_path / "unet").mkdir()
    with pytest.raises(ModelNotFound, match=r"no model_index.json"):
        load_base(tmp_path)


def test_folder_missing_a_component(model, tmp_path):
    (tmp_path / "model_index.json").write_text("{}")
    model.unet.save_pretrained(tmp_path / "unet")
    with pytest.raises(ModelNotFound, match="has no vae/ folder"):
        load_base(tmp_path)


@pytest.mark.parametrize("src", ["/no/such/model.safetensors", "./missing-folder", "nothing-here"])
def test_missing_paths(src, paths):
    with pytest.raises(ModelNotFound, match=re.escape(f"no model at {src!r}")):
        load_base(src, paths=paths)


def test_embedded_default_missing(monkeypatch, tmp_path):
    monkeypatch.setattr(pipeline, "EMBEDDED_BASE_DIR", tmp_path / "embedded-base")
    with pytest.raises(ModelNotFound, match=r"embedded default model is missing(.|\n)*train_base"):
        load_base("embedded")


def test_hub_id_offline_names_the_folder(paths, monkeypatch, tmp_path):
    import huggingface_hub.constants as hub

    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))  # nothing cached
    with pytest.raises(OfflineError) as exc:
        load_base("stable-diffusion-v1-5/stable-diffusion-v1-5", paths=paths)
    msg = str(exc.value)
    target = paths.checkpoints / "stable-diffusion-v1-5"
    assert f"Put the model's diffusers folder at {target}" in msg
    assert "hf download stable-diffusion-v1-5/stable-diffusion-v1-5 " in msg and f"--local-dir {target}" in msg
    assert '--include "unet/diffusion_pytorch_model.safetensors"' in msg
    assert "load 'stable-diffusion-v1-5'" in msg


# ------------------------------------------------------------ single file


def test_single_file_round_trip_is_bit_exact(model, single):
    shapes, meta = read_shapes(single)
    assert all(
        k.startswith(("model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer.")) for k in shapes
    )
    assert meta["histolab.architecture"] == "tiny" and meta["modelspec.sai_model_spec"] == "1.0.0"
    loaded = load_base(single)
    assert loaded.source == str(single) and loaded.hash == sha256_file(single)
    assert_same_weights(model, loaded)
    assert loaded.vae.config.scaling_factor == 0.731  # carried in the file's metadata
    assert loaded.scheduler_config == model.scheduler_config
    assert loaded.tokenizer("a photo of skin").input_ids == model.tokenizer("a photo of skin").input_ids
    assert same_image(model, loaded)
    # Saving the loaded model again gives the same tensors.
    again = save_single_file(loaded, single.with_name("again.safetensors"))
    from safetensors.torch import load_file

    a, b = load_file(single), load_file(again)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_diffusers_reads_our_export_offline(model, single, tmp_path):
    """An independent reader: diffusers' from_single_file with local configs gives the same weights."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    model.unet.save_config(tmp_path / "unet")
    model.vae.save_config(tmp_path / "vae")
    kw = {"config": str(tmp_path), "local_files_only": True}
    unet = UNet2DConditionModel.from_single_file(str(single), subfolder="unet", **kw)
    vae = AutoencoderKL.from_single_file(str(single), subfolder="vae", **kw)
    for ours, theirs in ((model.unet, unet), (model.vae, vae)):
        sa, sb = ours.state_dict(), theirs.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_fp16_export_and_dtype_on_load(model, tmp_path):
    path = save_single_file(model, tmp_path / "half.safetensors", dtype=torch.float16)
    assert {v for k, v in json.loads(_header_json(path)).items() if k != "__metadata__" for v in [v["dtype"]]} == {
        "F16",
        "I64",  # position ids stay integers
    }
    loaded = load_single_file(path, dtype=torch.float32)
    assert next(loaded.unet.parameters()).dtype == torch.float32
    ref = model.unet.state_dict()
    got = loaded.unet.state_dict()
    assert all(torch.equal(ref[k].half().float(), got[k]) for k in ref)


def _header_json(path) -> str:
    raw = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return raw[8 : 8 + n].decode()


def test_old_text_encoder_key_layout_and_ckpt_files(model, tmp_path):
    """2022-era files name the text encoder without 'text_model.'; .ckpt wraps tensors in 'state_dict'."""
    tensors = {k: v.clone() for k, v in to_ldm(model.vae, model.unet, model.text_encoder).items()}
    old = {
        k.replace("cond_stage_model.transformer.text_model.", "cond_stage_model.transformer."): v
        for k, v in tensors.items()
    }
    save_file(old, str(tmp_path / "old.safetensors"))
    assert_same_weights(model, load_single_file(tmp_path / "old.safetensors"))
    torch.save({"state_dict": tensors, "global_step": 470000}, tmp_path / "model.ckpt")
    assert_same_weights(model, load_base(tmp_path / "model.ckpt"))


def test_sd15_key_mapping_without_allocating():
    """SD 1.5's LDM names and shapes, on the meta device, both ways through diffusers' converters."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModel

    with init_empty_weights():
        vae, unet = AutoencoderKL(**SD15.vae), UNet2DConditionModel(**SD15.unet)
        te = CLIPTextModel(CLIPTextConfig(**SD15.text_encoder))
    assert next(unet.parameters()).device.type == "meta"
    ldm = to_ldm(vae, unet, te)
    n = len(unet.state_dict()) + len(vae.state_dict()) + len(te.state_dict()) + 1
    assert len(ldm) == n  # one LDM name per tensor, plus CLIP's position ids
    # Names and shapes as they are in SD 1.5 checkpoints (v1-5-pruned-emaonly.safetensors).
    known = {
        "model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3),
        "model.diffusion_model.time_embed.0.weight": (1280, 320),
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 768),
        "model.diffusion_model.input_blocks.3.0.op.weight": (320, 320, 3, 3),
        "model.diffusion_model.middle_block.1.proj_in.weight": (1280, 1280, 1, 1),
        "model.diffusion_model.output_blocks.2.1.conv.weight": (1280, 1280, 3, 3),
        "model.diffusion_model.output_blocks.5.2.conv.weight": (1280, 1280, 3, 3),
        "model.diffusion_model.output_blocks.11.0.skip_connection.weight": (320, 640, 1, 1),
        "model.diffusion_model.out.2.weight": (4, 320, 3, 3),
        "first_stage_model.encoder.mid.attn_1.q.weight": (512, 512, 1, 1),
        "first_stage_model.decoder.up.3.upsample.conv.weight": (512, 512, 3, 3),
        "first_stage_model.decoder.up.0.block.0.nin_shortcut.weight": (128, 256, 1, 1),
        "first_stage_model.quant_conv.weight": (8, 8, 1, 1),
        "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": (49408, 768),
        "cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc2.weight": (768, 3072),
        POSITION_IDS: (1, 77),
    }
    assert {k: tuple(ldm[k].shape) for k in known} == known
    # diffusers' own LDM -> diffusers converters take our names back to every tensor.
    for module, converted in (
        (unet, convert_ldm_unet_checkpoint(ldm, dict(unet.config))),
        (vae, convert_ldm_vae_checkpoint(ldm, dict(vae.config))),
    ):
        want = {k: tuple(v.shape) for k, v in module.state_dict().items()}
        assert {k: tuple(v.shape) for k, v in converted.items()} == want
    assert identify(expected_shapes("sd15")) is SD15


def test_sd15_checkpoints_get_clips_real_tokenizer():
    tok = tokenizer_for_vocab_size(CLIP_VOCAB_SIZE)
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    ids = tok("a photo of a cat", padding="max_length", max_length=77).input_ids
    assert len(ids) == 77 and ids[7:] == [49407] * 70  # SD 1.5 pads with <|endoftext|>
    assert len(tok) == 49408 and tok.convert_ids_to_tokens([0, 255, 256, 511]) == ["!", "Ń", "!</w>", "Ń</w>"]
    assert tokenizer_for_vocab_size(1280)("a photo of skin").input_ids[0] == 1278


def test_clip_vocab_files(tmp_path):
    out = write_clip_tokenizer(tmp_path)
    vocab = json.loads((out / "vocab.json").read_text())
    assert len(vocab) == 49408 and vocab["<|startoftext|>"] == 49406 and vocab["<|endoftext|>"] == 49407
    merges = (out / "merges.txt").read_text().splitlines()
    assert merges[0] == "#version: 0.2" and len(merges) == 1 + 48894 and merges[1] == "i n"
    assert vocab["in"] == 512  # the first merge follows the 512 byte symbols


# ------------------------------------------------------------ refusals


def fake_checkpoint(path: Path, keys: dict[str, tuple[int, ...]]) -> Path:
    save_file({k: torch.zeros(s) for k, s in keys.items()}, str(path))
    return path


def test_sdxl_and_sd2_are_refused_by_name(tmp_path):
    unet = {"model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3)}
    xl = fake_checkpoint(
        tmp_path / "xl.safetensors",
        {**unet, "conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias": (1280,)},
    )
    with pytest.raises(InvalidRequest, match=r"xl.safetensors is an SDXL checkpoint"):
        load_base(xl)
    sd2 = fake_checkpoint(
        tmp_path / "sd2.safetensors", {**unet, "cond_stage_model.model.token_embedding.weight": (4, 8)}
    )
    with pytest.raises(InvalidRequest, match=r"Stable Diffusion 2.x"):
        load_base(sd2)
    lora = fake_checkpoint(tmp_path / "l.safetensors", {"lora_unet_down_blocks_0.lora_down.weight": (4, 8)})
    with pytest.raises(InvalidRequest, match="a LoRA, not a base model"):
        load_base(lora)


def test_other_sd1_shapes_are_refused_naming_the_mismatch(tmp_path):
    from dataclasses import replace

    wide = replace(
        TINY,
        name="wide",
        unet={**TINY.unet, "cross_attention_dim": 48},
        text_encoder={**TINY.text_encoder, "hidden_size": 48},
    )
    vae, unet, te = build_components(wide, seed=0)
    model = type("M", (), {"vae": vae, "unet": unet, "text_encoder": te, "scheduler_config": dict(TINY.scheduler)})
    path = save_single_file(model, tmp_path / "wide.safetensors")
    with pytest.raises(InvalidRequest) as exc:
        load_base(path)
    msg = str(exc.value)
    assert "Closest is 'tiny'" in msg and "cross-attention width 48 (theirs 32)" in msg
    assert "text encoder width 48 (theirs 32)" in msg
    # A U-Net with 9 input channels is SD's inpainting variant.
    shapes = dict(expected_shapes("tiny"))
    shapes["model.diffusion_model.input_blocks.0.0.weight"] = (16, 9, 3, 3)
    with pytest.raises(InvalidRequest, match=r"inpainting(.|\n)*U-Net input channels 9 \(theirs 4\)"):
        identify(shapes, "inpaint.safetensors")
    no_vae = {k: v for k, v in expected_shapes("tiny").items() if not k.startswith("first_stage_model.")}
    with pytest.raises(InvalidRequest, match="has no VAE"):
        identify(no_vae)


def test_pickle_renamed_safetensors_is_refused_by_content(tmp_path):
    marker = tmp_path / "pwned"
    bomb = tmp_path / "model.safetensors"
    write_pickle_bomb(bomb, marker)
    with pytest.raises(UnsafeFile, match=r"named .safetensors but its content is pickle"):
        load_base(bomb)
    # Under its true name it reaches torch.load(weights_only=True), which refuses the payload.
    ckpt = bomb.rename(tmp_path / "model.ckpt")
    with pytest.raises(UnsafeFile, match="refused to load"):
        load_base(ckpt)
    assert not marker.exists()


def test_other_content_is_refused(tmp_path):
    (tmp_path / "notes.safetensors").write_text("not a model at all, just text")
    with pytest.raises(UnsafeFile, match="content is unknown"):
        load_base(tmp_path / "notes.safetensors")
    (tmp_path / "x.bin").write_bytes(b"")
    with pytest.raises(UnsafeFile, match="content looks empty"):
        load_single_file(tmp_path / "x.bin")


def test_truncated_safetensors_is_refused(single, tmp_path):
    raw = single.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(raw[: len(raw) - 1000])
    with pytest.raises(UnsafeFile, match="truncated"):
        load_base(cut)
