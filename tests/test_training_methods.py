"""A short run of every method on the tiny model: the run folder, every epoch folder and the adapter in it
load through histolab.adapters (as `generate --adapter` would) and change generation."""

import json

import numpy as np
import pytest
import torch
from adapters_testkit import pixels
from training_testkit import TINY_PRESETS, encoder_for, quick_config, tiny_base_dir  # noqa: F401

from histolab.adapters.loader import locate, open_located
from histolab.adapters.manifest import read_manifest
from histolab.adapters.runtime import default_runtime
from histolab.pipeline import load_base
from histolab.training.loop import train
from histolab.training.progress import Progress

METHODS = list(TINY_PRESETS)


@pytest.fixture(scope="module")
def runs(tiny_base_dir, tmp_path_factory):  # noqa: F811
    """One short run per method (5 steps over 2 epochs), with the progress reports it made."""
    out = {}
    for method in METHODS:
        # A large lr so that 5 steps visibly move every kind of adapter.
        lr = {"dreambooth": 1e-3, "textual_inversion": 5e-2, "hypernetwork": 5e-3}.get(method, 1e-2)
        changes = {"max_steps": 5, "lr": lr}
        if method == "projector":
            changes["projector_lr"] = 1e-1
        cfg = quick_config(method, **changes)
        folder = tmp_path_factory.mktemp("runs") / f"tiny-{method}"
        reports: list[Progress] = []
        enc = encoder_for(method)
        result = train(
            cfg, base=str(tiny_base_dir), data="bundled", out=folder, progress=reports.append, encoder=enc, log=None
        )
        out[method] = (result, folder, reports, enc)
    return out


@pytest.fixture(scope="module")
def base(tiny_base_dir):  # noqa: F811
    return load_base(str(tiny_base_dir))


@pytest.mark.parametrize("method", METHODS)
def test_run_completes_with_an_adapter_per_epoch(runs, method):
    result, folder, reports, _ = runs[method]
    assert result.status == "done" and result.step == 5 == result.total_steps
    # 12 items (4 per class) at batch 4: 3 steps per epoch, so 5 steps are 2 epochs, the second partial.
    assert result.epochs == 2 and [h["epoch"] for h in result.history] == [1, 2]
    for epoch_folder in (folder / "epochs" / "epoch-001", folder / "epochs" / "epoch-002", folder):
        m = read_manifest(epoch_folder)
        assert m.kind == method
        assert (epoch_folder / "samples.png").is_file()
        loaded = open_located(locate(epoch_folder))
        assert loaded.kind == method
    top = read_manifest(folder)
    assert top.training["status"] == "done" and top.training["step"] == 5
    assert top.training["config"]["method"] == method and top.training["data"]["train"] == {
        "skin_he": 4,
        "tumour_he": 4,
        "colon_ihc": 4,
    }
    assert [h["epoch"] for h in top.metrics["history"]] == [1, 2]
    phases = [r.phase for r in reports]
    assert phases[0] == "loading" and phases[-1] == "done" and "training" in phases and "saving" in phases
    steps = [r for r in reports if r.phase == "training"]
    assert [r.step for r in steps] == [1, 2, 3, 4, 5]
    assert all(r.total_steps == 5 and r.loss is not None and np.isfinite(r.loss) for r in steps)
    assert steps[-1].samples_per_s and steps[-1].samples_per_s > 0 and steps[-1].eta_s == 0


