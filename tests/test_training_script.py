"""scripts/train_embedded_adapters.py end to end on the tiny model, without the FID part (slow on a CPU;
run by hand: see the script's docstring): it trains, and ships adapter folders with only the adapter."""

import importlib.util
from pathlib import Path

from training_testkit import tiny_base_dir  # noqa: F401

from histolab.adapters.loader import locate, open_located
from histolab.adapters.manifest import read_manifest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "train_embedded_adapters.py"


def _script():
    spec = importlib.util.spec_from_file_location("train_embedded_adapters", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_trains_and_ships_adapter_folders(tiny_base_dir, tmp_path):  # noqa: F811
    sets = ["max_steps=2", "max_images_per_class=4", "min_images_per_class=2", "repeats=1", "batch_size=4",
            "validation=none", "samples_per_class=1", "sample_steps=1", "augment=none"]  # fmt: skip
    argv = ["--base", str(tiny_base_dir), "--work", str(tmp_path / "work"), "--out-root", str(tmp_path / "ck"),
            "--kinds", "lora,ti", "--no-fid", *[a for s in sets for a in ("--set", s)]]  # fmt: skip
    assert _script().main(argv) == 0
    shipped = sorted(p.name for p in (tmp_path / "ck").iterdir())
    assert shipped == ["embedded-lora", "embedded-textual-inversion"]
    for name, kind, weights in (("embedded-lora", "lora", "adapter.safetensors"),
                                ("embedded-textual-inversion", "textual_inversion", "learned_embeds.safetensors")):  # fmt: skip
        folder = tmp_path / "ck" / name
        assert sorted(p.name for p in folder.iterdir()) == sorted(["manifest.json", "samples.png", weights])
        m = read_manifest(folder)
        assert m.kind == kind and m.name == name and m.training["preset"].startswith("tiny-")
        assert open_located(locate(folder)).kind == kind
    # A second call resumes (and finds the runs finished) rather than refusing the existing folders.
    assert _script().main(argv) == 0
