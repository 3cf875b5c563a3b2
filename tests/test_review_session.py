"""The rater API: seeded orders, resume, idempotent submits, revisions, bad input refused with nothing written."""

from __future__ import annotations

import hashlib
import io
import shutil
import threading

import numpy as np
import pytest
from PIL import Image
from test_review_support import answers_for, make_sources, new_id, study_dict, table_counts

from histolab.errors import StudyError
from histolab.review import (
    Answers,
    Store,
    add_rater,
    create_study,
    get_task,
    next_task,
    parse_config,
    progress,
    rater_studies,
    set_status,
    submit,
    task_at,
    unblind,
    verify_rater_code,
)
from histolab.review.study import reset_rater_code


@pytest.fixture()
def study(tmp_path):
    sources = make_sources(tmp_path)
    store = Store(tmp_path / "ann")
    rep = create_study(store, parse_config(study_dict(sources)))
    return store, rep, sources


def _order(store, rater):
    return [r["unit"] for r in unblind(store, "s1", "olivia") if r["rater_id"] == rater]


def test_each_rater_has_their_own_reproducible_order(tmp_path, study):
    store, rep, sources = study
    ann, bob = _order(store, "ann"), _order(store, "bob")
    assert sorted(ann) == sorted(bob) and len(ann) == rep.units == 27
    assert ann != bob
    # The same config in another store gives the same orders (the seed fixes them) ...
    other = Store(tmp_path / "other")
    create_study(other, parse_config(study_dict(sources)))
    assert [r["unit"] for r in unblind(other, "s1", "olivia") if r["rater_id"] == "ann"] == ann
    # ... and another seed other orders.
    third = Store(tmp_path / "third")
    create_study(third, parse_config(study_dict(sources, seed=8)))
    codes = {r["unit"]: r["sha256s"] for r in unblind(store, "s1", "olivia")}
    codes3 = {r["unit"]: r["sha256s"] for r in unblind(third, "s1", "olivia")}
    assert [codes[u] for u in ann] != [
        codes3[r["unit"]] for r in unblind(third, "s1", "olivia") if r["rater_id"] == "ann"
    ]


def test_rate_everything_then_nothing_is_left(study):
    store, rep, _ = study
    rng = np.random.default_rng(0)
    seen = []
    while (task := next_task(store, "s1", "ann")) is not None:
        assert task.position == len(seen) + 1 and task.progress.done == len(seen)
        seen.append(task.task_id)
        ack = submit(store, "s1", "ann", task.task_id, answers_for(task, rng), new_id())
        assert (ack.revision, ack.duplicate, ack.progress.done) == (1, False, len(seen))
    assert len(set(seen)) == rep.units
    assert progress(store, "s1", "ann").finished
    assert not progress(store, "s1", "bob").done


def test_resume_after_a_restart_is_exactly_where_the_rater_stopped(tmp_path, study):
    store, _, _ = study
    rng = np.random.default_rng(0)
    order = [r["task_id"] for r in unblind(store, "s1", "olivia") if r["rater_id"] == "ann"]
    for _ in range(5):
        t = next_task(store, "s1", "ann")
        submit(store, "s1", "ann", t.task_id, answers_for(t, rng), new_id())
    again = next_task(store, "s1", "ann")
    assert again.task_id == next_task(store, "s1", "ann").task_id == order[5]  # a reload shows the same task
    store.close()
    restarted = Store(tmp_path / "ann")  # a server restart: a new store, new connections
    t = next_task(restarted, "s1", "ann")
    assert (t.task_id, t.position, t.progress.done) == (order[5], 6, 5)


