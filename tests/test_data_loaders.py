"""User dataset loaders: the three formats, every bad-data case, splits without leakage."""

import json
import re
import struct
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from histolab.data import bundled
from histolab.data.loaders import CHAOYANG_LABEL_NAMES, Record, load_csv, load_dataset, load_folder, load_json
from histolab.data.splits import check_no_leakage, stratified_split
from histolab.errors import DataError, InvalidRequest

RNG = np.random.default_rng(0)


def rgb(path: Path, size=40, fmt=None, value=None) -> np.ndarray:
    path.parent.mkdir(parents=True, exist_ok=True)
    a = (
        RNG.integers(0, 256, (size, size, 3), dtype=np.uint8)
        if value is None
        else np.full((size, size, 3), value, np.uint8)
    )
    Image.fromarray(a).save(path, format=fmt)
    return a


def png16(path: Path, arr: np.ndarray) -> None:
    """A 16-bit PNG written by hand (Pillow cannot write 16-bit RGB)."""
    h, w, c = arr.shape
    raw = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))

    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 16, {1: 0, 3: 2, 4: 6}[c], 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
    )


def paths_of(ds):
    return sorted((Path(r.path).resolve(), r.label, r.split) for r in ds.records)


# ------------------------------------------------------------------ formats


def test_class_folders(tmp_path):
    a = rgb(tmp_path / "stroma" / "a.png")
    rgb(tmp_path / "stroma" / "sub" / "b.jpg", fmt="JPEG")  # nested folders count, like ImageFolder
    rgb(tmp_path / "tumour" / "c.png")
    (tmp_path / "tumour" / ".DS_Store").write_bytes(b"\x00\x01junk")  # hidden files are OS litter, ignored
    ds = load_folder(tmp_path)
    assert ds.classes == ["stroma", "tumour"]
    assert len(ds) == 3 and sorted(ds.labels) == [0, 0, 1]
    assert ds.report.classes == {"stroma": 2, "tumour": 1} and ds.report.skipped == 0
    i = next(k for k, r in enumerate(ds.records) if r.path.name == "a.png")
    im, label = ds[i]
    assert im.mode == "RGB" and label == 0 and np.array_equal(np.asarray(im), a)
    assert not ds.has_splits and "no split given" in ds.report.summary()


def test_tensors_at_a_given_size(tmp_path):
    Image.fromarray(np.full((30, 50, 3), (255, 0, 0), np.uint8)).save(tmp_path / "x.png")
    (tmp_path / "c").mkdir()
    (tmp_path / "x.png").rename(tmp_path / "c" / "x.png")
    ds = load_folder(tmp_path, size=16, min_size=16)
    x, y = ds[0]
    assert tuple(x.shape) == (3, 16, 16) and str(x.dtype) == "torch.float32" and y == 0
    assert float(x[0].min()) == 1.0 and float(x[1:].max()) == 0.0  # red stays red, range [0, 1]


def test_chaoyang_json_with_label_names_and_splits(tmp_path):
    rgb(tmp_path / "train" / "1_a.jpg", fmt="JPEG")
    rgb(tmp_path / "train" / "2_b.jpg", fmt="JPEG")
    rgb(tmp_path / "test" / "3_c.jpg", fmt="JPEG")
    rgb(tmp_path / "test" / "4_d.jpg", fmt="JPEG")
    (tmp_path / "train.json").write_text(
        json.dumps([{"name": "train/1_a.jpg", "label": 0}, {"name": "train/2_b.jpg", "label": 2}])
    )
    (tmp_path / "test.json").write_text(
        json.dumps([{"name": "test/3_c.jpg", "label": 0}, {"name": "test/4_d.jpg", "label": 2}])
    )
    names = {0: "normal", 2: "adenocarcinoma"}
    ds = load_json([tmp_path / "train.json", tmp_path / "test.json"], label_names=names)
    assert ds.classes == ["normal", "adenocarcinoma"]
    assert {(r.path.name, r.label, r.split) for r in ds.records} == {
        ("1_a.jpg", "normal", "train"),
        ("2_b.jpg", "adenocarcinoma", "train"),
        ("3_c.jpg", "normal", "test"),
        ("4_d.jpg", "adenocarcinoma", "test"),
    }
    assert [r.path.name for r in ds.split("test").records] == ["3_c.jpg", "4_d.jpg"]
    assert ds.split("test").classes == ds.classes  # indices stay comparable across splits
    # Without names the integers are the class names, in numeric order.
    plain = load_json(tmp_path / "train.json")
    assert plain.classes == ["0", "2"] and plain.labels == [0, 1]


