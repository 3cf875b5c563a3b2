"""`generate --reference FOLDER`: one image per patch, seeded per patch, resumable; reference mode takes the
adapter's recommended settings (manifest) unless the user sets them."""

import json
from pathlib import Path

from PIL import Image

from histolab.adapters.recommended import REFERENCE_DEFAULTS, recommended_settings
from histolab.cli import build_parser, main
from histolab.cli.generate import build_request

ADAPTER = str(Path(__file__).resolve().parents[1] / "checkpoints" / "embedded-projector")


def _patches(folder: Path, n: int) -> Path:
    folder.mkdir(parents=True)
    for i in range(n):
        Image.new("RGB", (64, 64), (150 + 20 * i, 80, 160)).save(folder / f"p{i}.png")
    return folder


def test_reference_mode_defaults_to_the_adapters_recommended_settings(tmp_path):
    assert recommended_settings(ADAPTER) or REFERENCE_DEFAULTS  # a projector always has settings
    patch = tmp_path / "p.png"
    Image.new("RGB", (64, 64), (150, 80, 160)).save(patch)
    ref = Image.open(patch).convert("RGB")
    args = build_parser().parse_args(["generate", "--reference", str(patch), "--adapter", ADAPTER, "--out", "x"])
    req = build_request(args, reference=ref)
    rec = recommended_settings(ADAPTER)
    assert (req.guidance_scale, req.scheduler, req.steps) == (rec["guidance_scale"], rec["scheduler"], rec["steps"])
    args = build_parser().parse_args(
        ["generate", "--reference", str(patch), "--adapter", ADAPTER, "--out", "x", "--guidance", "2", "--steps", "3"]
    )
    req = build_request(args, reference=ref)
    assert (req.guidance_scale, req.steps, req.scheduler) == (2.0, 3, rec["scheduler"])  # the user's win


def test_old_projector_manifest_gets_the_papers_settings(tmp_path):
    import shutil

    copy = tmp_path / "old"
    shutil.copytree(ADAPTER, copy)
    m = json.loads((copy / "manifest.json").read_text())
    m.pop("recommended", None)
    (copy / "manifest.json").write_text(json.dumps(m))
    assert (
        recommended_settings(str(copy))
        == REFERENCE_DEFAULTS
        == {"guidance_scale": 1.3, "scheduler": "ddpm", "steps": 30}
    )


def test_reference_folder_one_image_per_patch_seeded_and_resumable(tmp_path):
    folder = _patches(tmp_path / "patches", 3)
    out = tmp_path / "out"
    cmd = ["generate", "--base", "embedded", "--reference", str(folder), "--adapter", ADAPTER]
    cmd += ["--steps", "2", "--out", str(out), "--quiet", "--device", "cpu"]
    assert main(cmd) == 0
    seeds = {}
    for i in range(3):
        rows = [json.loads(x) for x in (out / f"p{i}" / "recipes.jsonl").read_text().splitlines() if x.strip()]
        assert len(rows) == 1
        seeds[i] = rows[0]["recipe"]["seed"]
        assert rows[0]["recipe"]["scheduler"] == "ddpm" and rows[0]["recipe"]["guidance_scale"] == 1.3
    assert seeds == {0: 0, 1: 1, 2: 2}
    # A stop after the first patch: the others' folders gone; a rerun makes only those, the first untouched.
    import shutil

    first = sorted((out / "p0").glob("*.png"))[0]
    before = first.read_bytes()
    shutil.rmtree(out / "p1")
    shutil.rmtree(out / "p2")
    assert main(cmd) == 0
    assert first.read_bytes() == before and sorted((out / "p2").glob("*.png"))
