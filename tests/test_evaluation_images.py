"""Image sets for evaluation: folders, CSVs, bundled splits, mode conversion, clear errors."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from histolab.errors import DataError, InvalidRequest
from histolab.evaluation.images import BUNDLED_PER_CLASS, open_image_set, to_rgb8


def _save(path, color=(200, 100, 50), size=16, mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, (size, size), color).save(path)


def test_rgba_is_composited_on_white():
    im = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    im.putpixel((0, 0), (0, 0, 255, 255))
    im.putpixel((1, 0), (0, 0, 0, 128))
    out = np.asarray(to_rgb8(im))
    assert out[1, 1].tolist() == [255, 255, 255]  # fully transparent -> background
    assert out[0, 0].tolist() == [0, 0, 255]  # opaque -> itself
    assert 120 <= out[0, 1][0] <= 135  # half black over white -> mid grey


def test_sixteen_bit_grayscale_is_scaled_not_clipped():
    arr = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)
    im = Image.fromarray(arr, mode="I;16")
    out = np.asarray(to_rgb8(im))
    assert out.shape == (1, 4, 3)
    assert out[0, :, 0].tolist() == [0, 1, 128, 255]
    assert (out[..., 0] == out[..., 2]).all()


def test_grayscale_palette_and_float_modes():
    assert np.asarray(to_rgb8(Image.new("L", (2, 2), 77)))[0, 0].tolist() == [77, 77, 77]
    pal = Image.new("P", (2, 2), 0)
    pal.putpalette([10, 20, 30] + [0] * 765)
    assert np.asarray(to_rgb8(pal))[0, 0].tolist() == [10, 20, 30]
    f = Image.fromarray(np.full((2, 2), 0.5, dtype=np.float32), mode="F")
    assert np.asarray(to_rgb8(f))[0, 0].tolist() == [128, 128, 128]


def test_folder_classes_come_from_subfolders(tmp_path):
    _save(tmp_path / "a" / "1.png")
    _save(tmp_path / "a" / "2.jpg")
    _save(tmp_path / "b" / "deep" / "3.png", mode="L", color=9)
    _save(tmp_path / "loose.png")
    (tmp_path / "notes.txt").write_text("not an image")
    s = open_image_set(tmp_path)
    assert len(s) == 4
    assert sorted(map(str, s.labels)) == ["None", "a", "a", "b"]
    assert s.classes == ["a", "b"]
    assert all(s.load(i).mode == "RGB" for i in range(len(s)))


def test_csv_with_split_filter(tmp_path):
    _save(tmp_path / "img" / "x.png")
    _save(tmp_path / "img" / "y.png")
    (tmp_path / "index.csv").write_text("path,label,split\nimg/x.png,tumour,test\nimg/y.png,normal,train\n")
    assert open_image_set(tmp_path / "index.csv").classes == ["normal", "tumour"]
    only = open_image_set(f"{tmp_path / 'index.csv'}@test")
    assert len(only) == 1 and only.labels == ["tumour"]


def test_bundled_held_out_protocol():
    s = open_image_set("bundled:test")
    assert s.classes == ["colon_ihc", "skin_he", "tumour_he"]
    assert len(s) == 3 * BUNDLED_PER_CLASS
    assert s.load(0).size == (64, 64)
    with pytest.raises(InvalidRequest, match="split must be one of"):
        open_image_set("bundled:holdout")


def test_empty_missing_and_unreadable_inputs_fail_clearly(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images found"):
        open_image_set(tmp_path / "empty")
    with pytest.raises(DataError, match="no such folder"):
        open_image_set(tmp_path / "missing")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    s = open_image_set(bad)
    with pytest.raises(DataError, match=r"cannot read image broken\.png"):
        s.load(0)
    (tmp_path / "x.csv").write_text("file,class\na.png,b\n")
    with pytest.raises(DataError, match="path,label"):
        open_image_set(tmp_path / "x.csv")