def test_double_submit_is_stored_once(study):
    store, _, _ = study
    task = next_task(store, "s1", "ann")
    a = answers_for(task, np.random.default_rng(0))
    sid = new_id()
    first = submit(store, "s1", "ann", task.task_id, a, sid)
    before = table_counts(store)
    again = submit(store, "s1", "ann", task.task_id, a, sid)
    assert (again.duplicate, again.revision, again.submission_id) == (True, 1, sid) and not first.duplicate
    assert table_counts(store) == before
    # A retry that re-measured its time is the same answer.
    again = submit(store, "s1", "ann", task.task_id, Answers(**{**a.__dict__, "time_ms": 999}), sid)
    assert again.duplicate and table_counts(store) == before
    # The same id with other answers is refused.
    other = Answers(**{**a.__dict__, "scores": {k: (v + 1) % 11 for k, v in a.scores.items()}})
    with pytest.raises(StudyError, match="already used"):
        submit(store, "s1", "ann", task.task_id, other, sid)
    assert table_counts(store) == before


def test_concurrent_double_clicks_never_duplicate(study):
    store, rep, _ = study
    acks, errors = [], []

    def rater(rid: str, seed: int):
        rng = np.random.default_rng(seed)
        try:
            while (task := next_task(store, "s1", rid)) is not None:
                a, sid = answers_for(task, rng), new_id()
                # Two clicks racing on the same submission.
                other = threading.Thread(
                    target=lambda a=a, sid=sid, t=task: acks.append(submit(store, "s1", rid, t.task_id, a, sid))
                )
                other.start()
                acks.append(submit(store, "s1", rid, task.task_id, a, sid))
                other.join()
        except Exception as exc:  # surfaced below: a thread's failure must fail the test
            errors.append(exc)

    threads = [threading.Thread(target=rater, args=(r, i)) for i, r in enumerate(("ann", "bob"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(acks) == 2 * 2 * rep.units
    assert sum(not a.duplicate for a in acks) == 2 * rep.units
    c = table_counts(store)
    assert c["submissions"] == c["done"] == 2 * rep.units
    assert c["ratings"] == 2 * rep.units * 5
    dup = store.db.execute(
        "SELECT COUNT(*) FROM (SELECT 1 FROM ratings GROUP BY unit_id, rater_id, aspect HAVING COUNT(*) > 1)"
    ).fetchone()[0]
    assert dup == 0


def test_a_revision_keeps_the_history(study):
    store, _, _ = study
    task = next_task(store, "s1", "ann")
    a1 = Answers(
        scores={k.key: 2 for k in task.aspects},
        artefacts=("colour_cast",),
        judgement="real",
        confidence=2,
        comment="first look",
    )
    a2 = Answers(scores={k.key: 9 for k in task.aspects}, artefacts=(), judgement="synthetic", confidence=5)
    submit(store, "s1", "ann", task.task_id, a1, new_id())
    ack = submit(store, "s1", "ann", task.task_id, a2, new_id())
    assert ack.revision == 2 and ack.progress.done == 1
    db = store.db
    rows = db.execute("SELECT value, current, superseded_at IS NOT NULL FROM ratings ORDER BY rating_id").fetchall()
    assert [r[0] for r in rows] == [2.0] * 5 + [9.0] * 5
    assert [(r[1], r[2]) for r in rows] == [(0, 1)] * 5 + [(1, 0)] * 5
    assert db.execute("SELECT COUNT(*) FROM comments WHERE current = 1").fetchone()[0] == 0  # the comment was withdrawn
    back = get_task(store, "s1", "ann", task.task_id)
    assert back.answers.scores == {k.key: 9.0 for k in task.aspects}
    assert (back.answers.judgement, back.answers.confidence, back.answers.artefacts) == ("synthetic", 5, ())
    assert next_task(store, "s1", "ann").position == 2
    assert task_at(store, "s1", "ann", 1).task_id == task.task_id


def test_bad_input_is_refused_and_writes_nothing(study):
    store, _, _ = study
    task = next_task(store, "s1", "ann")
    good = answers_for(task, np.random.default_rng(0))
    bob_task = next_task(store, "s1", "bob")
    before = table_counts(store)

    def changed(**kw):
        return Answers(**{**good.__dict__, **kw})

    scores = dict(good.scores)
    cases = [
        (changed(scores={**scores, "clinical_realism": 11}), "from 0 to 10"),
        (changed(scores={**scores, "clinical_realism": -1}), "from 0 to 10"),
        (changed(scores={**scores, "clinical_realism": 5.5}), "whole number"),
        (changed(scores={**scores, "clinical_realism": float("nan")}), "number"),
        (changed(scores={**scores, "clinical_realism": True}), "number"),
        (changed(scores={**scores, "clinical_realism": "7"}), "number"),
        (changed(scores={**scores, "sharpness": 4}), "unknown aspect"),
        (changed(scores={k: v for k, v in scores.items() if k != "color_contrast"}), "missing score"),
        (changed(artefacts=("unicorns",)), "unknown artefact"),
        (changed(artefacts=("colour_cast", "colour_cast")), "twice"),
        (changed(judgement=None), "judgement"),
        (changed(confidence=0), "confidence"),
        (changed(confidence=6), "confidence"),
        (changed(ranking=("Model A",)), "ranking"),
        (changed(comment="x" * 5001), "comment"),
        (changed(time_ms=-5), "time_ms"),
    ]
    for answers, message in cases:
        with pytest.raises(StudyError, match=message):
            submit(store, "s1", "ann", task.task_id, answers, new_id())
    tampered = task.task_id[:-1] + ("0" if task.task_id[-1] != "0" else "1")
    id_cases = [
        (("s1", "ann", tampered, new_id()), "unknown task id"),
        (("s1", "ann", "../../etc/passwd", new_id()), "unknown task id"),
        (("s1", "ann", bob_task.task_id, new_id()), "unknown task id"),  # another rater's task
        (("s1", "mallory", task.task_id, new_id()), "not assigned"),
        (("s1", "ANN; DROP TABLE", task.task_id, new_id()), "not assigned"),
        (("s2", "ann", task.task_id, new_id()), "unknown study"),
        (("s1", "ann", task.task_id, "short"), "submission_id"),
    ]
    for (sid, rid, tid, sub), message in id_cases:
        with pytest.raises(StudyError, match=message):
            submit(store, sid, rid, tid, good, sub)
    for call in (lambda: next_task(store, "s1", "mallory"), lambda: get_task(store, "s1", "ann", bob_task.task_id)):
        with pytest.raises(StudyError):
            call()
    assert table_counts(store) == before
    # The same task then takes a good answer.
    assert submit(store, "s1", "ann", task.task_id, good, new_id()).revision == 1


def test_a_closed_study_takes_no_answers(study):
    store, _, _ = study
    task = next_task(store, "s1", "ann")
    with pytest.raises(StudyError, match="owner"):
        set_status(store, "s1", "ann", "closed")
    set_status(store, "s1", "olivia", "closed")
    with pytest.raises(StudyError, match="closed"):
        submit(store, "s1", "ann", task.task_id, answers_for(task, np.random.default_rng(0)), new_id())
    assert rater_studies(store, "ann") == []
    set_status(store, "s1", "olivia", "open")
    assert [s["study_id"] for s in rater_studies(store, "ann")] == ["s1"]


def test_rater_codes_and_late_raters(study):
    store, rep, _ = study
    assert set(rep.raters) == {"ann", "bob"}
    assert verify_rater_code(store, "s1", "ann", rep.raters["ann"])
    assert not verify_rater_code(store, "s1", "ann", rep.raters["bob"])
    assert not verify_rater_code(store, "s1", "nobody", rep.raters["ann"])
    new = reset_rater_code(store, "s1", "ann")
    assert verify_rater_code(store, "s1", "ann", new) and not verify_rater_code(store, "s1", "ann", rep.raters["ann"])
    code = add_rater(store, "s1", "cat", "Dr Cat")
    assert verify_rater_code(store, "s1", "cat", code)
    assert progress(store, "s1", "cat").total == rep.units
    assert sorted(_order(store, "cat")) == sorted(_order(store, "ann")) and _order(store, "cat") != _order(store, "ann")
    with pytest.raises(StudyError, match="already"):
        add_rater(store, "s1", "cat")


def test_continuous_aspects_and_no_turing(tmp_path):
    sources = make_sources(tmp_path)
    store = Store(tmp_path / "ann")
    cfg = study_dict(sources, turing_test=False, aspects=[{"key": "vas", "label": "Overall", "type": "continuous"}])
    create_study(store, parse_config(cfg))
    task = next_task(store, "s1", "ann")
    assert not task.ask_judgement and task.aspects[0].step is None
    submit(store, "s1", "ann", task.task_id, Answers(scores={"vas": 7.25}), new_id())
    assert store.db.execute("SELECT value FROM ratings").fetchone()[0] == 7.25
    t2 = next_task(store, "s1", "ann")
    with pytest.raises(StudyError, match="no real-or-synthetic"):
        submit(store, "s1", "ann", t2.task_id, Answers(scores={"vas": 1}, judgement="real", confidence=3), new_id())


def test_ranking_task(tmp_path):
    sources = make_sources(tmp_path)
    store = Store(tmp_path / "ann")
    create_study(store, parse_config(study_dict(sources, template="colonoscopy", set_size=3)))
    rng = np.random.default_rng(0)
    while (task := next_task(store, "s1", "ann")).kind != "ranking":
        submit(store, "s1", "ann", task.task_id, answers_for(task, rng), new_id())
    for bad in (("Model A", "Model B"), ("Model A", "Model A", "Model B"), ("Model A", "Model B", "Model Z")):
        with pytest.raises(StudyError, match="ranking must order"):
            submit(store, "s1", "ann", task.task_id, Answers(ranking=bad), new_id())
    with pytest.raises(StudyError, match="ranking only"):
        submit(
            store,
            "s1",
            "ann",
            task.task_id,
            Answers(scores={"clinical_realism": 3}, ranking=task.ranking_options),
            new_id(),
        )
    submit(store, "s1", "ann", task.task_id, Answers(ranking=("Model C", "Model A", "Model B")), new_id())
    labels = dict(store.db.execute("SELECT label, name FROM sources WHERE role = 'rated'").fetchall())
    stored = dict(store.db.execute("SELECT source, rank FROM rankings").fetchall())
    assert stored == {labels["Model C"]: 1, labels["Model A"]: 2, labels["Model B"]: 3}
    assert get_task(store, "s1", "ann", task.task_id).answers.ranking == ("Model C", "Model A", "Model B")
    assert next_task(store, "s1", "ann") is None


def test_the_study_survives_its_originals_moving(study):
    store, _, sources = study
    shutil.rmtree(sources)
    task = next_task(store, "s1", "ann")
    assert Image.open(io.BytesIO(task.images[0].png)).size == (48, 48)
    assert submit(store, "s1", "ann", task.task_id, answers_for(task, np.random.default_rng(0)), new_id()).revision == 1
    # Originals were copied too: an owner can still re-measure exactly the images that were rated.
    for sha, rel in store.db.execute("SELECT sha256, original_file FROM items"):
        assert hashlib.sha256((store.study_dir("s1") / rel).read_bytes()).hexdigest() == sha


def test_answers_from_a_client_payload(study):
    store, _, _ = study
    task = next_task(store, "s1", "ann")
    payload = {
        "scores": {a.key: 6 for a in task.aspects},
        "artefacts": ["tiling_seams"],
        "judgement": "synthetic",
        "confidence": 4,
        "comment": "nuclei look stamped",
        "time_ms": 8123,
    }
    answers = Answers.from_dict(payload)
    assert answers.to_dict() == {**payload, "ranking": []}
    submit(store, "s1", "ann", task.task_id, answers, new_id())
    again = get_task(store, "s1", "ann", task.task_id).to_public_dict(images="omit")
    assert again["answers"] == {**payload, "scores": {k: 6.0 for k in payload["scores"]}, "ranking": []}
    assert "src" not in again["images"][0]
    with pytest.raises(StudyError, match="unknown field"):
        Answers.from_dict({**payload, "source": "x"})
