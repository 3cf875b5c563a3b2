"""The FID network: weights read offline without running TorchScript, proven equal to torch-fidelity's."""

from __future__ import annotations

import io
import pickle
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from histolab.errors import UnsafeFile
from histolab.evaluation.extractors import INCEPTION_SIZE, InceptionExtractor, resize_for_inception
from histolab.evaluation.inception_net import FIDInceptionV3, conv_layers, load_logits_head
from histolab.evaluation.inception_weights import (
    DEFAULT_1_SHA256,
    build_fid_inception,
    default_1_state_dict,
    locate_default_1,
    read_torchscript_tensors,
)
from histolab.files import sha256_file


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("histolab-cache")


@pytest.fixture(scope="module")
def fid_model(cache):
    mp = pytest.MonkeyPatch()
    mp.setenv("HISTOLAB_CACHE", str(cache))
    try:
        yield build_fid_inception()
    finally:
        mp.undo()


def _images(n: int, size: int = 64, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, size=(n, 8, 8, 3), dtype=np.uint8)
    # Smooth-ish images (upsampled noise), not pure noise: closer to what the network was made for.
    return [Image.fromarray(b).resize((size, size), Image.BILINEAR) for b in base]


def test_default_1_is_the_pinned_file():
    path = locate_default_1()
    assert sha256_file(path) == DEFAULT_1_SHA256


def test_archive_read_without_running_torchscript_maps_every_layer(fid_model, cache):
    flat = read_torchscript_tensors(locate_default_1())
    tensors = [k for k, v in flat.items() if isinstance(v, torch.Tensor)]
    assert len(tensors) == 94 * 4  # 94 convolutions: weight, beta, mean, var
    assert len(conv_layers(fid_model)) == 94
    assert sum(t.numel() for t in fid_model.state_dict().values()) == sum(flat[k].numel() for k in tensors)
    # The converted weights were cached as safetensors, keyed by the source's hash.
    cached = list((cache / "inception").glob("*.safetensors"))
    assert len(cached) == 1 and DEFAULT_1_SHA256[:16] in cached[0].name


def test_cached_weights_equal_a_fresh_conversion(fid_model, cache, monkeypatch):
    monkeypatch.setenv("HISTOLAB_CACHE", str(cache))
    again = default_1_state_dict()
    for k, v in fid_model.state_dict().items():
        assert torch.equal(again[k], v), k


@pytest.fixture(scope="module")
def inputs_299():
    return [im.resize((299, 299), Image.BILINEAR) for im in _images(2, seed=1)]


@pytest.fixture(scope="module")
def ours_batched(fid_model, inputs_299):
    return InceptionExtractor(model=fid_model).features(inputs_299)


def test_features_equal_torch_fidelity_inception_with_the_same_weights(fid_model, inputs_299, ours_batched, tmp_path):
    """The proof that this is the standard FID network: torch-fidelity's own implementation agrees."""
    from histolab.evaluation.torch_fidelity_compat import torch_fidelity_extractor

    reference = torch_fidelity_extractor(fid_model, tmp_path)
    x = torch.from_numpy(np.stack([np.asarray(im) for im in inputs_299]).transpose(0, 3, 1, 2).copy())
    with torch.no_grad():
        theirs = reference(x)[0].numpy()  # uint8 299 x 299: its resize is the identity, as ours
    assert ours_batched.shape == (2, 2048)
    rel = float(np.linalg.norm(ours_batched - theirs) / np.linalg.norm(theirs))
    assert rel < 1e-5, rel
    assert float(np.linalg.norm(theirs)) > 1.0  # real activations, not an all-zero agreement


def test_extractor_does_not_depend_on_batch_size(fid_model, inputs_299, ours_batched):
    ex = InceptionExtractor(model=fid_model)
    one_by_one = np.concatenate([ex.features([im]) for im in inputs_299])
    np.testing.assert_allclose(ours_batched, one_by_one, rtol=1e-4, atol=1e-5)


def test_one_resize_path_pil_bicubic_on_float_channels():
    img = _images(1, size=64)[0]
    out = resize_for_inception(img)
    assert out.shape == (INCEPTION_SIZE, INCEPTION_SIZE, 3) and out.dtype == np.float32
    ch = np.asarray(img, dtype=np.float32)[:, :, 1]
    ref = np.asarray(Image.fromarray(ch, mode="F").resize((299, 299), Image.BICUBIC)).clip(0, 255)
    np.testing.assert_array_equal(out[:, :, 1], ref)
    # Not rounded back to 8 bits (clean-fid's point), and a 299 px image passes unchanged.
    assert not np.allclose(out, np.round(out))
    big = Image.fromarray(np.asarray(img.resize((299, 299))))
    np.testing.assert_array_equal(resize_for_inception(big), np.asarray(big, dtype=np.float32))


def _archive(tmp_path, payload: bytes):
    path = tmp_path / "evil.pt"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", payload)
        zf.writestr("archive/version", "3")
    return path


def test_restricted_reader_refuses_code_in_the_pickle(tmp_path):
    class Evil:
        def __reduce__(self):
            import os

            return (os.system, ("echo pwned > /dev/null",))

    path = _archive(tmp_path, pickle.dumps({"x": Evil()}, protocol=2))
    with pytest.raises(UnsafeFile, match=r"refused global (posix|os)\.system"):
        read_torchscript_tensors(path)


def test_restricted_reader_refuses_a_storage_of_the_wrong_size(tmp_path):
    buf = io.BytesIO()
    torch.save({"w": torch.zeros(4)}, buf)  # a torch zip: data.pkl + data/0
    with zipfile.ZipFile(io.BytesIO(buf.getvalue())) as src:
        names = src.namelist()
        pkl = src.read(next(n for n in names if n.endswith("data.pkl")))
    path = tmp_path / "short.pt"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", pkl)
        zf.writestr("archive/data/0", b"\0" * 8)  # 2 floats where the pickle says 4
    with pytest.raises(UnsafeFile, match="bytes for 4 floats"):
        read_torchscript_tensors(path)


def test_logits_head_is_checked_against_the_trunk(fid_model, tmp_path):
    from safetensors.torch import save_file

    w = torch.randn(1008, 2048) * 0.01
    good = tmp_path / "head.safetensors"
    save_file({"fc.weight": w, "Conv2d_1a_3x3.conv.weight": fid_model.conv.weight.clone()}, str(good))
    model = FIDInceptionV3()
    model.load_state_dict(fid_model.state_dict())
    load_logits_head(model, good)
    f = torch.rand(3, 2048)
    assert torch.allclose(model.logits(f), f.double() @ w.double().T)
    bad = tmp_path / "other.safetensors"
    save_file({"fc.weight": w, "Conv2d_1a_3x3.conv.weight": torch.randn(32, 3, 3, 3)}, str(bad))
    with pytest.raises(UnsafeFile, match="belongs to another model"):
        load_logits_head(model, bad)
