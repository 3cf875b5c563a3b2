"""The registry and `python -m histolab adapters`: what is in checkpoints/, its kind, what it was
made for, whether it fits a base model (checked on a meta-device copy built from the base's configs)."""

import json

import pytest
import torch
from adapters_testkit import SeededEncoder, kohya_lora_state, meta_model, save_pipeline, save_safetensors

from histolab.adapters import projector as pj
from histolab.adapters import registry
from histolab.adapters.manifest import Manifest, base_info, write_manifest
from histolab.adapters.runtime import AdapterRuntime
from histolab.cli import main
from histolab.errors import ModelNotFound
from histolab.generation import AdapterSpec


@pytest.fixture(scope="module")
def checkpoints(tiny_model, tmp_path_factory):
    from test_adapters_hypernetwork import sdwebui_file
    from test_adapters_projector import make_projector
    from test_adapters_textual_inversion import sdwebui_pt

    root = tmp_path_factory.mktemp("checkpoints")
    save_pipeline(tiny_model, root / "tiny-base")
    lora = kohya_lora_state(tiny_model)
    save_safetensors(root / "colon-style.safetensors", lora, {"ss_sd_model_name": "tiny-base", "ss_network_dim": "4"})
    sd15 = kohya_lora_state(
        meta_model("sd15"), rank=1, text_encoder=False, unet_filter=lambda n, m: n.endswith("attn2.to_k")
    )
    save_safetensors(root / "sd15-style.safetensors", {k: torch.zeros(v.shape) for k, v in sd15.items()})
    sdwebui_pt(root / "crypt-emb.pt", torch.randn(2, 32))
    sdwebui_file(root / "hn-sd15.pt", widths=(768,))
    make_projector(tiny_model, root / "reference-proj", SeededEncoder(name="seeded-registry", dim=48))
    (root / "evil.safetensors").write_bytes(b"\x80\x04K\x01.")  # a pickle named .safetensors
    write_manifest(
        root / "named", Manifest(kind="lora", name="nice-name", weights="w.safetensors", base=base_info(tiny_model))
    )
    save_safetensors(root / "named" / "w.safetensors", lora)
    (root / "README.md").write_text("not an adapter")
    sd15 = meta_model("sd15")
    cfg = pj.ProjectorConfig(encoder_dim=48, cross_attention_dim=768, hidden=16, rank=1, alpha=1.0)
    layers = [
        (
            p,
            torch.zeros(1, sd15.unet.get_submodule(p).in_features),
            torch.zeros(sd15.unet.get_submodule(p).out_features, 1),
        )
        for p in pj.attention_lora_modules(sd15.unet)
    ]
    enc = {"name": "uni2-h", "weights_hash": "", "dim": 48}
    pj.save(
        root / "sd15-proj",
        pj.Projector(cfg),
        torch.zeros(48),
        layers,
        enc,
        Manifest(kind="projector", base=base_info(sd15)),
    )
    return root


def by_name(entries):
    return {e.name: e for e in entries}


def test_scan_lists_kinds_and_what_fits(tiny_model, checkpoints):
    shapes = registry.shape_model(str(checkpoints / "tiny-base"))
    assert next(shapes.unet.parameters()).device.type == "meta"
    entries = by_name(registry.scan(checkpoints, base=shapes, runtime=AdapterRuntime()))
    assert set(entries) == {
        "tiny-base",
        "colon-style",
        "sd15-style",
        "crypt-emb",
        "hn-sd15",
        "reference-proj",
        "evil",
        "nice-name",
        "sd15-proj",
    }
    assert entries["tiny-base"].kind == "base model"
    ok = entries["colon-style"]
    assert (ok.kind, ok.format, ok.base, ok.fits) == ("lora", "kohya", "tiny-base", True)
    bad = entries["sd15-style"]
    assert bad.fits is False and "must have shape [1, 32]" in bad.why and "but has [1, 768]" in bad.why
    assert (entries["crypt-emb"].kind, entries["crypt-emb"].trigger, entries["crypt-emb"].fits) == (
        "textual_inversion",
        "crypt-emb",
        True,
    )
    assert entries["crypt-emb"].base == "v1-5-pruned"
    hn = entries["hn-sd15"]
    assert hn.kind == "hypernetwork" and hn.fits is False and "[768]" in hn.why
    proj = entries["reference-proj"]
    assert (proj.kind, proj.encoder, proj.fits) == ("projector", "seeded-registry", True)
    assert proj.why.startswith(
        "shapes fit; trained on"
    )  # trained on the random tiny model, checked on the saved folder
    evil = entries["evil"]
    assert evil.kind == "?" and evil.fits is False and "pickle" in evil.why
    assert entries["nice-name"].fits is True
    sd15 = entries["sd15-proj"]
    assert sd15.fits is False and "tokens of width 768" in sd15.why
    assert "[its manifest: unet.block_out_channels: adapter [320, 640, 1280, 1280] vs base [16, 32]" in sd15.why


