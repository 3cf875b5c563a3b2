"""HyperNetworks: SD-webui .pt files with their options, the oldest linear1/linear2 files,
our safetensors form; attention math against SD-webui's formula; exact removal."""

from collections import OrderedDict

import numpy as np
import pytest
import torch
from adapters_testkit import assert_restored, pixels, snapshot

from histolab.adapters import hypernetwork as hn
from histolab.adapters.edit import ModelEdit
from histolab.adapters.manifest import Manifest
from histolab.errors import AdapterError


def seeded_state(layout: dict[str, tuple], seed: int) -> OrderedDict:
    g = torch.Generator().manual_seed(seed)
    return OrderedDict((k, torch.randn(*shape, generator=g) * 0.2) for k, shape in layout.items())


def simple_layout(d: int) -> dict[str, tuple]:
    """[1, 2, 1] with relu, no layer norm, no activation after the last layer: Linear, ReLU, Linear."""
    return {
        "linear.0.weight": (2 * d, d),
        "linear.0.bias": (2 * d,),
        "linear.2.weight": (d, 2 * d),
        "linear.2.bias": (d,),
    }


def sdwebui_file(path, widths=(32,), seed=0, **options):
    """A hypernetwork as SD-webui's Hypernetwork.save writes it."""
    obj = {
        w: (seeded_state(simple_layout(w), seed + i), seeded_state(simple_layout(w), seed + 100 + i))
        for i, w in enumerate(widths)
    }
    obj.update(
        {
            "step": 2000,
            "name": path.stem,
            "layer_structure": [1, 2, 1],
            "activation_func": "relu",
            "is_layer_norm": False,
            "weight_initialization": "Normal",
            "sd_checkpoint": "e1441589a6",
            "sd_checkpoint_name": "v1-5-pruned-emaonly",
            "activate_output": False,
            "use_dropout": False,
            "dropout_structure": [0, 0, 0],
            "last_layer_dropout": False,
            "optional_info": None,
        }
    )
    obj.update(options)
    torch.save(obj, path)
    return path


def test_module_layout_follows_sdwebui_rules():
    """[1, 2, 2, 1], relu, layer norm, dropout incl. last layer, no output activation (hand-derived indices)."""
    opts = hn.HypernetworkOptions(
        layer_structure=[1, 2, 2, 1],
        activation_func="relu",
        add_layer_norm=True,
        activate_output=False,
        dropout_structure=hn.dropout_structure([1, 2, 2, 1], use_dropout=True, last_layer_dropout=True),
    )
    assert opts.dropout_structure == [0, 0.3, 0.3, 0]
    m = hn.HypernetworkModule(8, opts)
    kinds = [type(x).__name__ for x in m.linear]
    assert kinds == [
        "Linear",
        "ReLU",
        "LayerNorm",
        "Dropout",
        "Linear",
        "ReLU",
        "LayerNorm",
        "Dropout",
        "Linear",
        "LayerNorm",
    ]
    assert sorted({k.rsplit(".", 1)[0] for k in m.state_dict()}) == [f"linear.{i}" for i in (0, 2, 4, 6, 8, 9)]
    assert (
        hn.HypernetworkModule(8, hn.HypernetworkOptions(activation_func="swish")).linear[1].__class__
        is torch.nn.Hardswish
    )


def test_attention_matches_sdwebui_formula(tiny_model, tmp_path):
    f = sdwebui_file(tmp_path / "style.pt")
    from histolab.adapters.loader import locate, open_located

    net = open_located(locate(f)).payload
    attn = tiny_model.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn2
    g = torch.Generator().manual_seed(1)
    x, ctx = torch.randn(2, 64, 32, generator=g), torch.randn(2, 77, 32, generator=g)
    k_mod, v_mod = net.modules[32]
    s = 0.7

    # SD-webui: context_k = hyper_k(context) = context + linear(context) * multiplier (same for v); then attention.
    ck = ctx + k_mod.linear(ctx) * s
    cv = ctx + v_mod.linear(ctx) * s
    h = attn.heads
    q, k, v = attn.to_q(x), attn.to_k(ck), attn.to_v(cv)
    split = lambda t: t.view(t.shape[0], t.shape[1], h, -1).transpose(1, 2)  # noqa: E731
    w = (split(q) @ split(k).transpose(-1, -2) * (q.shape[-1] // h) ** -0.5).softmax(-1)
    want = attn.to_out[0]((w @ split(v)).transpose(1, 2).reshape(2, 64, -1))

    snap = snapshot(tiny_model)
    edit = ModelEdit()
    net.apply(tiny_model, s, edit)
    try:
        with torch.no_grad():
            got = attn(x, encoder_hidden_states=ctx)
    finally:
        edit.undo()
    torch.testing.assert_close(got, want.detach(), rtol=1e-5, atol=1e-5)
    assert_restored(tiny_model, snap)


def test_generation_differs_strength_zero_is_base_and_unload_is_exact(tiny_model, tmp_path):
    f = sdwebui_file(tmp_path / "hn.pt", seed=3)
    snap = snapshot(tiny_model)
    base = pixels(tiny_model)
    assert not np.array_equal(pixels(tiny_model, [(f, 1.0)]), base)
    assert np.array_equal(pixels(tiny_model, [(f, 0.0)]), base)
    assert_restored(tiny_model, snap)


def test_oldest_files_and_our_format_load(tiny_model, tmp_path):
    old = {
        32: tuple(
            seeded_state(
                {"linear1.weight": (64, 32), "linear1.bias": (64,), "linear2.weight": (32, 64), "linear2.bias": (32,)},
                s,
            )
            for s in (1, 2)
        )
    }
    torch.save(old, tmp_path / "old.pt")
    from histolab.adapters.loader import locate, open_located

    net = open_located(locate(tmp_path / "old.pt")).payload
    assert net.options.layer_structure == [1.0, 2.0, 1.0] and net.options.activation_func is None
    assert torch.equal(net.modules[32][0].linear[0].weight, old[32][0]["linear1.weight"])

    snap = snapshot(tiny_model)
    src = sdwebui_file(tmp_path / "src.pt", seed=5, is_layer_norm=True, activation_func="elu")
    with pytest.raises(
        AdapterError, match=r"linear.2.bias must have shape \[64\] but has \[32\]"
    ):  # options: layer norm
        open_located(locate(src))
    src = sdwebui_file(tmp_path / "src2.pt", seed=5)
    payload = open_located(locate(src)).payload
    hn.save(tmp_path / "ours", payload, Manifest(kind="hypernetwork", name="ours"))
    assert np.array_equal(pixels(tiny_model, [(src, 0.8)]), pixels(tiny_model, [(tmp_path / "ours", 0.8)]))
    assert_restored(tiny_model, snap)


def test_two_hypernetworks_chain_and_restore(tiny_model, tmp_path):
    a, b = sdwebui_file(tmp_path / "a.pt", seed=7), sdwebui_file(tmp_path / "b.pt", seed=8)
    snap = snapshot(tiny_model)
    both = pixels(tiny_model, [(a, 1.0), (b, 1.0)])
    assert not np.array_equal(both, pixels(tiny_model, [(a, 1.0)]))
    assert_restored(tiny_model, snap)


def test_widths_of_another_base_are_refused(tiny_model, tmp_path):
    f = sdwebui_file(tmp_path / "sd15.pt", widths=(768, 320))
    snap = snapshot(tiny_model)
    with pytest.raises(AdapterError, match=r"context widths \[320, 768\].*context widths \[32\]"):
        pixels(tiny_model, [(f, 1.0)])
    assert_restored(tiny_model, snap)
