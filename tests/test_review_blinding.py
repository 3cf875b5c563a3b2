"""Blinding: clean images, opaque per-rater ids, and payloads that say nothing about an image's origin."""

from __future__ import annotations

import io
import json
import re

import numpy as np
import pytest
from PIL import Image, ImageCms, PngImagePlugin
from test_review_support import MODELS, REAL, answers_for, make_sources, new_id, study_dict

from histolab.errors import StudyError
from histolab.review import Store, create_study, get_task, next_task, parse_config, submit, unblind
from histolab.review.blinding import check_clean_png, model_labels, png_chunks, served_png

ANSWERS_ONLY = {"task_id", "position", "progress", "answers", "images", "references", "prompt", "set_label"}


def test_served_png_has_no_metadata_and_a_fixed_size():
    im = Image.fromarray(np.random.default_rng(0).integers(0, 255, (70, 90, 3), dtype=np.uint8))
    info = PngImagePlugin.PngInfo()
    info.add_itxt("histolab", '{"base_model": "secret-model"}')
    info.add_text("parameters", "a prompt, Model: secret-model")
    buf = io.BytesIO()
    im.save(
        buf,
        format="PNG",
        pnginfo=info,
        dpi=(300, 300),
        icc_profile=ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes(),
    )
    src = Image.open(io.BytesIO(buf.getvalue()))
    assert {"histolab", "parameters", "icc_profile"} <= set(src.info)
    out = served_png(src, 64)
    assert png_chunks(out) == ["IHDR", "IDAT", "IEND"]
    assert b"secret-model" not in out
    back = Image.open(io.BytesIO(out))
    assert (back.size, back.mode, back.info) == ((64, 64), "RGB", {})


def test_served_png_from_jpeg_with_exif_and_alpha_png():
    rgb = Image.new("RGB", (40, 40), (180, 60, 120))
    exif = Image.Exif()
    exif[0x010F] = "SecretScannerMaker"  # Make
    buf = io.BytesIO()
    rgb.save(buf, format="JPEG", exif=exif, quality=95)
    assert b"SecretScannerMaker" in buf.getvalue()
    out = served_png(Image.open(io.BytesIO(buf.getvalue())), 32)
    assert png_chunks(out) == ["IHDR", "IDAT", "IEND"] and b"SecretScanner" not in out
    rgba = Image.new("RGBA", (20, 30), (0, 0, 0, 0))
    out = served_png(rgba, 16)
    px = np.asarray(Image.open(io.BytesIO(out)))
    assert px.shape == (16, 16, 3) and (px == 255).all()  # transparent -> white, centre-cropped square


def test_served_png_is_deterministic_and_sniffs_bad_chunks():
    im = Image.new("RGB", (30, 30), (10, 20, 30))
    assert served_png(im, 30) == served_png(im.copy(), 30)
    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", "x")
    buf = io.BytesIO()
    im.save(buf, format="PNG", pnginfo=info)
    with pytest.raises(StudyError, match="only"):
        check_clean_png(buf.getvalue())


def test_model_labels_are_seeded_and_not_the_config_order():
    names = ["a-model", "b-model", "c-model", "d-model"]
    assert model_labels(names, 1) == model_labels(list(reversed(names)), 1)
    orders = {tuple(model_labels(names, s)[n] for n in names) for s in range(20)}
    assert len(orders) > 1  # the seed, not the config order, decides who is "Model A"
    assert sorted(model_labels(names, 3).values()) == ["Model A", "Model B", "Model C", "Model D"]


@pytest.fixture()
def item_study(tmp_path):
    sources = make_sources(tmp_path)
    store = Store(tmp_path / "ann")
    cfg = study_dict(sources)
    cfg["sources"].append({"name": "refsrc", "kind": "real", "role": "reference", "path": str(sources / "reference")})
    create_study(store, parse_config(cfg))
    return store, sources


def _secrets(store: Store, sources) -> list[str]:
    """Every string that would unblind: names, paths, file names, hashes, recipe fields."""
    db = store.db
    out = {REAL, *MODELS, "refsrc", str(sources), "GENFILE", "_test_x", "generated", "recipe", "c0ffee"}
    for model in MODELS:
        out.add(f"{model}-base")
    for sha, psha, path, code in db.execute(
        "SELECT i.sha256, i.pixel_sha256, i.original_path, u.code FROM items i "
        "LEFT JOIN unit_items ui ON ui.item_id = i.item_id LEFT JOIN units u ON u.unit_id = ui.unit_id"
    ):
        out.update({sha, sha[:10], psha, psha[:10], path})
        if code:
            out.add(code)
    out.update(p.name for p in sources.rglob("*.png"))
    return sorted(out)


def _scrub(d: dict) -> dict:
    return {k: v for k, v in d.items() if k not in ANSWERS_ONLY}


