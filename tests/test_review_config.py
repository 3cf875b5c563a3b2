"""Study configs and creation: defaults, templates, and bad configs refused before anything is written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from test_review_support import MODELS, REAL, make_sources, study_dict, write_config

from histolab.errors import StudyError
from histolab.recipe import Recipe
from histolab.review import Store, create_study, load_config, parse_config
from histolab.review.templates import DEFAULT_ARTEFACTS, DEFAULT_ASPECTS, TEMPLATES

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "study.yaml"


@pytest.fixture()
def sources(tmp_path):
    return make_sources(tmp_path)


def _nothing_created(store: Store, study_id: str) -> None:
    assert store.db.execute("SELECT COUNT(*) FROM studies WHERE study_id = ?", [study_id]).fetchone()[0] == 0
    assert store.db.execute("SELECT COUNT(*) FROM items WHERE study_id = ?", [study_id]).fetchone()[0] == 0
    assert not store.study_dir(study_id).exists()
    leftovers = [
        p.name for p in (store.root / "studies").iterdir() if study_id in p.name and not p.name.endswith(".lock")
    ]
    assert leftovers == []  # no staging folder either


def test_default_aspects_and_artefacts_are_the_issues_lists():
    assert [a.key for a in DEFAULT_ASPECTS] == [
        "clinical_realism",
        "prompt_faithfulness",
        "abnormality_detectability",
        "color_contrast",
        "intra_set_diversity",
        "confidence_of_use",
    ]
    keys = [a.key for a in DEFAULT_ARTEFACTS]
    for must in (
        "patchy_stroma",
        "nuclear_swelling",
        "smudged_chromatin",
        "tiling_seams",
        "colour_cast",
        "implausible_glands",
    ):
        assert must in keys
    for a in DEFAULT_ASPECTS:
        assert a.type == "scale" and {0, 10} <= {k for k, _ in a.anchors}


def test_templates(sources):
    item = parse_config(study_dict(sources))
    assert item.mode == "item" and item.turing_test and not item.ranking
    assert [a.key for a in item.aspects] == [a.key for a in DEFAULT_ASPECTS if a.key != "intra_set_diversity"]
    colon = parse_config(study_dict(sources, template="colonoscopy"))
    assert (colon.mode, colon.set_size, colon.ranking, colon.turing_test) == ("set", 10, True, False)
    assert [a.key for a in colon.aspects] == [a.key for a in DEFAULT_ASPECTS]
    assert set(TEMPLATES) == {"default", "colonoscopy"}


def test_aspects_and_artefacts_are_editable(sources):
    cfg = parse_config(
        study_dict(
            sources,
            aspects=[
                "clinical_realism",
                {"key": "color_contrast", "label": "Stain quality", "anchors": {0: "bad", 10: "good"}},
                {"key": "gland_shape", "label": "Gland shape", "type": "continuous"},
            ],
            artefacts=["tiling_seams", {"key": "bubbles", "label": "Air bubbles"}],
        )
    )
    assert [(a.key, a.label, a.type) for a in cfg.aspects] == [
        ("clinical_realism", "Clinical realism", "scale"),
        ("color_contrast", "Stain quality", "scale"),
        ("gland_shape", "Gland shape", "continuous"),
    ]
    assert cfg.aspects[1].anchors == ((0, "bad"), (10, "good"))
    assert [a.key for a in cfg.artefacts] == ["tiling_seams", "bubbles"]


def test_the_example_config_is_valid(tmp_path):
    shutil.copy(EXAMPLE, tmp_path / "study.yaml")
    for d in ("real", "reference", "guidance-2", "guidance-7", "guidance-12"):
        (tmp_path / "demo-data" / d).mkdir(parents=True)
    cfg = load_config(tmp_path / "study.yaml")
    assert cfg.id == "demo-turing" and cfg.owner == "alice"
    assert [s.name for s in cfg.rated_sources] == ["real-test", "cfg-2", "cfg-7", "cfg-12"]
    assert cfg.aspects[-1].key == "nuclear_detail"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"aspects": [{"key": "realism2", "label": "R", "type": "likert"}]}, "unknown aspect type 'likert'"),
        ({"aspects": ["no_such_aspect"]}, "not a default aspect"),
        ({"aspects": ["intra_set_diversity"]}, "scored on a set of images"),
        ({"aspects": [{"key": "a", "label": "A", "anchors": {11: "x"}}]}, "not a point of the 0-10 scale"),
        ({"artefacts": ["nope"]}, "not a default artefact"),
        ({"templte": "default"}, "unknown key"),
        ({"template": "nope"}, "unknown template"),
        ({"ranking": True}, "needs mode: set"),
        ({"raters": ["ann", "ann"]}, "duplicate id"),
        ({"raters": ["Ann Smith"]}, "short lowercase name"),
        ({"image_size": 8}, "image_size"),
        ({"owner": None}, "owner"),
    ],
)
def test_bad_configs_are_refused(sources, change, message):
    with pytest.raises(StudyError, match=message):
        parse_config(study_dict(sources, **change))


def test_source_problems_are_refused(sources):
    cfg = study_dict(sources)
    bad = [
        ({**cfg["sources"][0], "path": str(sources / "missing")}, "does not exist"),
        ({**cfg["sources"][0], "kind": "fake"}, "kind must be"),
        ({**cfg["sources"][1], "role": "reference"}, "must be kind: real"),
        ({**cfg["sources"][0], "images": ["skin_he/no_such.png"]}, "does not exist"),
        ({**cfg["sources"][0], "images": ["../real/skin_he/x.png"]}, "inside"),
    ]
    for entry, message in bad:
        with pytest.raises(StudyError, match=message):
            parse_config({**cfg, "sources": [entry, *cfg["sources"][1:]]})


def test_a_bad_image_rejects_the_study_before_anything_is_written(tmp_path, sources):
    store = Store(tmp_path / "ann")
    # A file that claims to be a PNG but is not one.
    (sources / MODELS[0] / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    with pytest.raises(StudyError, match=r"broken\.png"):
        create_study(store, parse_config(study_dict(sources)))
    _nothing_created(store, "s1")


def test_a_generated_image_without_recipe_is_refused(tmp_path, sources):
    store = Store(tmp_path / "ann")
    from PIL import Image

    Image.new("RGB", (48, 48), (200, 100, 150)).save(sources / MODELS[1] / "norecipe.png")
    with pytest.raises(StudyError, match="carries no recipe"):
        create_study(store, parse_config(study_dict(sources)))
    _nothing_created(store, "s1")


def test_recipes_jsonl_supplies_recipes_and_names_missing_files(tmp_path, sources):
    from PIL import Image

    gen = sources / "jpegmodel"
    gen.mkdir()
    lines = []
    for i, prompt in enumerate(parse_config(study_dict(sources)).prompts.values()):
        Image.new("RGB", (48, 48), (10 * i, 80, 120)).save(gen / f"{i}.jpg", quality=90)
        lines.append(
            json.dumps({"file": f"{i}.jpg", "recipe": Recipe(base_model="m", base_hash="h", prompt=prompt).to_dict()})
        )
    (gen / "recipes.jsonl").write_text("\n".join(lines))
    cfg = study_dict(sources)
    cfg["sources"].append({"name": "jpegmodel", "kind": "generated", "path": str(gen)})
    store = Store(tmp_path / "ann")
    rep = create_study(store, parse_config(cfg))
    assert rep.rated_items["jpegmodel"] == 3
    recipes = [json.loads(r) for (r,) in store.db.execute("SELECT recipe_json FROM items WHERE source = 'jpegmodel'")]
    assert sorted(r["prompt"] for r in recipes) == sorted(parse_config(cfg).prompts.values())

    (gen / "recipes.jsonl").write_text(
        "\n".join([*lines, json.dumps({"file": "gone.jpg", "recipe": {"base_model": "m", "base_hash": "h"}})])
    )
    cfg["id"] = "s2"
    with pytest.raises(StudyError, match=r"gone\.jpg"):
        create_study(store, parse_config(cfg))
    _nothing_created(store, "s2")


def test_blinding_refuses_a_prompt_that_singles_out_a_source(tmp_path, sources):
    # The second model's recipes carry its own trigger word: raters would see it.
    from PIL import Image

    from histolab.recipe import read_recipe, save_png

    for p in (sources / MODELS[1]).iterdir():
        r = read_recipe(p)
        with Image.open(p) as im:
            save_png(im.copy(), Recipe(**{**r.to_dict(), "adapters": (), "prompt": r.prompt + ", sks style"}), p)
    store = Store(tmp_path / "ann")
    with pytest.raises(StudyError, match="blinding") as err:
        create_study(store, parse_config(study_dict(sources)))
    assert MODELS[1] in str(err.value)  # the owner is told which source
    _nothing_created(store, "s1")
    # Without prompts on screen nothing can leak through them.
    rep = create_study(store, parse_config(study_dict(sources, show_prompt=False)))
    assert rep.units == 27


def test_real_images_without_classes_beside_prompted_ones_are_refused(tmp_path, sources):
    cfg = study_dict(sources)
    cfg["sources"][0] = {**cfg["sources"][0], "classes": "none"}
    store = Store(tmp_path / "ann")
    with pytest.raises(StudyError, match="no prompt"):
        create_study(store, parse_config(cfg))


def test_duplicates(tmp_path, sources):
    store = Store(tmp_path / "ann")
    first = sorted((sources / MODELS[0]).glob("*.png"))[0]
    # The same image in two sources: refused.
    shutil.copy(first, sources / MODELS[1] / "copy.png")
    with pytest.raises(StudyError, match="same image"):
        create_study(store, parse_config(study_dict(sources)))
    _nothing_created(store, "s1")
    # Twice in one source: kept once and reported.
    (sources / MODELS[1] / "copy.png").unlink()
    shutil.copy(first, sources / MODELS[0] / "again.png")
    rep = create_study(store, parse_config(study_dict(sources)))
    assert rep.duplicates[MODELS[0]] == [("again.png", first.name)]
    assert rep.rated_items == {REAL: 9, MODELS[0]: 9, MODELS[1]: 9}
    assert rep.ignored[REAL] == ["index.csv"]


def test_a_study_id_cannot_be_reused(tmp_path, sources):
    store = Store(tmp_path / "ann")
    create_study(store, parse_config(study_dict(sources)))
    with pytest.raises(StudyError, match="already exists"):
        create_study(store, parse_config(study_dict(sources)))


def test_limit_takes_a_seeded_sample(tmp_path, sources):
    cfg = study_dict(sources)
    cfg["sources"][0] = {**cfg["sources"][0], "limit": 2}
    a = create_study(Store(tmp_path / "a"), parse_config(cfg))
    create_study(Store(tmp_path / "b"), parse_config(cfg))
    assert a.rated_items[REAL] == 6 and a.unsampled[REAL] == 3
    pick = [
        sorted(r for (r,) in Store(tmp_path / d).db.execute("SELECT sha256 FROM items WHERE source = ?", [REAL]))
        for d in ("a", "b")
    ]
    assert pick[0] == pick[1]


def test_config_file_errors(tmp_path):
    with pytest.raises(StudyError, match="does not exist"):
        load_config(tmp_path / "none.yaml")
    (tmp_path / "bad.yaml").write_text("id: [unclosed")
    with pytest.raises(StudyError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")
    write_config(tmp_path / "list.yaml", [1, 2])  # type: ignore[arg-type]
    with pytest.raises(StudyError, match="mapping"):
        load_config(tmp_path / "list.yaml")


def test_different_native_sizes_are_pointed_out(tmp_path, sources):
    # Real crops are 64 px, the test's generated images 48 px: served alike, but the owner is warned.
    rep = create_study(Store(tmp_path / "ann"), parse_config(study_dict(sources)))
    assert rep.native_sizes == {REAL: ["64x64"], MODELS[0]: ["48x48"], MODELS[1]: ["48x48"]}
    assert any("blinding warning" in line and "64x64" in line for line in rep.lines())