@pytest.mark.parametrize("method", METHODS)
def test_trained_adapter_changes_generation_and_unloads(runs, base, method):
    _, folder, _, enc = runs[method]
    if enc is not None:
        default_runtime().register_encoder(enc)
    if method == "projector":
        from histolab.data.bundled import crops, load_crop

        ref = load_crop(crops("val")[0])
        kw = {"mode": "reference", "reference": ref, "guidance_scale": 1.3}
        with_adapter = pixels(base, [(str(folder), 1.0)], **kw)
        other = pixels(base, [(str(folder), 1.0)], **{**kw, "reference": load_crop(crops("val")[-1])})
        assert np.abs(with_adapter - other).max() > 0, "two reference patches gave the same image"
        return
    prompt = json.loads((folder / "manifest.json").read_text())
    token = " ".join(prompt["config"].get("tokens", {}).values()) if method == "textual_inversion" else ""
    kw = {"prompt": token or "skin_he_tissue"}
    before = pixels(base, **kw) if method != "textual_inversion" else None
    after = pixels(base, [(str(folder), 1.0)], **kw)
    if before is None:  # the tokens do not exist without the adapter: compare strength 0 (the base) with 1
        before = pixels(base, [(str(folder), 0.0)], **kw)
    assert np.abs(after - before).max() > 0, f"the trained {method} adapter did not change the image"
    # Unloaded again: the base gives what it gave before.
    again = pixels(base, [(str(folder), 0.0)], **kw)
    assert np.array_equal(again, before)


def test_hypernetwork_exports_sdwebui_layout_that_loads_the_same(runs, base):
    """The SD-webui .pt beside our safetensors is read by the SD-webui path of the loader, to the same weights."""
    from histolab.adapters.hypernetwork import from_sdwebui
    from histolab.files import load_state_dict

    _, folder, _, _ = runs["hypernetwork"]
    pt = folder / f"{folder.name}.pt"
    obj, _ = load_state_dict(pt)  # torch.load(weights_only=True): plain containers and tensors only
    assert obj["layer_structure"] == [1.0, 2.0, 1.0] and obj["activation_func"] == "linear"
    assert obj["is_layer_norm"] is False and obj["weight_initialization"] == "Normal"
    assert obj["step"] == 5 and obj["name"] == folder.name
    hn = from_sdwebui(obj, "export")
    ours = open_located(locate(folder)).payload
    assert sorted(hn.modules) == sorted(ours.modules)
    for w in ours.modules:
        for a, b in zip(hn.modules[w], ours.modules[w], strict=True):
            for (ka, ta), (kb, tb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
                assert ka == kb and torch.equal(ta, tb)
    # Loading the .pt file by itself (as a user would from SD-webui's folder) gives the same images.
    assert np.array_equal(pixels(base, [(str(pt), 1.0)]), pixels(base, [(str(folder), 1.0)]))


def test_textual_inversion_has_one_token_per_class(runs):
    _, folder, _, _ = runs["textual_inversion"]
    m = read_manifest(folder)
    assert m.config["tokens"] == {"skin_he": "<skin_he>", "tumour_he": "<tumour_he>", "colon_ihc": "<colon_ihc>"}
    payload = open_located(locate(folder)).payload
    assert {e.token: tuple(e.vectors.shape) for e in payload.embeddings} == {
        t: (2, 32) for t in m.config["tokens"].values()
    }


def test_lora_cross_attention_only_touches_attn2(tiny_base_dir, tmp_path):  # noqa: F811
    cfg = quick_config("lora", max_steps=1, cross_attention_only=True, train_text_encoder=False, samples_per_class=0)
    train(cfg, base=str(tiny_base_dir), out=tmp_path / "x", log=None)
    payload = open_located(locate(tmp_path / "x")).payload
    modules = {layer.target[1] for layer in payload.layers}
    assert modules and all(".attn2." in p for p in modules), sorted(modules)[:4]
    assert all(layer.target[0] == "unet" for layer in payload.layers)


def test_dreambooth_saves_a_half_precision_unet_and_its_class_images(runs):
    from safetensors import safe_open

    _, folder, _, _ = runs["dreambooth"]
    with safe_open(str(folder / "unet" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}  # noqa: SIM118
    assert dtypes == {"F16"}
    assert not (folder / "text_encoder").exists()  # the tiny preset tunes the U-Net only
    class_dirs = list((folder / "training").glob("class-images-*"))
    assert len(class_dirs) == 1 and len(list(class_dirs[0].glob("*.png"))) == 2
