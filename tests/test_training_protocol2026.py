"""The 2026 protocol in the loop: per-epoch validation draws one generation per validation image (seeded per
image, with the config's sampler), and the null embedding starts small random (scale 0.01)."""

import torch
from training_testkit import encoder_for, quick_config, tiny_base_dir, write_user_dataset  # noqa: F401

from histolab.training.loop import train


class Recorder:
    metric = "recorded/count"
    lower_is_better = True

    def __init__(self):
        self.calls = []

    def __call__(self, images, labels):
        self.calls.append((len(images), list(labels)))
        return {self.metric: float(len(images))}


def test_validation_is_one_generation_per_validation_image(tiny_base_dir, tmp_path):  # noqa: F811
    root = write_user_dataset(tmp_path / "d", {"a": 10, "b": 10})
    rec = Recorder()
    cfg = quick_config(
        "projector", epochs=1, validation="fid", val_per_image=True, val_images_per_class=3, samples_per_class=0
    )
    cfg = cfg.replace(sample_scheduler="ddpm").check()
    res = train(
        cfg,
        base=str(tiny_base_dir),
        data=str(root),
        out=tmp_path / "r",
        encoder=encoder_for("projector"),
        validator=rec,
        log=None,
    )
    assert res is not None
    ((n, labels),) = rec.calls
    assert n == 2 and sorted(labels) == ["a", "b"]  # 1 per validation image, not 3 per class


def test_null_embedding_starts_small_random():
    from histolab.adapters.projector import Projector, ProjectorConfig
    from histolab.training.projector import ProjectorHead

    torch.manual_seed(0)
    head = ProjectorHead(Projector(ProjectorConfig(encoder_dim=1536, hidden=64)), 1536, 0.05, 0.01)
    std = head.null_embedding.detach().std().item()
    assert 0.009 < std < 0.011 and head.null_embedding.requires_grad
