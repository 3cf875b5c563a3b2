"""Our FID weights in torch-fidelity's layout, for the proof that they are the standard network.

torch-fidelity 0.4.0's ``FeatureExtractorInceptionV3`` (a port of the same TF
graph) lists its BasicConv2d blocks in the same order as our ConvBN layers;
its batch norms have a scale, which the TF graph does not, so gamma = 1.
Used by tests and bench/evaluation.py only; torch-fidelity is not a runtime
dependency.
"""

from __future__ import annotations

import torch

from histolab.evaluation.inception_net import FEATURE_DIM, NUM_CLASSES, FIDInceptionV3, conv_layers


def torch_fidelity_state(model: FIDInceptionV3, fc_weight: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """A state dict for torch-fidelity's FeatureExtractorInceptionV3 holding ``model``'s weights."""
    ours = conv_layers(model)
    names = _basic_conv_names()
    if len(names) != len(ours):
        raise AssertionError(f"torch-fidelity has {len(names)} conv blocks, ours {len(ours)}")
    out: dict[str, torch.Tensor] = {}
    for tf_name, (_, layer) in zip(names, ours, strict=True):
        out[f"{tf_name}.conv.weight"] = layer.weight.clone()
        out[f"{tf_name}.bn.weight"] = torch.ones_like(layer.beta)
        out[f"{tf_name}.bn.bias"] = layer.beta.clone()
        out[f"{tf_name}.bn.running_mean"] = layer.mean.clone()
        out[f"{tf_name}.bn.running_var"] = layer.var.clone()
        out[f"{tf_name}.bn.num_batches_tracked"] = torch.tensor(0)
    out["fc.weight"] = fc_weight.clone() if fc_weight is not None else torch.zeros(NUM_CLASSES, FEATURE_DIM)
    out["fc.bias"] = torch.zeros(NUM_CLASSES)
    return out


def _basic_conv_names() -> list[str]:
    """Names of torch-fidelity's BasicConv2d blocks in registration order, from a weightless instance."""
    # The blocks of FeatureExtractorInceptionV3.__init__, built here because its
    # constructor would download weights.
    from torch_fidelity import feature_extractor_inceptionv3 as fe
    from torch_fidelity.feature_extractor_inceptionv3 import BasicConv2d

    layers = {
        "Conv2d_1a_3x3": fe.BasicConv2d(3, 32, kernel_size=3, stride=2),
        "Conv2d_2a_3x3": fe.BasicConv2d(32, 32, kernel_size=3),
        "Conv2d_2b_3x3": fe.BasicConv2d(32, 64, kernel_size=3, padding=1),
        "Conv2d_3b_1x1": fe.BasicConv2d(64, 80, kernel_size=1),
        "Conv2d_4a_3x3": fe.BasicConv2d(80, 192, kernel_size=3),
        "Mixed_5b": fe.InceptionA(192, pool_features=32),
        "Mixed_5c": fe.InceptionA(256, pool_features=64),
        "Mixed_5d": fe.InceptionA(288, pool_features=64),
        "Mixed_6a": fe.InceptionB(288),
        "Mixed_6b": fe.InceptionC(768, channels_7x7=128),
        "Mixed_6c": fe.InceptionC(768, channels_7x7=160),
        "Mixed_6d": fe.InceptionC(768, channels_7x7=160),
        "Mixed_6e": fe.InceptionC(768, channels_7x7=192),
        "Mixed_7a": fe.InceptionD(768),
        "Mixed_7b": fe.InceptionE_1(1280),
        "Mixed_7c": fe.InceptionE_2(2048),
    }
    names = []
    for top, mod in layers.items():
        for sub, m in mod.named_modules():
            if isinstance(m, BasicConv2d):
                names.append(f"{top}.{sub}" if sub else top)
    return names


def torch_fidelity_extractor(model: FIDInceptionV3, tmp_dir, features=("2048",), fc_weight=None):
    """torch-fidelity's own InceptionV3 with ``model``'s weights (written to a file in ``tmp_dir``)."""
    from pathlib import Path

    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    path = Path(tmp_dir) / "fid_inception_torch_fidelity_layout.pth"
    torch.save(torch_fidelity_state(model, fc_weight), path)
    # torch-fidelity opens its weights file with weights_only=False; this one is ours, written just above.
    return FeatureExtractorInceptionV3("inception-v3-compat", list(features), feature_extractor_weights_path=str(path))