def test_chaoyang_label_names_are_the_four_classes():
    assert list(CHAOYANG_LABEL_NAMES.items()) == [(0, "normal"), (1, "serrated"), (2, "adenocarcinoma"), (3, "adenoma")]


@pytest.mark.parametrize(
    "entries, fragment",
    [
        ([{"name": "a.png"}], "entry 0"),
        ([{"name": "a.png", "label": 7}], "label 7 has no name"),
        ([{"name": "a.png", "label": "tumour"}], "'tumour' is not one of the label names"),
        ({"name": "a.png", "label": 0}, "expected a list"),
    ],
)
def test_json_errors_name_the_entry(tmp_path, entries, fragment):
    rgb(tmp_path / "a.png")
    (tmp_path / "d.json").write_text(json.dumps(entries))
    with pytest.raises(DataError, match=re.escape(fragment)):
        load_json(tmp_path / "d.json", label_names=["normal", "tumour_he"])


def test_csv_with_split_and_group_columns(tmp_path):
    for i in range(4):
        rgb(tmp_path / "img" / f"{i}.png")
    (tmp_path / "index.csv").write_text(
        "path;label;split;patient_id\nimg/0.png;a;train;P1\nimg/1.png;a;Validation;P2\nimg/2.png;b;train;P3\nimg/3.png;b;test;P4\n"
    )
    ds = load_csv(tmp_path / "index.csv")
    assert [(r.path.name, r.label, r.split, r.group) for r in ds.records] == [
        ("0.png", "a", "train", "P1"),
        ("1.png", "a", "val", "P2"),
        ("2.png", "b", "train", "P3"),
        ("3.png", "b", "test", "P4"),
    ]
    assert ds.report.splits == {"test": 1, "train": 2, "val": 1}


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("file,label\nimg/0.png,a\n", "missing ['path']"),
        ("path,label,split\nimg/0.png,a,holdout\n", "unknown split 'holdout'"),
        ("path,label\nimg/0.png,\n", "line 2: empty label"),
    ],
)
def test_csv_errors_name_the_problem(tmp_path, text, fragment):
    rgb(tmp_path / "img" / "0.png")
    (tmp_path / "index.csv").write_text(text)
    with pytest.raises(DataError, match=re.escape(fragment)):
        load_csv(tmp_path / "index.csv")


def test_index_format_is_decided_by_content(tmp_path):
    rgb(tmp_path / "a.png")
    (tmp_path / "index.txt").write_text(json.dumps([{"name": "a.png", "label": 1}]))
    assert load_dataset(tmp_path / "index.txt").report.format == "json"
    (tmp_path / "list.json").write_text("path,label\na.png,x\n")
    assert load_dataset(tmp_path / "list.json").report.format == "csv"
    with pytest.raises(DataError, match="no dataset at"):
        load_dataset(tmp_path / "absent.csv")


def test_materialized_bundled_data_loads_as_folder_and_csv(tmp_path):
    out = bundled.materialize(tmp_path / "b", stride=48, per_class=5)
    by_folder = load_folder(out)
    by_csv = load_csv(out / "index.csv")
    assert by_folder.report.format == "split/class folders"
    assert paths_of(by_folder) == paths_of(by_csv)
    assert by_folder.classes == by_csv.classes == sorted(bundled.labels())
    assert by_folder.report.skipped == 0 and by_folder.report.loaded == 15
    # Pixels are the crops of the bundled source images.
    crop = next(c for c in bundled.crops(stride=48) if c.name == by_csv.records[0].path.name)
    im, _ = by_csv[0]
    assert np.array_equal(np.asarray(im), np.asarray(bundled.load_crop(crop)))
    # One split written alone is a plain class-folder dataset.
    train = load_folder(bundled.materialize(tmp_path / "t", split="train", stride=48, per_class=2))
    assert train.report.format == "class folders" and len(train) == 6


# ------------------------------------------------------------------ bad data


