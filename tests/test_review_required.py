"""Required answers (issue 13): the study's config says which answers a task needs; the store refuses a submit
that leaves one unset, with a message naming it, and never records an unset answer as a value."""

from __future__ import annotations

import numpy as np
import pytest
from test_review_support import answers_for, make_sources, new_id, study_dict, table_counts

from histolab.errors import StudyError
from histolab.review import Answers, Store, create_study, load_study, next_task, parse_config, submit
from histolab.review.store import MIGRATIONS, schema_version


@pytest.fixture()
def sources(tmp_path):
    return make_sources(tmp_path)


def _study(tmp_path, sources, **over):
    store = Store(tmp_path / "ann")
    create_study(store, parse_config(study_dict(sources, **over)))
    return store


def test_by_default_every_answer_is_required_and_a_missing_one_is_refused(tmp_path, sources):
    store = _study(tmp_path, sources)
    info = load_study(store, "s1")
    assert all(a.required for a in info.aspects) and info.turing_test and info.judgement_required
    task = next_task(store, "s1", "ann")
    assert all(a.required for a in task.aspects) and task.judgement_required
    public = task.to_public_dict(images="omit")
    assert all(a["required"] for a in public["aspects"]) and public["judgement_required"]
    good = answers_for(task, np.random.default_rng(1))
    before = table_counts(store)
    first = task.aspects[0].key
    cases = [
        ({**good.__dict__, "scores": {k: v for k, v in good.scores.items() if k != first}}, f"missing score.*{first}"),
        ({**good.__dict__, "scores": {**good.scores, first: None}}, f"missing score.*{first}"),
        ({**good.__dict__, "judgement": None, "confidence": None}, "missing required judgement"),
        ({**good.__dict__, "confidence": None}, "missing confidence"),
    ]
    for fields, message in cases:
        with pytest.raises(StudyError, match=message) as exc:
            submit(store, "s1", "ann", task.task_id, Answers(**fields), new_id())
        assert "nothing was stored" in str(exc.value)
    assert table_counts(store) == before  # nothing written, not even a submission row
    submit(store, "s1", "ann", task.task_id, good, new_id())
    assert table_counts(store)["ratings"] == before["ratings"] + len(task.aspects)


def test_optional_answers_left_unset_store_nothing(tmp_path, sources):
    store = _study(tmp_path, sources, required=["clinical_realism"])
    info = load_study(store, "s1")
    assert [a.key for a in info.aspects if a.required] == ["clinical_realism"] and not info.judgement_required
    task = next_task(store, "s1", "ann")
    optional = [a.key for a in task.aspects if not a.required]
    assert optional and not task.judgement_required
    # Only the required scale: stored as exactly one rating, no judgement, no default for the rest.
    submit(store, "s1", "ann", task.task_id, Answers(scores={"clinical_realism": 7, optional[0]: None}), new_id())
    db = store.db
    rows = db.execute("SELECT aspect, value FROM ratings WHERE rater_id = 'ann'").fetchall()
    assert rows == [("clinical_realism", 7.0)]
    assert db.execute("SELECT COUNT(*) FROM judgements").fetchone()[0] == 0
    # An optional judgement, once given, still needs its confidence; a confidence alone is refused.
    task = next_task(store, "s1", "ann")
    for fields, message in [
        ({"judgement": "real"}, "missing confidence"),
        ({"confidence": 3}, "confidence was given without a judgement"),
        ({}, "missing score"),  # the required one is still required
    ]:
        scores = {} if not fields else {"clinical_realism": 2}
        with pytest.raises(StudyError, match=message):
            submit(store, "s1", "ann", task.task_id, Answers(scores=scores, **fields), new_id())
    submit(
        store,
        "s1",
        "ann",
        task.task_id,
        Answers(scores={"clinical_realism": 2}, judgement="real", confidence=4),
        new_id(),
    )
    assert db.execute("SELECT says_synthetic, confidence FROM judgements").fetchall() == [(0, 4)]


def test_the_required_list_is_checked_and_kept_with_the_study(tmp_path, sources):
    with pytest.raises(StudyError, match=r"required: unknown answer\(s\) \['sharpness'\]"):
        parse_config(study_dict(sources, required=["sharpness"]))
    with pytest.raises(StudyError, match="required must be a list"):
        parse_config(study_dict(sources, required="all"))
    with pytest.raises(StudyError, match=r"unknown answer\(s\) \['judgement'\]"):
        parse_config(study_dict(sources, turing_test=False, required=["judgement"]))
    cfg = parse_config(study_dict(sources, required=["color_contrast", "judgement"]))
    assert cfg.required_answers == ("color_contrast", "judgement")
    assert [a["required"] for a in cfg.to_dict()["aspects"]] == [a.key == "color_contrast" for a in cfg.aspects]


def test_an_older_store_is_migrated_with_every_answer_required(tmp_path):
    old = Store(tmp_path / "ann", migrations=MIGRATIONS[:1])
    assert schema_version(old.db) == 1
    old.close()
    store = Store(tmp_path / "ann")
    assert schema_version(store.db) == MIGRATIONS[-1].version
    assert [m.name for m in MIGRATIONS if m.version == 2] == ["required answers"]
    # Studies made before the columns existed read as "every answer required" (what they were rated under).
    defaults = {r[1]: r[4] for r in store.db.execute("PRAGMA table_info(aspects)")}
    assert defaults["required"] == "1"
    defaults = {r[1]: r[4] for r in store.db.execute("PRAGMA table_info(studies)")}
    assert defaults["judgement_required"] == "1"
