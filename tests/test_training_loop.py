"""The shared loop: gradient checkpointing and accumulation, per-epoch validation choosing the best epoch
(with a stand-in validator, and with histolab.evaluation's FID)."""

import torch
from training_testkit import max_state_difference, quick_config, tiny_base_dir  # noqa: F401

from histolab.adapters.loader import locate, open_located
from histolab.adapters.manifest import read_manifest
from histolab.training.loop import train
from histolab.training.state import load_state


def test_gradient_checkpointing_gives_the_same_training(tiny_base_dir, tmp_path):  # noqa: F811
    """Checkpointing only recomputes activations in backward: the updates are the same (float32 rounding)."""
    cfg = quick_config("lora", max_steps=3, samples_per_class=0)
    train(cfg, base=str(tiny_base_dir), out=tmp_path / "plain", log=None)
    train(cfg.replace(gradient_checkpointing=True), base=str(tiny_base_dir), out=tmp_path / "ckpt", log=None)
    a, b = load_state(tmp_path / "plain" / "training"), load_state(tmp_path / "ckpt" / "training")
    b.config["gradient_checkpointing"] = False
    assert max_state_difference(a, b) < 1e-6


def test_gradient_accumulation_steps_once_per_group_of_micro_batches(tiny_base_dir, tmp_path):  # noqa: F811
    cfg = quick_config("lora", batch_size=2, grad_accum=3, max_steps=2, samples_per_class=0, train_text_encoder=False)
    reports = []
    result = train(cfg, base=str(tiny_base_dir), out=tmp_path / "acc", progress=reports.append, log=None)
    assert result.step == 2
    st = load_state(tmp_path / "acc" / "training")
    # AdamW counts its own steps: 2 optimiser steps for 6 micro-batches.
    assert {float(s["step"]) for s in st.optimizer["state"].values()} == {2.0}
    m = read_manifest(tmp_path / "acc")
    assert m.training["steps_per_epoch"] == 2  # 12 images / (2 per micro-batch x 3 micro-batches)


class Scripted:
    """A stand-in validator: a fixed score per call, so the best epoch is known in advance."""

    metric = "scripted/fid"
    lower_is_better = True

    def __init__(self, scores):
        self.scores = list(scores)
        self.calls = []

    def __call__(self, images, labels):
        self.calls.append((len(images), sorted(set(labels))))
        return {self.metric: self.scores[len(self.calls) - 1]}


def test_best_epoch_is_recorded_and_selected(tiny_base_dir, tmp_path):  # noqa: F811
    cfg = quick_config("lora", epochs=3, samples_per_class=0, val_images_per_class=2, lr=1e-2)
    v = Scripted([5.0, 3.0, 4.0])
    result = train(cfg, base=str(tiny_base_dir), out=tmp_path / "v", validator=v, log=None)
    assert result.best_epoch == 2
    assert v.calls == [(6, ["colon_ihc", "skin_he", "tumour_he"])] * 3  # 2 images per class, every epoch
    top = read_manifest(tmp_path / "v")
    assert top.metrics["best_epoch"] == 2 and top.metrics["selection_metric"] == "scripted/fid"
    assert top.metrics["best"]["scripted/fid"] == 3.0 and [h["scripted/fid"] for h in top.metrics["history"]] == [
        5.0,
        3.0,
        4.0,
    ]
    assert top.training["selected_epoch"] == 2 and "epoch 2 selected" in top.training["status"]
    # The folder's weights are epoch 2's, not the last epoch's.
    chosen = open_located(locate(tmp_path / "v")).payload.layers
    epoch2 = open_located(locate(tmp_path / "v" / "epochs" / "epoch-002")).payload.layers
    epoch3 = open_located(locate(tmp_path / "v" / "epochs" / "epoch-003")).payload.layers
    assert all(torch.equal(a.up, b.up) for a, b in zip(chosen, epoch2, strict=True))
    assert not all(torch.equal(a.up, b.up) for a, b in zip(chosen, epoch3, strict=True))


def test_fid_validation_through_histolab_evaluation(tiny_base_dir, tmp_path):  # noqa: F811
    cfg = quick_config(
        "lora", max_steps=3, samples_per_class=0, validation="fid", val_images_per_class=2, val_reference_images=6
    )
    logs = []
    result = train(cfg, base=str(tiny_base_dir), out=tmp_path / "f", log=logs.append)
    assert any("validation: FID against 6 validation images" in line for line in logs)
    fid = result.history[0]["inception/fid"]
    assert fid > 0 and result.best_epoch == 1
    assert read_manifest(tmp_path / "f").metrics["best"]["inception/fid"] == fid
    assert list((tmp_path / "f" / "training").glob("val_reference*.safetensors"))  # real-side features cached