def test_bad_files_are_skipped_and_listed(tmp_path):
    d = tmp_path / "tissue"
    rgb(d / "good.png")
    rgb(d / "really_a_png.jpg", fmt="PNG")  # wrong extension, good content: used
    (d / "notes.png").write_text("this is text, not an image")
    good = (d / "good.png").read_bytes()
    (d / "truncated.png").write_bytes(good[: len(good) // 2])
    rgb(d / "tiny.png", size=12)
    ds = load_folder(tmp_path, min_size=32)
    r = ds.report
    assert sorted(p.name for p in (x.path for x in ds.records)) == ["good.png", "really_a_png.jpg"]
    assert sorted(Path(p).name for p, _ in r.not_images) == ["notes.png", "truncated.png"]
    reasons = dict((Path(p).name, why) for p, why in r.not_images)
    assert "not an image" in reasons["notes.png"] and "truncated" in reasons["truncated.png"]
    assert [(Path(p).name, why) for p, why in r.too_small] == [("tiny.png", "12x12, needs at least 32x32")]
    assert r.listed == 5 and r.loaded == 2 and r.skipped == 3
    text = r.summary()
    assert "2 of 5 images usable" in text and "2 not usable as images" in text and "tiny.png: 12x12" in text


def test_missing_and_duplicate_rows(tmp_path):
    rgb(tmp_path / "a.png")
    rgb(tmp_path / "b.png")
    (tmp_path / "i.csv").write_text("path,label\na.png,x\nb.png,y\nb.png,y\ngone.png,y\n")
    ds = load_csv(tmp_path / "i.csv")
    assert [Path(p).name for p in ds.report.missing] == ["gone.png"]
    assert [Path(p).name for p in ds.report.duplicates] == ["b.png"]
    assert len(ds) == 2 and ds.report.skipped == 2
    json.dumps(ds.report.to_dict())  # the CLI/UI can ship it as JSON
    (tmp_path / "j.csv").write_text("path,label\na.png,x\na.png,y\n")
    with pytest.raises(DataError, match="listed with two labels"):
        load_csv(tmp_path / "j.csv")


def test_grayscale_rgba_palette_and_16bit_are_converted_and_reported(tmp_path):
    d = tmp_path / "c"
    d.mkdir()
    g = np.arange(32 * 32, dtype=np.uint32).reshape(32, 32) % 256
    Image.fromarray(g.astype(np.uint8), mode="L").save(d / "gray.png")
    rgba = np.zeros((32, 32, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:16, :, 3] = 255  # top half opaque red, bottom half fully transparent
    Image.fromarray(rgba, mode="RGBA").save(d / "rgba.png")
    Image.fromarray(RNG.integers(0, 256, (32, 32, 3), dtype=np.uint8)).convert("P").save(d / "palette.png")
    g16 = np.zeros((32, 32, 1), np.uint16)
    g16[:, :16] = 65535
    g16[:, 16:] = 32768
    png16(d / "gray16.png", g16)
    c16 = RNG.integers(0, 65536, (32, 32, 3)).astype(np.uint16)
    png16(d / "rgb16.png", c16)
    ds = load_folder(tmp_path)
    conv = {Path(p).name: how for p, how in ds.report.converted}
    assert conv == {
        "gray.png": "grayscale (L) -> 8-bit RGB",
        "rgba.png": "RGBA -> 8-bit RGB, transparency composited on white",
        "palette.png": "palette (P) -> 8-bit RGB",
        "gray16.png": "16-bit grayscale (I;16) -> 8-bit RGB",
        "rgb16.png": "16-bit RGB -> 8-bit RGB",
    }
    assert len(ds) == 5
    px = {r.path.name: np.asarray(ds[i][0]) for i, r in enumerate(ds.records)}
    assert all(a.shape == (32, 32, 3) and a.dtype == np.uint8 for a in px.values())
    assert np.array_equal(px["gray.png"][..., 1], g.astype(np.uint8))
    assert (px["rgba.png"][:16] == (200, 0, 0)).all() and (px["rgba.png"][16:] == 255).all()
    # 16-bit is scaled to 8 bits (65535 -> 255, 32768 -> 128), not clipped at 255.
    assert (px["gray16.png"][:, :16] == 255).all() and (px["gray16.png"][:, 16:] == 128).all()
    assert np.array_equal(px["rgb16.png"], (c16 >> 8).astype(np.uint8))
    assert "5 converted to 8-bit RGB" in ds.report.summary()


def test_too_small_can_be_refused(tmp_path):
    rgb(tmp_path / "c" / "a.png", size=64)
    rgb(tmp_path / "c" / "b.png", size=20)
    with pytest.raises(DataError, match=r"1 images are smaller than 32x32(.|\n)*b.png: 20x20"):
        load_folder(tmp_path, size=32, on_small="error")
    with pytest.raises(InvalidRequest, match="on_small"):
        load_folder(tmp_path, size=32, on_small="upscale")


def test_strict_refuses_any_skip(tmp_path):
    rgb(tmp_path / "c" / "a.png")
    (tmp_path / "c" / "b.png").write_bytes(b"GIF89a-not-really")
    assert len(load_folder(tmp_path)) == 1
    with pytest.raises(DataError, match=r"strict mode(.|\n)*b.png"):
        load_folder(tmp_path, strict=True)


def test_class_without_images_is_an_error_naming_it(tmp_path):
    rgb(tmp_path / "stroma" / "a.png")
    (tmp_path / "necrosis").mkdir()
    with pytest.raises(DataError, match=r"class 'necrosis' .* has no usable images"):
        load_folder(tmp_path)
    # A class whose every file is unusable is just as empty, and the report says why.
    (tmp_path / "necrosis" / "x.png").write_text("oops")
    with pytest.raises(DataError, match=r"class 'necrosis'(.|\n)*x.png: not an image"):
        load_folder(tmp_path)


def test_empty_and_flat_folders(tmp_path):
    with pytest.raises(DataError, match="no class subfolders"):
        load_folder(tmp_path)
    rgb(tmp_path / "loose.png")
    with pytest.raises(DataError, match="no class subfolders"):
        load_folder(tmp_path)


# ------------------------------------------------------------------ splits


def recs(n_per_class: dict[str, int], groups_of: int | None = None) -> list[Record]:
    out = []
    for label, n in n_per_class.items():
        for i in range(n):
            g = f"{label}-p{i // groups_of}" if groups_of else None
            out.append(Record(Path(f"/d/{label}/{i:03d}.png"), label, None, g))
    return out


def test_stratified_split_is_seeded_and_stratified():
    rs = recs({"a": 50, "b": 20, "c": 3})
    s1 = stratified_split(rs, seed=1)
    assert [r.path for r in s1] == [r.path for r in rs]  # input order kept
    assert [r.split for r in stratified_split(list(reversed(rs)), seed=1)] == [r.split for r in reversed(s1)]
    assert [r.split for r in s1] == [r.split for r in stratified_split(rs, seed=1)]
    assert [r.split for r in s1] != [r.split for r in stratified_split(rs, seed=2)]
    count = Counter((r.label, r.split) for r in s1)
    assert (count["a", "train"], count["a", "val"], count["a", "test"]) == (40, 5, 5)
    assert (count["b", "train"], count["b", "val"], count["b", "test"]) == (16, 2, 2)
    assert count["c", "train"] >= 1  # a tiny class keeps training images
    with pytest.raises(InvalidRequest, match="sum to 1"):
        stratified_split(rs, {"train": 0.5, "test": 0.1})


def test_group_split_keeps_each_patient_in_one_split():
    rs = recs({"a": 60, "b": 40}, groups_of=4)  # 25 patients of 4 tiles each
    out = stratified_split(rs, seed=3)
    check_no_leakage(out)
    per_group = {}
    for r in out:
        per_group.setdefault(r.group, set()).add(r.split)
    assert all(len(s) == 1 for s in per_group.values())
    n = Counter(r.split for r in out)
    assert n["train"] >= 70 and n["val"] >= 8 and n["test"] >= 8
    with pytest.raises(DataError, match="some records have a group"):
        stratified_split([*rs, Record(Path("/x.png"), "a")])


def test_leaking_group_in_csv_is_refused(tmp_path):
    rgb(tmp_path / "a.png")
    rgb(tmp_path / "b.png")
    (tmp_path / "i.csv").write_text("path,label,split,slide\na.png,x,train,S7\nb.png,x,test,S7\n")
    with pytest.raises(DataError, match="group 'S7' in test, train"):
        load_csv(tmp_path / "i.csv")


def test_dataset_split_helpers(tmp_path):
    for i in range(10):
        rgb(tmp_path / ("a" if i < 5 else "b") / f"{i}.png", size=16)
    ds = load_folder(tmp_path)
    with pytest.raises(DataError, match="with_splits"):
        ds.split("train")
    sp = ds.with_splits({"train": 0.6, "val": 0.2, "test": 0.2}, seed=0)
    assert len(sp.split("train")) == 6 and len(sp.split("val")) == 2 and len(sp.split("test")) == 2
    assert sp.split("test").labels.count(0) == 1


def test_bundled_crop_grid_keeps_exactly_the_windows_tissue_fraction_keeps():
    # The grid scan reads a summed-area table; it must keep the very crops a direct pass over each window keeps.
    from histolab.data import bundled

    src = bundled.TISSUE_SOURCES[0]
    arr = bundled.source_array(src.file)
    kept = {(c.x, c.y) for c in bundled.crops(None, stride=32, labels=(src.label,))}
    h, w = arr.shape[:2]
    direct, windows = set(), 0
    for r0, r1 in bundled.bands(h).values():
        for y in range(r0, r1 - bundled.CROP + 1, 32):
            for x in range(0, w - bundled.CROP + 1, 32):
                windows += 1
                window = arr[y : y + bundled.CROP, x : x + bundled.CROP]
                if bundled.tissue_fraction(window) >= bundled.TISSUE_MIN_FRACTION:
                    direct.add((x, y))
    assert kept == direct and 0 < len(kept) < windows  # and the filter rejects some glass
    got = bundled.crops("train")
    got.clear()  # callers get their own list: the cached grid is untouched
    assert bundled.crops("train")
