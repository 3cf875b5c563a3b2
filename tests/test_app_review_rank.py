"""The rater page's per-prompt ranking handlers (histolab.ui.review_rank) without a browser: the readiness
check, what a view holds (nothing that names an origin), and submits: the library's refusals pass through
unchanged with nothing stored, complete ranks are stored against the right images, a stale click and a
retried submit store nothing twice."""

from __future__ import annotations

import json

import numpy as np
import pytest
from app_testkit import make_services
from test_review_support import MODELS, REAL, answers_for, make_sources, new_id, study_dict

from histolab.errors import StudyError
from histolab.ui.common import new_session
from histolab.ui.review import sign_in
from histolab.ui.review_rank import rank_missing, show_next, submit_group

STUDY = "s1"


@pytest.fixture()
def env(tiny_model, tmp_path):
    from histolab.review import create_study, parse_config

    sources = make_sources(tmp_path, per_class=1)
    services = make_services(tmp_path, tiny_model)
    report = create_study(services.store(), parse_config(study_dict(sources, prompt_ranking=True)))
    return services, report.raters


def finish_ordinary(services, rater: str) -> None:
    from histolab.review import next_task, submit

    store, rng = services.store(), np.random.default_rng(1)
    while (task := next_task(store, STUDY, rater)) is not None:
        submit(store, STUDY, rater, task.task_id, answers_for(task, rng), new_id())


def signed_in(services, codes, rater: str) -> dict:
    session = new_session()
    sign_in(services, session, STUDY, rater, codes[rater])
    return session


def current(services, rater: str) -> dict[int, int]:
    rows = (
        services.store()
        .db.execute("SELECT item_id, rank FROM prompt_ranks WHERE rater_id = ? AND current = 1", [rater])
        .fetchall()
    )
    return dict(rows)


def test_readiness_names_what_is_missing_or_used_twice():
    assert rank_missing(3, []) == ["a rank for image 1", "a rank for image 2", "a rank for image 3"]
    assert rank_missing(3, [1, 1, None]) == ["a rank for image 3", "rank 1 is given more than once"]
    assert rank_missing(3, [2, "1", 3]) == []  # the page may send a choice as its text
    assert rank_missing(4, [4, 3, 2, 1, None, None]) == []  # the page's unused slots are ignored
    with pytest.raises(StudyError, match="whole number"):
        rank_missing(3, [1, "x", 2])


def test_groups_follow_the_ordinary_tasks_and_show_no_origin(env):
    services, codes = env
    session = signed_in(services, codes, "ann")
    assert show_next(services, session) == {"visible": False}  # an ordinary task is open: it comes first
    assert session["prank"] is None
    finish_ordinary(services, "ann")
    session = signed_in(services, codes, "ann")
    view = show_next(services, session)
    assert view["visible"] and view["ranks"] == [1, 2, 3] and len(view["images"]) == 3
    assert "Group 1 of 3" in view["head"] and view["prompt"].startswith("**Prompt:**")
    assert all('src="data:image/png;base64,' in im for im in view["images"])
    text = json.dumps(view)
    for name in (REAL, *MODELS, "GENFILE", "generated", "recipe"):
        assert name not in text
    # The opaque image ids stay server-side: the page knows the images by slot only.
    ids = session["prank"]["image_ids"]
    assert len(ids) == 3 and not any(i in text for i in ids)
    assert show_next(services, new_session()) == {"visible": False}  # not signed in: nothing


def test_refused_ranks_carry_the_librarys_message_and_store_nothing(env):
    services, codes = env
    finish_ordinary(services, "bob")
    session = signed_in(services, codes, "bob")
    view = show_next(services, session)
    for values, msg in [
        ([1, 2, None], "incomplete ranking: 1 of the 3 images have no rank"),
        ([1, 1, 3], r"rank\(s\) \[1\] given more than once, rank\(s\) \[2\] not given"),
        ([1, 2, 5], "from 1 to 3 but is 5"),
    ]:
        with pytest.raises(StudyError, match=msg):
            submit_group(services, session, view["task_id"], values)
    assert current(services, "bob") == {}
    assert session["prank"]["task_id"] == view["task_id"]  # still on the same group


