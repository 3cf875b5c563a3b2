"""Per-image captions in each loader format (CSV column, JSON key, sidecar .txt), training on each image's own
prompt with the count of captions cut at 77 tokens, one class at a time, and nothing held out."""

import json

import pytest
from training_testkit import quick_config, tiny_base_dir, write_user_dataset  # noqa: F401

from histolab.data.loaders import load_csv, load_folder, load_json
from histolab.errors import DataError
from histolab.training.data import load_training_data
from histolab.training.loop import train

LONG = " ".join(["consolidation"] * 90)  # far beyond CLIP's 77 tokens


def _files(tmp_path):
    root = write_user_dataset(tmp_path / "d", {"a": 3, "b": 3})
    return root, sorted(root.rglob("*.png"))


def test_csv_caption_column(tmp_path):
    root, files = _files(tmp_path)
    rows = ["path,label,impression"] + [
        f"{f.relative_to(root)},{f.parent.name},no acute finding {i}" for i, f in enumerate(files)
    ]
    (root / "index.csv").write_text("\n".join(rows))
    ds = load_csv(root / "index.csv")
    assert [r.caption for r in ds.records] == [f"no acute finding {i}" for i in range(6)]


def test_json_caption_key(tmp_path):
    root, files = _files(tmp_path)
    entries = [
        {"name": str(f.relative_to(root)), "label": f.parent.name, "caption": f"text {i}"} for i, f in enumerate(files)
    ]
    entries[0].pop("caption")
    (root / "index.json").write_text(json.dumps(entries))
    ds = load_json(root / "index.json")
    assert [r.caption for r in ds.records] == [None] + [f"text {i}" for i in range(1, 6)]


def test_folder_sidecar_txt_is_a_caption_not_an_image(tmp_path):
    root, files = _files(tmp_path)
    files[0].with_suffix(".txt").write_text("right lower lobe opacity\n")
    ds = load_folder(root)
    assert len(ds.records) == 6 and not ds.report.not_images
    assert {r.path.name: r.caption for r in ds.records}[files[0].name] == "right lower lobe opacity"


def test_only_classes_and_no_holdout(tmp_path):
    root = write_user_dataset(tmp_path / "d", {"a": 10, "b": 10})
    data = load_training_data(root, only_classes="b", holdout="none")
    assert data.classes == ["b"] and data.labels == ["b"] * 10 and not data.val_images
    with pytest.raises(DataError, match="only_classes names 'c'"):
        load_training_data(root, only_classes="c")
    assert len(load_training_data(root).images) < 20  # by default a validation share is set aside


def test_training_uses_each_images_caption_and_counts_truncation(tiny_base_dir, tmp_path):  # noqa: F811
    root, files = _files(tmp_path)
    rows = ["path,label,caption"]
    for i, f in enumerate(files):
        rows.append(f"{f.relative_to(root)},{f.parent.name},{LONG if i == 0 else f'finding {i}'}")
    (root / "index.csv").write_text("\n".join(rows))
    lines = []
    cfg = quick_config(
        "lora", max_steps=1, captions="image", holdout="none", samples_per_class=0, train_text_encoder=False
    )
    train(cfg, base=str(tiny_base_dir), data=str(root / "index.csv"), out=tmp_path / "run", log=lines.append)
    text = "\n".join(lines)
    assert "6 distinct per-image captions; 1 longer than 77 tokens are truncated" in text, text
