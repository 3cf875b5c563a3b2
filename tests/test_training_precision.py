"""mixed_precision on a CPU: auto is bf16 autocast only where the CPU has bfloat16 instructions, and a
bf16 run follows the fp32 run's loss curve."""

import pytest
import torch
from training_testkit import quick_config, tiny_base_dir  # noqa: F401

from histolab import precision
from histolab.training.loop import train, training_precision


@pytest.mark.parametrize(
    ("asked", "flag", "want"),
    [
        ("auto", "avx512_bf16", "bf16"),
        ("auto", "", "no"),
        ("bf16", "amx_bf16", "bf16"),
        ("bf16", "", "no"),
        ("fp16", "avx512_bf16", "no"),
        ("no", "avx512_bf16", "no"),
    ],
)
def test_cpu_precision_follows_the_cpu_flags(monkeypatch, asked, flag, want):
    monkeypatch.setattr(precision, "detect_cpu_bf16", lambda: precision.CpuBf16(flag, "test"))
    said = []
    assert training_precision(asked, cpu=True, log=said.append) == want
    if asked in ("bf16", "fp16") and want == "no":
        assert "full precision (fp32)" in said[0]  # a fallback is said, never silent


def test_tiny_presets_ask_for_auto():
    from histolab.training.presets import get_preset

    for name in ("tiny-lora", "tiny-dreambooth", "tiny-ti", "tiny-hypernetwork", "tiny-projector"):
        assert get_preset(name).config().mixed_precision == "auto", name


@pytest.mark.skipif(not precision.detect_cpu_bf16().supported, reason="this CPU has no bfloat16 instructions")
def test_bf16_training_follows_the_fp32_loss_curve(tiny_base_dir, tmp_path):  # noqa: F811
    cfg = quick_config("lora", max_steps=6, samples_per_class=0, train_text_encoder=False, lr=1e-3)
    curves = {}
    for mp in ("no", "auto"):
        reports = []
        train(cfg.replace(mixed_precision=mp), base=str(tiny_base_dir), out=tmp_path / mp, progress=reports.append)
        curves[mp] = torch.tensor([r.loss for r in reports if r.phase == "training" and r.loss is not None])
    a, b = curves["no"], curves["auto"]
    assert len(a) == len(b) >= 6
    assert not torch.equal(a, b)  # autocast did run in bf16
    assert (a - b).abs().max() < 0.05 * a.abs().mean(), (a, b)