def test_ranks_are_stored_against_the_slots_shown_then_the_next_group(env):
    from histolab.review.prompt_rank import _members, _study

    services, codes = env
    finish_ordinary(services, "ann")
    session = signed_in(services, codes, "ann")
    view = show_next(services, session)
    ids = list(session["prank"]["image_ids"])
    after = submit_group(services, session, view["task_id"], [3, 1, 2, 4, 4])  # extra slots are ignored
    assert after["message"] == "ranks saved (1 of 3 groups done)" and "Group 2 of 3" in after["head"]
    store = services.store()
    gid = store.db.execute("SELECT group_id FROM prompt_rank_assignments WHERE task_id = ?", [view["task_id"]])
    members = _members(store, _study(store, STUDY, "ann"), "ann", gid.fetchone()[0])
    item_of = {m[0]: m[1] for m in members}
    assert current(services, "ann") == {item_of[ids[0]]: 3, item_of[ids[1]]: 1, item_of[ids[2]]: 2}
    # A second click on the group already ranked stores nothing and shows the current group.
    stale = submit_group(services, session, view["task_id"], [1, 2, 3])
    assert "already saved" in stale["message"] and stale["task_id"] == after["task_id"]
    assert len(current(services, "ann")) == 3
    for _ in range(2):
        last = submit_group(services, session, session["prank"]["task_id"], [1, 2, 3])
    assert last == {"visible": False, "done": True, "message": "ranks saved (3 of 3 groups done)"}
    assert session["prank"] is None


def test_a_retried_submit_stores_once(env, monkeypatch):
    import histolab.review.prompt_rank as prompt_rank

    services, codes = env
    finish_ordinary(services, "ann")
    session = signed_in(services, codes, "ann")
    view = show_next(services, session)
    sid = session["prank"]["submission_id"]
    real_next, calls = prompt_rank.next_rank_task, []

    def flaky(*a, **k):  # the ranks are committed, then showing the next group fails once
        calls.append(1)
        if len(calls) == 1:
            raise OSError("disk hiccup while reading the next image")
        return real_next(*a, **k)

    monkeypatch.setattr(prompt_rank, "next_rank_task", flaky)
    with pytest.raises(OSError):
        submit_group(services, session, view["task_id"], [1, 2, 3])
    assert session["prank"]["submission_id"] == sid  # the session did not move on
    again = submit_group(services, session, view["task_id"], [1, 2, 3])
    assert again["message"] == "ranks saved (1 of 3 groups done)"
    db = services.store().db
    assert db.execute("SELECT COUNT(*) FROM prompt_rank_submissions").fetchone()[0] == 1
    assert len(current(services, "ann")) == 3


def test_status_counts_rank_groups_and_the_export_holds_the_ranks(env, tmp_path):
    import csv

    from histolab.review import study_status
    from histolab.review.export import export_study

    services, codes = env
    finish_ordinary(services, "ann")
    session = signed_in(services, codes, "ann")
    view = show_next(services, session)
    submit_group(services, session, view["task_id"], [2, 3, 1])
    st = {r["rater_id"]: r for r in study_status(services.store(), STUDY)["raters"]}
    assert (st["ann"]["rank_done"], st["ann"]["rank_total"]) == (1, 3)
    assert (st["bob"]["rank_done"], st["bob"]["rank_total"]) == (0, 3)
    blinded = export_study(services.store(), STUDY, tmp_path / "b")
    path = next(p for p in blinded if p.name.endswith("_prompt_ranks.csv"))
    rows = list(csv.DictReader(path.open(encoding="utf-8")))
    assert sorted(r["rank"] for r in rows) == ["1", "2", "3"] and len({r["group"] for r in rows}) == 1
    text = path.read_text(encoding="utf-8")
    for name in (REAL, *MODELS):
        assert name not in text  # blinded: sources by their labels only
    assert len({r["source"] for r in rows}) == 3
    full = export_study(services.store(), STUDY, tmp_path / "u", blinded=False, owner="olivia")
    path = next(p for p in full if p.name.endswith("_prompt_ranks.csv"))
    rows = list(csv.DictReader(path.open(encoding="utf-8")))
    assert {r["source"] for r in rows} == {REAL, *MODELS} and all(r["current"] == "1" for r in rows)


def test_the_rater_api_ranks_a_group_and_names_no_origin(env):
    from app_testkit import served
    from gradio_client import Client

    services, codes = env
    finish_ordinary(services, "bob")
    with served(services) as (_, url):
        bob = Client(url, verbose=False)
        bob.predict(STUDY, "bob", codes["bob"], api_name="/rater_sign_in")
        shown = bob.predict(api_name="/rater_rank_next")
        text = json.dumps(shown)
        assert "Group 1 of 3" in text and text.count("data:image/png;base64,") == 3
        for name in (REAL, *MODELS, "GENFILE", "generated", "recipe"):
            assert name not in text
        task_id = next(v for v in shown if isinstance(v, str) and len(v) == 32 and v.isalnum())
        refused = bob.predict(task_id, 1, 1, 2, *[None] * 5, api_name="/rater_rank_submit")
        assert "each rank 1..3 must be given exactly once" in json.dumps(refused)
        assert current(services, "bob") == {}
        done = bob.predict(task_id, 1, 3, 2, *[None] * 5, api_name="/rater_rank_submit")
        assert "ranks saved (1 of 3 groups done)" in json.dumps(done) and "Group 2 of 3" in json.dumps(done)
        assert sorted(current(services, "bob").values()) == [1, 2, 3]
