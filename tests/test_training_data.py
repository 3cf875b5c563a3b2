"""What a run trains and validates on: the bundled crops, a Chaoyang-style JSON with integer labels and no
validation split, a folder with splits."""

import json

import pytest
from training_testkit import write_user_dataset

from histolab.errors import DataError
from histolab.training.data import load_training_data
from histolab.training.presets import get_preset


def test_bundled_trains_on_the_train_band_and_validates_on_the_val_band():
    from histolab.data import bundled

    d = load_training_data("bundled", max_per_class=5, seed=1)
    assert d.counts() == {"skin_he": 5, "tumour_he": 5, "colon_ihc": 5}
    train_px = {im.tobytes() for im in d.images}
    assert len(d.val_images) == len(bundled.crops("val"))
    assert not train_px & {im.tobytes() for im in d.val_images}
    assert load_training_data("bundled", max_per_class=5, seed=1).fingerprint() == d.fingerprint()
    assert load_training_data("bundled", max_per_class=5, seed=2).fingerprint() != d.fingerprint()


def test_chaoyang_json_names_its_labels_and_sets_validation_aside(tmp_path):
    names = ["normal", "serrated", "adenocarcinoma", "adenoma"]
    write_user_dataset(tmp_path / "train", {n: 10 for n in names})
    rows = [{"name": f"train/{n}/{n}_{i:03d}.png", "label": k} for k, n in enumerate(names) for i in range(10)]
    (tmp_path / "train.json").write_text(json.dumps(rows))
    cfg = get_preset("chaoyang-2025-lora").config()
    d = load_training_data(tmp_path / "train.json", seed=0, label_names=cfg.label_names)
    assert d.classes == names  # Chaoyang's label order: 0 normal, 1 serrated, 2 adenocarcinoma, 3 adenoma
    assert d.counts() == {n: 9 for n in names} and len(d.val_images) == 4
    assert any("10% of the train split set aside for validation" in n for n in d.notes)
    assert cfg.prompt_template.format(label=d.classes[2]) == "adenocarcinoma_tissue"
    # Without names the labels stay the integers, and a bundled run refuses names it cannot use.
    assert load_training_data(tmp_path / "train.json").classes == ["0", "1", "2", "3"]
    with pytest.raises(DataError, match="label_names"):
        load_training_data("bundled", label_names="chaoyang")


def test_split_folders_train_on_train_and_validate_on_val(tmp_path):
    write_user_dataset(tmp_path / "d" / "train", {"a": 6, "b": 6}, seed=1)
    write_user_dataset(tmp_path / "d" / "val", {"a": 2, "b": 3}, seed=2)
    write_user_dataset(tmp_path / "d" / "test", {"a": 4, "b": 4}, seed=3)
    d = load_training_data(tmp_path / "d", min_per_class=6)
    assert d.counts() == {"a": 6, "b": 6} and sorted(d.val_labels) == ["a", "a", "b", "b", "b"]
    with pytest.raises(DataError, match="class 'a' has 6 usable training images; at least 7"):
        load_training_data(tmp_path / "d", min_per_class=7)
