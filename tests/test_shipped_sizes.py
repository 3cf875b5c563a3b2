"""Embedded defaults stay small: no file in the repository over 20 MB (big weights are sharded)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
LIMIT = 20 * 1024 * 1024


def test_no_tracked_file_is_over_20_mb():
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout.split(b"\0")
    sizes = {f.decode(): (ROOT / f.decode()).stat().st_size for f in files if f and (ROOT / f.decode()).is_file()}
    assert len(sizes) > 100
    big = {f: s for f, s in sizes.items() if s > LIMIT}
    assert not big, f"files over 20 MB: {big}; shard weights (histolab.pipeline.reshard_for_shipping)"


def test_reshard_keeps_every_tensor(tiny_model, tmp_path, monkeypatch):
    from diffusers import UNet2DConditionModel

    from histolab import pipeline

    folder = tmp_path / "unet"
    tiny_model.unet.save_pretrained(folder, safe_serialization=True)
    monkeypatch.setattr(pipeline, "SHIPPED_SHARD_SIZE", "100KB")
    pipeline.reshard_for_shipping(folder, UNet2DConditionModel)
    shards = sorted(folder.glob("diffusion_pytorch_model-*-of-*.safetensors"))
    assert len(shards) >= 2 and not (folder / "diffusion_pytorch_model.safetensors").exists()
    back = UNet2DConditionModel.from_pretrained(folder).state_dict()
    for k, v in tiny_model.unet.state_dict().items():
        assert torch.equal(back[k], v), k