def test_a_manifest_name_resolves_and_unknown_names_say_where_to_look(tiny_model, checkpoints):
    rt = AdapterRuntime(paths=_paths(checkpoints))
    with rt.applied(tiny_model, [AdapterSpec("nice-name", 1.0), AdapterSpec("colon-style.safetensors", 0.5)]) as uses:
        assert [u.name for u in uses] == ["nice-name", "colon-style"]
        assert [u.path for u in uses] == ["named", "colon-style.safetensors"]  # relative to checkpoints/
    with pytest.raises(ModelNotFound, match="python -m histolab adapters"):
        rt.resolve("no-such-adapter")


def test_only_checkpoints_mode_refuses_outside_paths(checkpoints, tmp_path):
    from histolab.adapters.runtime import RuntimeConfig

    outside = save_safetensors(tmp_path / "x.safetensors", {"a": torch.zeros(1)})
    rt = AdapterRuntime(RuntimeConfig(only_checkpoints=True), paths=_paths(checkpoints))
    with pytest.raises(ModelNotFound):
        rt.resolve(str(outside))
    with pytest.raises(ModelNotFound):
        rt.resolve("../" + tmp_path.name + "/x.safetensors")
    assert rt.resolve("colon-style.safetensors") == checkpoints / "colon-style.safetensors"


def _paths(root):
    from histolab.config import Paths

    return Paths(checkpoints=root, annotations=root, jobs=root, outputs=root)


def test_cli_lists_the_table_and_json(checkpoints, capsys):
    assert main(["adapters", "--checkpoints", str(checkpoints), "--base", str(checkpoints / "tiny-base")]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[1].split() == ["NAME", "KIND", "FORMAT", "MADE", "FOR", "FITS", "WHY", "/", "NOTES"]
    row = next(ln for ln in lines if ln.startswith("sd15-style "))
    assert " lora " in row and " no " in row and "but has [1, 768]" in row
    assert any(ln.startswith("colon-style ") and " yes " in ln for ln in lines)

    assert main(["adapters", "--checkpoints", str(checkpoints), "--no-check", "--json"]) == 0
    rows = [json.loads(ln) for ln in capsys.readouterr().out.splitlines()]
    assert {r["name"]: r["fits"] for r in rows}["colon-style"] is None
    assert {r["name"]: r["kind"] for r in rows}["hn-sd15"] == "hypernetwork"


def test_cli_without_a_base_still_lists(checkpoints, capsys):
    assert main(["adapters", "--checkpoints", str(checkpoints), "--base", str(checkpoints / "missing")]) == 0
    out, err = capsys.readouterr()
    assert "not checked against a base model: no model at" in err
    assert any(ln.startswith("colon-style ") and " - " in ln for ln in out.splitlines())


@pytest.mark.parametrize(
    "text, ref, strength",
    [
        ("checkpoints/colon-lora:0.7", "checkpoints/colon-lora", 0.7),
        ("colon-lora", "colon-lora", 1.0),
        ("style.safetensors:-0.5", "style.safetensors", -0.5),
        ("C:\\models\\x.safetensors", "C:\\models\\x.safetensors", 1.0),
        ("a:b", "a:b", 1.0),
    ],
)
def test_parse_spec(text, ref, strength):
    from histolab.adapters import parse_spec

    assert parse_spec(text) == AdapterSpec(ref, strength)