def test_rater_payloads_reveal_nothing_about_origin(item_study):
    store, sources = item_study
    forbidden = _secrets(store, sources)
    truth = {r["task_id"]: r["source_kind"] for r in unblind(store, "s1", "olivia")}
    rng = np.random.default_rng(0)
    shapes: dict[str, list[dict]] = {"real": [], "generated": []}
    seen_ids: dict[str, set[str]] = {}
    for rater in ("ann", "bob"):
        seen_ids[rater] = set()
        while (task := next_task(store, "s1", rater)) is not None:
            d = task.to_public_dict(images="base64")
            blob = json.dumps(d)
            for s in forbidden:
                assert s not in blob, f"{s!r} reached a rater"
            for im in (*task.images, *task.references):
                assert png_chunks(im.png) == ["IHDR", "IDAT", "IEND"]
                assert Image.open(io.BytesIO(im.png)).size == (48, 48)
                for s in forbidden:
                    assert s.encode() not in im.png
            assert re.fullmatch(r"[0-9a-f]{32}", task.task_id)
            seen_ids[rater] |= {task.task_id, *(i.image_id for i in task.images)}
            shapes[truth[task.task_id]].append(_scrub(d))
            ack = submit(store, "s1", rater, task.task_id, answers_for(task, rng), new_id())
            for s in forbidden:
                assert s not in repr(ack)
    # A real and a generated task look alike in everything but the pixels and the ids.
    assert shapes["real"] and shapes["generated"]
    assert {json.dumps(x, sort_keys=True) for x in shapes["real"]} == {
        json.dumps(x, sort_keys=True) for x in shapes["generated"]
    }
    # Every id differs between raters: two raters cannot compare notes on "item 3f2a...".
    assert not seen_ids["ann"] & seen_ids["bob"]


def test_prompts_and_references_do_not_depend_on_the_source(item_study):
    store, _ = item_study
    truth = {r["task_id"]: (r["source"], r["class"]) for r in unblind(store, "s1", "olivia")}
    by_class: dict[str, set[tuple]] = {}
    while (task := next_task(store, "s1", "ann")) is not None:
        _src, cls = truth[task.task_id]
        by_class.setdefault(cls, set()).add((task.prompt, tuple(r.png for r in task.references)))
        submit(store, "s1", "ann", task.task_id, answers_for(task, np.random.default_rng(1)), new_id())
    for cls, variants in by_class.items():
        assert len(variants) == 1, f"class {cls}: what a rater sees besides the image depends on the source"
        ((prompt, refs),) = variants
        assert prompt and len(refs) == 2


def test_error_messages_to_raters_do_not_leak(item_study):
    store, sources = item_study
    forbidden = _secrets(store, sources)
    task = next_task(store, "s1", "ann")
    bad = [
        dict(scores={"clinical_realism": 11}),
        dict(scores={"made_up": 1}),
        dict(artefacts=("nope",)),
        dict(judgement="maybe"),
    ]
    rng = np.random.default_rng(0)
    for change in bad:
        a = answers_for(task, rng)
        a = type(a)(**{**a.__dict__, **change})
        with pytest.raises(StudyError) as err:
            submit(store, "s1", "ann", task.task_id, a, new_id())
        for s in forbidden:
            assert s not in str(err.value)
    with pytest.raises(StudyError) as err:
        get_task(store, "s1", "ann", task.task_id[:-1] + ("0" if task.task_id[-1] != "0" else "1"))
    assert not any(s in str(err.value) for s in forbidden)


def test_set_study_shows_anonymous_models(tmp_path):
    sources = make_sources(tmp_path)
    store = Store(tmp_path / "ann")
    cfg = study_dict(sources, template="colonoscopy", set_size=3)
    cfg["sources"].append({"name": "refsrc", "kind": "real", "role": "reference", "path": str(sources / "reference")})
    create_study(store, parse_config(cfg))
    truth = {r["task_id"]: r["source"] for r in unblind(store, "s1", "olivia")}
    forbidden = _secrets(store, sources)
    label_of: dict[str, str] = {}
    kinds = []
    rng = np.random.default_rng(0)
    while (task := next_task(store, "s1", "ann")) is not None:
        kinds.append(task.kind)
        blob = json.dumps(task.to_public_dict())
        assert not [s for s in forbidden if s in blob]
        if task.kind == "set":
            assert len(task.images) == 3 and len(task.references) == 2
            assert re.fullmatch(r"Model [A-C]", task.set_label)
            assert label_of.setdefault(truth[task.task_id], task.set_label) == task.set_label
        else:
            assert task.ranking_options == ("Model A", "Model B", "Model C") and not task.images
        submit(store, "s1", "ann", task.task_id, answers_for(task, rng), new_id())
    # Sets of one prompt come together; the ranking comes last, after every set.
    assert kinds == ["set"] * 9 + ["ranking"]
    assert len(set(label_of.values())) == 3
