"""The embedded default encoder: shipped, loadable by content, and its embeddings
separate the bundled tissue classes on held-out bands where a random-init
network of the same shape does not."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file

from histolab.data import bundled
from histolab.encoders import DEFAULT_ENCODER, ImageEncoder, get_encoder
from histolab.encoders.embedded import EMBEDDED_ENCODER_DIR, WEIGHTS_FILE, load_embedded_encoder, random_init_encoder
from histolab.encoders.embedded_net import EmbeddedNet
from histolab.encoders.separation import separation_report
from histolab.errors import UnsafeFile
from histolab.files import sha256_file

# Pass marks. A random-init network of the same shape reaches about 0.75-0.86
# k-NN balanced accuracy (colour alone carries much of the signal: these are
# three differently stained images), a silhouette near 0 and about 0.6-0.7 on
# greyscale; the marks sit well above that and below the trained encoder.
KNN_MIN = 0.95
SILHOUETTE_MIN = 0.30
GREY_KNN_MIN = 0.90


@pytest.fixture(scope="module")
def encoder():
    return get_encoder("embedded")


@pytest.fixture(scope="module")
def trained_report(encoder):
    return separation_report(encoder, splits=("test",))


def test_default_encoder_is_the_shipped_embedded_one(encoder):
    assert DEFAULT_ENCODER == "embedded"
    assert isinstance(encoder, ImageEncoder)
    weights = EMBEDDED_ENCODER_DIR / WEIGHTS_FILE
    assert encoder.name == "embedded" and encoder.dim == 256
    assert encoder.weights_hash == sha256_file(weights)
    manifest = json.loads((EMBEDDED_ENCODER_DIR / "manifest.json").read_text())
    assert manifest["sha256"] == encoder.weights_hash and manifest["size_bytes"] == weights.stat().st_size
    assert weights.stat().st_size < 3 * 1024 * 1024
    assert manifest["architecture"]["parameters"] == sum(p.numel() for p in EmbeddedNet().parameters())
    assert manifest["captures"] and manifest["does_not_capture"]


def test_encode_contract(encoder):
    crops = [bundled.load_crop(c) for c in bundled.crops("test", 32)[:5]]
    emb = encoder.encode(crops)
    assert emb.shape == (5, 256) and emb.dtype == torch.float32 and emb.device.type == "cpu"
    assert not emb.requires_grad and torch.isfinite(emb).all()
    # Batched and one-by-one agree; arrays and PIL images give the same result.
    one = torch.cat([encoder.encode([c]) for c in crops])
    torch.testing.assert_close(emb, one, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(encoder.encode([np.asarray(crops[0])]), emb[:1], rtol=1e-4, atol=1e-5)


def test_embeddings_can_train_a_projector(encoder):
    # The foundation-embedding adapter trains on these: they must be ordinary
    # (no-grad, not inference-mode) tensors that autograd can save.
    emb = encoder.encode([bundled.load_crop(c) for c in bundled.crops("test", 64)[:2]])
    proj = torch.nn.Linear(256, 4)
    proj(emb).pow(2).sum().backward()
    assert proj.weight.grad is not None and torch.isfinite(proj.weight.grad).all()


def test_transform_resizes_and_centre_crops(encoder):
    rng = np.random.default_rng(0)
    big = Image.fromarray(rng.integers(0, 256, (128, 192, 3), dtype=np.uint8))
    x = encoder.transform([big])
    assert x.shape == (1, 3, 64, 64)
    # Shorter side 128 -> 64 (x0.5), then the central 64 of the 96 px wide result.
    ref = big.resize((96, 64), Image.Resampling.BILINEAR).crop((16, 0, 80, 64))
    mean, std = torch.tensor([0.62, 0.47, 0.55]), torch.tensor([0.21, 0.25, 0.22])
    expect = (torch.from_numpy(np.asarray(ref, dtype=np.float32) / 255).permute(2, 0, 1) - mean[:, None, None]) / std[
        :, None, None
    ]
    torch.testing.assert_close(x[0], expect)


def test_embeddings_separate_tissue_classes_on_the_test_band(trained_report):
    test, grey = trained_report["test"], trained_report["test_grey"]
    assert test["knn_balanced_accuracy"] >= KNN_MIN, test
    assert test["linear_probe_balanced_accuracy"] >= KNN_MIN, test
    assert test["silhouette_cosine"] >= SILHOUETTE_MIN, test
    assert min(test["knn_recall"].values()) >= 0.9, test
    # Morphology, not only colour: greyscale references and queries.
    assert grey["knn_balanced_accuracy"] >= GREY_KNN_MIN, grey


@pytest.mark.parametrize("seed", [0, 1])
def test_random_init_of_the_same_shape_fails_the_marks(seed):
    report = separation_report(random_init_encoder(seed), splits=("test",))
    test, grey = report["test"], report["test_grey"]
    assert test["knn_balanced_accuracy"] < KNN_MIN, test
    assert test["silhouette_cosine"] < SILHOUETTE_MIN, test
    assert grey["knn_balanced_accuracy"] < GREY_KNN_MIN, grey


def orientation_stability(enc) -> tuple[float, float]:
    """A rotated and flipped test crop against all unrotated ones: (mean share of other
    crops that are less similar to it than its own original, share with the original in the top 5)."""
    crops = [bundled.load_crop(c) for c in bundled.crops("test", 48)]
    turned = [im.transpose(Image.Transpose.ROTATE_90).transpose(Image.Transpose.FLIP_LEFT_RIGHT) for im in crops]
    a, b = F.normalize(enc.encode(crops), dim=1), F.normalize(enc.encode(turned), dim=1)
    sim = b @ a.T
    own = sim.diag()
    off = ~torch.eye(len(crops), dtype=torch.bool)
    beaten = ((sim < own[:, None]) & off).sum(1).float() / (len(crops) - 1)
    rank = ((sim > own[:, None]) & off).sum(1)
    return float(beaten.mean()), float((rank < 5).float().mean())


def test_patches_keep_their_identity_under_rotation_and_flip(encoder):
    # Different patches must give different embeddings (reference-patch
    # conditioning depends on it) while orientation must not matter. Crops
    # 48 px apart can share a neighbourhood, which training pulls together on
    # purpose, so the nearest crop is not always the original itself.
    beaten, top5 = orientation_stability(encoder)
    assert beaten >= 0.95 and top5 >= 0.85, (beaten, top5)
    beaten_random, _ = orientation_stability(random_init_encoder(0))
    assert beaten_random < 0.95, beaten_random


def test_tampered_weights_are_refused(tmp_path):
    state = load_file(str(EMBEDDED_ENCODER_DIR / WEIGHTS_FILE))
    bad = dict(state)
    bad["features.0.weight"] = bad["features.0.weight"].clone()
    bad["features.0.weight"][0, 0, 0, 0] = float("nan")
    save_file(bad, str(tmp_path / "nan.safetensors"))
    with pytest.raises(UnsafeFile, match=r"features.0.weight.*NaN"):
        load_embedded_encoder(tmp_path / "nan.safetensors")
    bad = dict(state)
    bad["features.3.weight"] = torch.zeros(8, 8, 3, 3, dtype=torch.float16)
    save_file(bad, str(tmp_path / "shape.safetensors"))
    with pytest.raises(UnsafeFile, match=r"features.3.weight: shape \[8, 8, 3, 3\] in the file, \[32, 32, 3, 3\]"):
        load_embedded_encoder(tmp_path / "shape.safetensors")


def test_training_is_deterministic():
    from histolab.encoders.train_embedded import train

    def run(seed):
        net, _ = train(steps=2, batch=8, lr=2e-3, temperature=0.2, seed=seed, monitor=False, log=lambda _: None)
        return net.state_dict()

    a, b, c = run(0), run(0), run(1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a if a[k].is_floating_point())
