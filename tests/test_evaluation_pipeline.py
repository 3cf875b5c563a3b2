"""Evaluation end to end with a small protocol-conforming encoder: streaming, per class, reports,
per-epoch validation, guidance sweep, downstream utility, memorisation, CLI."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

from histolab.encoders.base import ImageEncoder
from histolab.evaluation.evaluate import EvalConfig
from histolab.evaluation.extractors import EncoderExtractor
from histolab.evaluation.features import ALL, SpaceFeatures, collect
from histolab.evaluation.images import images_from_pil, open_image_set
from histolab.evaluation.runner import evaluate_sets


class TinyEncoder:
    """An ImageEncoder: 8 x 8 thumbnail -> fixed random projection (seeded) -> tanh."""

    name = "tiny"
    dim = 12
    weights_hash = "0" * 64

    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.proj = torch.randn(8 * 8 * 3, self.dim, generator=g) / 8

    def transform(self, images):
        arr = np.stack(
            [np.asarray(im.convert("RGB").resize((8, 8), Image.BILINEAR), dtype=np.float32) for im in images]
        )
        return torch.from_numpy(arr / 255.0).permute(0, 3, 1, 2)

    def encode(self, images):
        x = self.transform(images).reshape(len(images), -1)
        return torch.tanh(x @ self.proj)


@pytest.fixture()
def tiny():
    enc = TinyEncoder()
    assert isinstance(enc, ImageEncoder)
    return EncoderExtractor(enc)


def _patches(n: int, label_shift: int, seed: int) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        a = rng.integers(0, 120, size=(16, 16, 3)).astype(np.int16)
        a[..., label_shift % 3] += 120
        out.append(Image.fromarray(a.clip(0, 255).astype(np.uint8)))
    return out


def _write_set(root, per_class: int, seed: int, classes=("red", "green", "blue")):
    for i, c in enumerate(classes):
        for j, im in enumerate(_patches(per_class, i, seed + i)):
            d = root / c
            d.mkdir(parents=True, exist_ok=True)
            im.save(d / f"{j:03d}.png")
    return root


def test_evaluation_does_not_depend_on_batch_size(tmp_path, tiny):
    real = open_image_set(_write_set(tmp_path / "real", 20, 0))
    fake = open_image_set(_write_set(tmp_path / "fake", 20, 100))
    reports = [
        evaluate_sets(real, fake, [tiny], EvalConfig(per_class=True, batch_size=bs, kid_subsets=5), warn=lambda m: None)
        for bs in (1, 7, 64)
    ]
    a = reports[0]["spaces"]["tiny"]
    assert a["overall"]["fd"] > 0 and set(a["per_class"]) == {"red", "green", "blue"}
    for other in reports[1:]:
        b = other["spaces"]["tiny"]
        for group in ("overall", "red", "green", "blue"):
            va = a["overall"] if group == "overall" else a["per_class"][group]
            vb = b["overall"] if group == "overall" else b["per_class"][group]
            for k in ("fd", "kid_mean", "kid_std", "precision", "recall", "vendi_fake"):
                # The encoder's float32 matmul rounds differently per batch shape (about 1e-7);
                # KID, a difference of large sums, amplifies that the most.
                assert vb[k] == pytest.approx(va[k], rel=1e-4, abs=1e-8), (group, k)


def test_identical_sets_and_small_set_warnings(tmp_path, tiny):
    real = open_image_set(_write_set(tmp_path / "real", 6, 0))
    warnings = []
    rep = evaluate_sets(real, real, [tiny], EvalConfig(per_class=True, kid_subsets=5), warn=warnings.append)
    overall = rep["spaces"]["tiny"]["overall"]
    assert overall["fd"] == pytest.approx(0.0, abs=1e-9)
    assert overall["precision"] == 1.0 and overall["recall"] == 1.0
    text = "\n".join(warnings)
    # 6 images per class in 12 dimensions: FD is biased at that size, and KID's subset size is cut.
    assert "biased upward at this size" in text and "/ red" in text
    assert "KID subset size 1000 > images available" in text
    assert rep["warnings"] == [w.removeprefix("warning: ") for w in warnings]


def test_space_features_round_trip(tmp_path, tiny):
    s = open_image_set(_write_set(tmp_path / "real", 5, 0))
    sf = collect([tiny], s, batch_size=4)["tiny"]
    back = SpaceFeatures.load(sf.save(tmp_path / "f.safetensors"))
    np.testing.assert_array_equal(back.features, sf.features)
    assert back.labels == sf.labels and back.names == sf.names
    for key in (ALL, "red"):
        np.testing.assert_array_equal(back.stats[key].cov, sf.stats[key].cov)
        np.testing.assert_array_equal(back.grams[key].g, sf.grams[key].g)


def test_memorisation_flags_a_copied_training_image(tmp_path, tiny):
    train = _write_set(tmp_path / "train", 15, 0)
    held_out = open_image_set(_write_set(tmp_path / "held", 15, 50))
    fake_dir = _write_set(tmp_path / "fake", 15, 100)
    copied = train / "green" / "004.png"
    (fake_dir / "green" / "copy.png").write_bytes(copied.read_bytes())
    rep = evaluate_sets(
        held_out,
        open_image_set(fake_dir),
        [tiny],
        EvalConfig(kid_subsets=3),
        train=open_image_set(train),
        warn=lambda m: None,
    )
    mem = rep["spaces"]["tiny"]["memorisation"]
    assert mem["closest_pairs"][0] == {
        "fake": "green/copy.png",
        "train": "green/004.png",
        "distance": 0.0,
        "near_copy": True,
    }
    assert mem["near_copies"] >= 1 and mem["near_copy_fraction"] < 0.2
    assert len(mem["pairs"]) == 46


def test_per_epoch_validation_caches_the_real_side(tmp_path, tiny, monkeypatch):
    from histolab.evaluation import validation

    real = _patches(12, 0, 0) + _patches(12, 1, 1)
    labels = ["a"] * 12 + ["b"] * 12
    cache = tmp_path / "ref.safetensors"
    ref = validation.ValidationReference.build(real, [tiny], labels=labels, cache_path=cache)
    calls = []
    original = validation.collect
    monkeypatch.setattr(validation, "collect", lambda *a, **k: calls.append(1) or original(*a, **k))
    again = validation.ValidationReference.build(real, [tiny], labels=labels, cache_path=cache)
    assert calls == []  # the cached real side was used
    np.testing.assert_array_equal(again.spaces["tiny"].features, ref.spaces["tiny"].features)
    # Different real images: the cache does not match, the features are recomputed.
    validation.ValidationReference.build(real[:-1], [tiny], labels=labels[:-1], cache_path=cache)
    assert calls == [1]
    history = []
    for epoch, shift in enumerate((2, 1, 0)):
        fake = _patches(12, shift, 10 + epoch) + _patches(12, shift + 1, 20 + epoch)
        history.append({"epoch": epoch, **validation.validation_metrics(ref, fake, labels=labels)})
    assert history[2]["tiny/fd"] < history[0]["tiny/fd"]  # the epoch whose images look like the real ones wins
    paths = validation.write_history(history, tmp_path / "run", metric="tiny/fd")
    assert [p.name for p in paths] == ["validation.json", "validation.csv", "fid_by_epoch.png"]
    assert Image.open(paths[2]).size[0] > 100


def test_guidance_sweep_in_text_mode(tmp_path, tiny, tiny_model):
    from histolab.evaluation.sweep import REFERENCE_SCALES, SweepConfig, parse_scales, sweep_guidance

    assert parse_scales("1.0:2.0:0.1") == REFERENCE_SCALES and len(REFERENCE_SCALES) == 11
    real = images_from_pil(_patches(6, 0, 0), ["x"] * 6, spec="real")
    cfg = SweepConfig(
        mode="prompt", scales=(1.0, 7.5), images_per_class=4, steps=1, batch_size=3, eval=EvalConfig(kid_subsets=3)
    )
    res = sweep_guidance(tiny_model, real, [tiny], cfg, prompts={"x": "an h&e patch"}, out_dir=tmp_path)
    assert [r["guidance"] for r in res["rows"]] == [1.0, 7.5]
    assert all(r["n_fake"] == 4 and r["tiny/fd"] > 0 for r in res["rows"])
    assert res["rows"][0]["tiny/fd"] != res["rows"][1]["tiny/fd"]
    assert res["best"]["guidance"] in (1.0, 7.5)
    assert {p.name for p in tmp_path.iterdir()} >= {"sweep.json", "sweep.csv", "fid_by_guidance.png"}


def test_reference_mode_sweep_needs_an_encoder_adapter(tiny, tiny_model):
    from histolab.errors import InvalidRequest
    from histolab.evaluation.sweep import SweepConfig, sweep_guidance

    real = images_from_pil(_patches(4, 0, 0), ["x"] * 4)
    with pytest.raises(InvalidRequest, match="reference mode needs a foundation-embedding adapter"):
        sweep_guidance(
            tiny_model, real, [tiny], SweepConfig(mode="reference", scales=(1.3,), images_per_class=2, steps=1)
        )


def test_downstream_utility_three_regimes(tmp_path):
    from histolab.evaluation.downstream import DownstreamConfig, downstream_utility

    def labelled(n, seed):
        ims, labs = [], []
        for k, c in enumerate(("r", "g")):
            ims += _patches(n, k, seed + k)
            labs += [c] * n
        return images_from_pil(ims, labs)

    cfg = DownstreamConfig(size=16, epochs=4, batch_size=8)
    res = downstream_utility(labelled(12, 0), labelled(12, 40), labelled(10, 80), cfg)
    assert list(res["results"]) == ["real", "real+synthetic", "synthetic"]
    assert res["results"]["real+synthetic"]["n_train"] == 48
    assert res["results"]["real"]["accuracy"] >= 0.9  # colour classes: trivially separable
    again = downstream_utility(labelled(12, 0), labelled(12, 40), labelled(10, 80), cfg)
    assert again["results"] == res["results"]  # seeded


def test_cli_evaluate_writes_json_csv_and_plots(tmp_path, tiny, monkeypatch, capsys):
    from histolab.cli import main
    from histolab.evaluation import extractors

    monkeypatch.setattr(extractors, "get_extractor", lambda name, **kw: tiny)
    real = _write_set(tmp_path / "real", 8, 0)
    fake = _write_set(tmp_path / "fake", 8, 100)
    train = _write_set(tmp_path / "train", 8, 200)
    out = tmp_path / "report"
    args = ["evaluate", "--real", str(real), "--fake", str(fake), "--train", str(train), "--per-class"]
    rc = main([*args, "--features", "tiny", "--out", str(out), "--kid-subsets", "4"])
    captured = capsys.readouterr()
    assert rc == 0
    assert "biased upward at this size" in captured.err
    report = json.loads((out / "evaluation.json").read_text())
    assert set(report["spaces"]["tiny"]["per_class"]) == {"red", "green", "blue"}
    with open(out / "metrics.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["class"] for r in rows] == ["all", "blue", "green", "red"]
    assert float(rows[0]["fd"]) == pytest.approx(report["spaces"]["tiny"]["overall"]["fd"])
    assert (out / "kid_per_class.png").stat().st_size > 1000
    assert (out / "nearest_neighbours_tiny.png").stat().st_size > 1000
    assert "KIDx1000=" in captured.out


def test_cli_evaluate_empty_folder_is_a_one_line_error(tmp_path, capsys):
    from histolab.cli import main

    (tmp_path / "empty").mkdir()
    rc = main(["evaluate", "--real", "bundled:test", "--fake", str(tmp_path / "empty")])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("error: ") and "no images found" in err and err.count("\n") == 1


def test_every_cli_option_has_help():
    import argparse

    from histolab.cli import evaluate, sweep_guidance

    for mod in (evaluate, sweep_guidance):
        p = argparse.ArgumentParser()
        mod.add_arguments(p)
        for action in p._actions:
            if action.dest != "help":
                assert action.help, (mod.NAME, action.dest)


def test_feature_cache_reuses_features_of_the_same_images(tmp_path, tiny):
    from histolab.evaluation.features import collect_cached

    class Counting:
        name, dim, weights_hash = tiny.name, tiny.dim, tiny.weights_hash

        def __init__(self):
            self.images = 0

        def features(self, images):
            self.images += len(images)
            return tiny.features(images)

    s = open_image_set(_write_set(tmp_path / "real", 4, 0))
    ex = Counting()
    first = collect_cached([ex], s, tmp_path / "cache", batch_size=5)["tiny"]
    second = collect_cached([ex], s, tmp_path / "cache", batch_size=5)["tiny"]
    assert ex.images == 12  # the second call read the cache
    np.testing.assert_array_equal(first.features, second.features)
    Image.new("RGB", (16, 16), (1, 2, 3)).save(tmp_path / "real" / "red" / "000.png")  # an image changes
    collect_cached([ex], open_image_set(tmp_path / "real"), tmp_path / "cache", batch_size=5)
    assert ex.images == 24


def test_sweep_cli_parses_adapters_and_scales():
    from histolab.cli.sweep_guidance import _adapter
    from histolab.errors import InvalidRequest
    from histolab.evaluation.sweep import parse_scales
    from histolab.generation import AdapterSpec

    assert _adapter("checkpoints/proj") == AdapterSpec("checkpoints/proj")
    assert _adapter("uni-projector:0.8") == AdapterSpec("uni-projector", 0.8)
    assert _adapter("name:-1.5") == AdapterSpec("name", -1.5)
    assert parse_scales("5,7.5,10") == (5.0, 7.5, 10.0)
    assert parse_scales("7:8:0.5") == (7.0, 7.5, 8.0)
    with pytest.raises(InvalidRequest, match="START:STOP:STEP"):
        parse_scales("2:1:0.1")
