"""UNI2-h and UNI: published architectures (built on the meta device, no memory),
weights found locally or refused with a clear message, validated before loading."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from histolab.config import Paths
from histolab.encoders import get_encoder, list_encoders
from histolab.encoders.uni import UNI, UNI2_H, load_timm_encoder
from histolab.errors import InvalidRequest, OfflineError, UnsafeFile
from histolab.files import sha256_file

# A shallow, narrow copy of each published configuration: every structural
# feature (register tokens, SwiGLU, layer scale, no class pos-embed) kept.
SMALL = {"uni2-h": dict(depth=2, embed_dim=48, num_heads=4), "uni": dict(depth=2, embed_dim=32, num_heads=4)}


def vit_params(*, dim, depth, patch, mlp_hidden, glu, reg_tokens, pos_tokens, layer_scale=True) -> int:
    """Parameters of a timm ViT, counted from its hyperparameters by hand (independent of timm)."""
    patch_embed = dim * 3 * patch * patch + dim
    tokens = dim * (1 + reg_tokens) + dim * pos_tokens  # cls + registers + position embeddings
    fc1_out = 2 * mlp_hidden if glu else mlp_hidden
    block = (
        2 * dim  # norm1
        + dim * 3 * dim
        + 3 * dim  # qkv
        + dim * dim
        + dim  # proj
        + 2 * dim  # norm2
        + dim * fc1_out
        + fc1_out  # fc1 (SwiGLUPacked: gate and value in one matrix)
        + mlp_hidden * dim
        + dim  # fc2
        + (2 * dim if layer_scale else 0)  # ls1, ls2
    )
    return patch_embed + tokens + depth * block + 2 * dim  # + final norm


@pytest.fixture(scope="module")
def meta_models():
    with torch.device("meta"):
        return {"uni2-h": UNI2_H.build(), "uni": UNI.build()}


def test_uni2h_architecture(meta_models):
    m = meta_models["uni2-h"]
    n = sum(p.numel() for p in m.parameters())
    # UNI2-h: 224 px / 14 = 16x16 = 256 patch positions (no_embed_class: no position for cls/registers),
    # SwiGLU hidden int(1536 * 5.33334) // 2 = 4096.
    assert n == vit_params(dim=1536, depth=24, patch=14, mlp_hidden=4096, glu=True, reg_tokens=8, pos_tokens=256)
    assert round(n / 1e6) == 681  # the model card's "681M"
    assert m.num_features == 1536 == UNI2_H.dim
    sd = m.state_dict()
    assert sd["reg_token"].shape == (1, 8, 1536) and sd["pos_embed"].shape == (1, 256, 1536)
    assert sd["blocks.23.mlp.fc1.weight"].shape == (8192, 1536) and sd["blocks.0.ls1.gamma"].shape == (1536,)
    assert isinstance(m.blocks[0].mlp.act, torch.nn.SiLU)
    out = m(torch.empty(2, 3, 224, 224, device="meta"))
    assert out.shape == (2, 1536)
    assert m(torch.empty(1, 3, 448, 448, device="meta")).shape == (1, 1536)  # dynamic_img_size


def test_uni_architecture(meta_models):
    m = meta_models["uni"]
    n = sum(p.numel() for p in m.parameters())
    assert n == vit_params(dim=1024, depth=24, patch=16, mlp_hidden=4096, glu=False, reg_tokens=0, pos_tokens=197)
    assert round(n / 1e6) == 303
    assert m.num_features == 1024 == UNI.dim
    assert m(torch.empty(2, 3, 224, 224, device="meta")).shape == (2, 1024)


@pytest.mark.parametrize("name", ["uni2-h", "uni"])
def test_offline_message_names_the_exact_path(tmp_path, name):
    paths = Paths.from_env({"HISTOLAB_DATA_DIR": str(tmp_path)})
    target = tmp_path / "checkpoints" / "encoders" / name / "pytorch_model.bin"
    for allow_hub in (True, False):
        with pytest.raises(OfflineError) as info:
            get_encoder(name, paths=paths, allow_hub=allow_hub)
        assert str(target) in str(info.value)
        assert "huggingface.co/MahmoodLab/" in str(info.value)


def test_unknown_encoder_name():
    with pytest.raises(InvalidRequest, match="uni2-h"):
        get_encoder("resnet50")


def test_list_encoders(tmp_path):
    paths = Paths.from_env({"HISTOLAB_DATA_DIR": str(tmp_path)})
    infos = list_encoders(paths)
    assert [i.name for i in infos] == ["embedded", "uni2-h", "uni"]
    assert infos[0].default and infos[0].available and infos[0].dim == 256
    assert not infos[1].available and infos[1].weights.endswith("encoders/uni2-h/pytorch_model.bin")
    f = tmp_path / "checkpoints" / "encoders" / "uni" / "model.safetensors"
    f.parent.mkdir(parents=True)
    f.write_bytes(b"")
    assert {i.name: i.available for i in list_encoders(paths)}["uni"]


def small_state(spec, seed=0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    model = spec.build(**SMALL[spec.name]).eval()
    return {k: v.contiguous() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("spec", [UNI2_H, UNI], ids=["uni2-h", "uni"])
def test_small_copy_loads_from_safetensors_and_weights_only_torch(tmp_path, spec):
    state = small_state(spec)
    st, pt = tmp_path / "model.safetensors", tmp_path / "pytorch_model.bin"
    save_file(state, str(st))
    torch.save(state, pt)
    img = [Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8))] * 3
    outs = []
    for f in (st, pt):
        enc = load_timm_encoder(spec, paths=Paths.from_env(), weights=f, **SMALL[spec.name])
        assert enc.weights_hash == sha256_file(f) and enc.name == spec.name
        emb = enc.encode(img)
        assert emb.shape == (3, SMALL[spec.name]["embed_dim"]) and emb.dtype == torch.float32
        assert not emb.requires_grad and emb.device.type == "cpu"
        outs.append(emb)
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
    # The same weights in a model built and loaded by plain timm/torch give the same embedding.
    ref = spec.build(**SMALL[spec.name]).eval()
    ref.load_state_dict(state)
    with torch.no_grad():
        torch.testing.assert_close(outs[0], ref(enc.transform(img)))


def test_wrong_shape_is_refused_by_name(tmp_path):
    state = small_state(UNI2_H)
    state["blocks.1.mlp.fc1.weight"] = torch.zeros(8, 48)
    f = tmp_path / "bad.safetensors"
    save_file(state, str(f))
    with pytest.raises(UnsafeFile) as info:
        load_timm_encoder(UNI2_H, paths=Paths.from_env(), weights=f, **SMALL["uni2-h"])
    msg = str(info.value)
    assert "UNI2-h weights refused" in msg and str(f) in msg
    assert "blocks.1.mlp.fc1.weight: shape [8, 48] in the file, [256, 48] expected" in msg


def test_other_architecture_is_refused_with_missing_and_extra_keys(tmp_path):
    # UNI (ViT-L layout, no register tokens) weights offered as UNI2-h.
    f = tmp_path / "uni.safetensors"
    save_file(small_state(UNI), str(f))
    with pytest.raises(UnsafeFile) as info:
        load_timm_encoder(UNI2_H, paths=Paths.from_env(), weights=f, **SMALL["uni2-h"])
    msg = str(info.value)
    assert "missing from the file: reg_token" in msg
    assert "pos_embed: shape [1, 197, 32] in the file, [1, 256, 48] expected" in msg


def test_full_size_local_file_is_validated_without_allocating(tmp_path):
    # A small file put where the real UNI2-h weights go: refused against the full (meta) model.
    paths = Paths.from_env({"HISTOLAB_DATA_DIR": str(tmp_path)})
    f = tmp_path / "checkpoints" / "encoders" / "uni2-h" / "pytorch_model.bin"
    f.parent.mkdir(parents=True)
    torch.save(small_state(UNI2_H), f)
    with pytest.raises(UnsafeFile) as info:
        get_encoder("uni2-h", paths=paths)
    msg = str(info.value)
    assert str(f) in msg and "blocks.0.norm1.weight: shape [48] in the file, [1536] expected" in msg
    assert "key(s) missing from the file: blocks.2." in msg


def test_nan_weights_refused(tmp_path):
    state = small_state(UNI)
    state["blocks.0.attn.qkv.weight"][0, 0] = float("nan")
    f = tmp_path / "nan.safetensors"
    save_file(state, str(f))
    with pytest.raises(UnsafeFile, match=r"blocks.0.attn.qkv.weight.*NaN"):
        load_timm_encoder(UNI, paths=Paths.from_env(), weights=f, **SMALL["uni"])


def test_transform_matches_the_model_card_pipeline():
    # Model card: Resize(224), CenterCrop(224), ToTensor(), Normalize(ImageNet mean/std), in torchvision.
    from torchvision import transforms

    from histolab.encoders.uni import TimmEncoder

    card = transforms.Compose(
        [
            transforms.Resize(224),
            transforms.CenterCrop(224),
            transforms.ToTensor(),
            transforms.Normalize(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)),
        ]
    )
    with torch.device("meta"):
        model = UNI.build(**SMALL["uni"])
    enc = TimmEncoder(UNI, model, "0" * 64)
    rng = np.random.default_rng(0)
    for size in [(64, 64), (300, 200), (500, 700)]:
        im = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
        x = enc.transform([im])
        assert x.shape == (1, 3, 224, 224)
        torch.testing.assert_close(x[0], card(im), rtol=0, atol=1e-5)
