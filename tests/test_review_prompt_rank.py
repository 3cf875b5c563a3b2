"""The Prompt-to-Polyp per-prompt ranking: groups with the real image, blinded tasks, ranks each used once
(refused server-side otherwise), revisions, and the analysis figures against hand-computed small cases."""

from __future__ import annotations

import json
import math
import re
import sqlite3

import pytest
from test_review_support import MODELS, REAL, make_sources, new_id, study_dict

from histolab.cli import main
from histolab.errors import StudyError
from histolab.review import Store, add_rater, create_study, parse_config
from histolab.review.blinding import check_clean_png
from histolab.review.metrics_file import Metrics
from histolab.review.prompt_rank import (
    check_ranks,
    get_rank_task,
    next_rank_task,
    rank_task_at,
    submit_ranks,
)
from histolab.review.prompt_rank_analysis import RankRow, prompt_rank_summary, summarize


@pytest.fixture()
def study(tmp_path):
    sources = make_sources(tmp_path)
    store = Store(tmp_path / "ann")
    rep = create_study(store, parse_config(study_dict(sources, prompt_ranking=True)))
    return store, rep, sources


def _origin(store, task_id, rater, image_id):
    """The source behind a rater's image id (what only the store can tell)."""
    from histolab.review.prompt_rank import _members, _study

    st = _study(store, "s1", rater)
    gid = store.db.execute("SELECT group_id FROM prompt_rank_assignments WHERE task_id = ?", [task_id]).fetchone()[0]
    return {m[0]: m[2] for m in _members(store, st, rater, gid)}[image_id]


def test_groups_hold_one_image_of_every_source_for_one_prompt(study):
    store, rep, _ = study
    assert rep.prompt_rank_groups == 9  # 3 classes x 3 images in the scarcest source
    assert rep.units == 27  # the usual tasks are unchanged beside it
    rows = store.db.execute(
        "SELECT g.group_id, g.class, m.source, i.class FROM prompt_rank_groups g "
        "JOIN prompt_rank_members m ON m.group_id = g.group_id JOIN items i ON i.item_id = m.item_id"
    ).fetchall()
    by_group: dict[int, list] = {}
    for gid, gcls, src, icls in rows:
        assert gcls == icls  # every image of a group is of the group's prompt
        by_group.setdefault(gid, []).append(src)
    assert all(sorted(v) == sorted([REAL, *MODELS]) for v in by_group.values())
    # No image is used twice.
    items = [r[0] for r in store.db.execute("SELECT item_id FROM prompt_rank_members")]
    assert len(items) == len(set(items)) == 27


def test_config_needs_exactly_one_rated_real_source(tmp_path):
    sources = make_sources(tmp_path)
    d = study_dict(sources, prompt_ranking=True)
    d["sources"] = d["sources"][1:]  # models only
    with pytest.raises(StudyError, match="exactly one rated real source"):
        parse_config(d)
    with pytest.raises(StudyError, match="per_prompt"):
        parse_config(study_dict(sources, prompt_ranking={"per_prompt": 0}))
    cfg = parse_config(study_dict(sources, prompt_ranking={"per_prompt": 2}))
    rep = create_study(Store(tmp_path / "a"), cfg)
    assert rep.prompt_rank_groups == 6


def test_a_rater_sees_no_origin_and_their_own_order(study):
    store, _, _ = study
    ann, bob = next_rank_task(store, "s1", "ann"), next_rank_task(store, "s1", "bob")
    payload = json.dumps(ann.to_public_dict(images="omit")).lower()
    for name in (REAL, *MODELS, "GENFILE"):
        assert name.lower() not in payload
    for word in ("real", "synthetic", "source", "model", "generated"):
        assert not re.search(rf"\b{word}\b", payload)
    for im in ann.images:
        check_clean_png(im.png)  # no text chunk, no recipe
    assert set(ann.to_public_dict()) == {
        "task_id", "kind", "position", "progress", "instructions", "prompt", "images", "ranks", "answers",
    }  # fmt: skip
    assert ann.ranks == (1, 2, 3) and len(ann.images) == 3 and ann.prompt
    assert all(im.png.startswith(b"\x89PNG") for im in ann.images)
    # Ids differ per rater, and the same group shows its images in other orders to different raters.
    ann_ids = {im.image_id for im in ann.images}
    assert not ann_ids & {im.image_id for im in bob.images}
    orders = set()
    for pos in range(1, 10):
        t = rank_task_at(store, "s1", "ann", pos)
        orders.add(tuple(_origin(store, t.task_id, "ann", im.image_id) for im in t.images))
    assert len(orders) > 1  # the real image is not always in the same place


def test_incomplete_and_duplicate_ranks_are_refused_and_nothing_is_written(study):
    store, _, _ = study
    t = next_rank_task(store, "s1", "ann")
    a, b, c = (im.image_id for im in t.images)
    bad = [
        ({a: 1, b: 2}, "incomplete ranking: 1 of the 3 images have no rank"),
        ({a: 1, b: 1, c: 2}, r"rank\(s\) \[1\] given more than once, rank\(s\) \[3\] not given"),
        ({a: 1, b: 2, c: 4}, "from 1 to 3 but is 4"),
        ({a: 1, b: 2, c: True}, "whole number"),
        ({a: 1, b: 2, c: 3, "f" * 32: 1}, "not in this task"),
        ([a, b, c], "must map each image id"),
    ]
    for ranks, msg in bad:
        with pytest.raises(StudyError, match=msg):
            submit_ranks(store, "s1", "ann", t.task_id, ranks, new_id())
    assert store.db.execute("SELECT COUNT(*) FROM prompt_ranks").fetchone()[0] == 0
    assert store.db.execute("SELECT COUNT(*) FROM prompt_rank_submissions").fetchone()[0] == 0
    # Another rater's task id is unknown to this one.
    other = next_rank_task(store, "s1", "bob")
    with pytest.raises(StudyError, match="unknown rank task"):
        submit_ranks(store, "s1", "ann", other.task_id, {a: 1, b: 2, c: 3}, new_id())
    # The database itself refuses a second current row with the same rank.
    ack = submit_ranks(store, "s1", "ann", t.task_id, {a: 1, b: 2, c: 3}, new_id())
    row = store.db.execute("SELECT submission_id, study_id, group_id, rater_id FROM prompt_ranks LIMIT 1").fetchone()
    with pytest.raises(sqlite3.IntegrityError):
        store.db.execute(
            "INSERT INTO prompt_ranks (submission_id, study_id, group_id, rater_id, item_id, rank) "
            "VALUES (?, ?, ?, ?, (SELECT MAX(item_id) FROM items), 1)",
            list(row),
        )
    assert ack.done == 1 and ack.total == 9


def test_submit_is_idempotent_and_a_revision_supersedes(study):
    store, _, _ = study
    t = next_rank_task(store, "s1", "ann")
    ids = [im.image_id for im in t.images]
    sid = new_id()
    first = submit_ranks(store, "s1", "ann", t.task_id, dict(zip(ids, (1, 2, 3), strict=True)), sid)
    again = submit_ranks(store, "s1", "ann", t.task_id, dict(zip(ids, (1, 2, 3), strict=True)), sid)
    assert (first.revision, first.duplicate, again.duplicate) == (1, False, True)
    with pytest.raises(StudyError, match="already used for other answers"):
        submit_ranks(store, "s1", "ann", t.task_id, dict(zip(ids, (3, 2, 1), strict=True)), sid)
    rev = submit_ranks(store, "s1", "ann", t.task_id, dict(zip(ids, (3, 2, 1), strict=True)), new_id())
    assert rev.revision == 2
    back = get_rank_task(store, "s1", "ann", t.task_id)
    assert back.answers == dict(zip(ids, (3, 2, 1), strict=True))
    assert store.db.execute("SELECT COUNT(*) FROM prompt_ranks WHERE current = 0").fetchone()[0] == 3
    assert next_rank_task(store, "s1", "ann").task_id != t.task_id


def test_a_rater_added_later_gets_every_group(study):
    store, _, _ = study
    add_rater(store, "s1", "cyd")
    n = store.db.execute("SELECT COUNT(*) FROM prompt_rank_assignments WHERE rater_id = 'cyd'").fetchone()[0]
    assert n == 9


def test_check_ranks_accepts_a_permutation_only():
    assert check_ranks({"x": 2, "y": 1}, ["x", "y"]) == {"x": 2, "y": 1}
    with pytest.raises(StudyError, match="given more than once"):
        check_ranks({"x": 2, "y": 2}, ["x", "y"])


# ---------------------------------------------------------------- analysis, by hand


def _rows():
    # Two raters x two groups, N = 3 (sources m1, m2 and the real image r).
    ranks = {
        ("a", 1): {"r": 1, "m1": 2, "m2": 3},
        ("a", 2): {"r": 2, "m1": 1, "m2": 3},
        ("b", 1): {"r": 1, "m1": 3, "m2": 2},
        ("b", 2): {"r": 3, "m1": 1, "m2": 2},
    }
    h = {"r": ("h_r",), "m1": ("h_m1",), "m2": ("h_m2",)}
    return [RankRow(rt, g, s, k, h[s]) for (rt, g), d in ranks.items() for s, k in d.items()]


def test_mean_rank_real_first_and_tiers_by_hand():
    metrics = Metrics(
        items={"h_r": {"sharp": 1.0}, "h_m1": {"sharp": 3.0}, "h_m2": {"sharp": 5.0}},
        sets={"m1": {"fid": 10.0}, "m2": {"fid": 30.0}},
    )
    s = summarize(_rows(), "r", metrics, n_boot=200)
    means = {x.source: x.mean_rank for x in s.sources}
    # r: (1+2+1+3)/4 = 1.75; m1: (2+1+3+1)/4 = 1.75; m2: (3+3+2+2)/4 = 2.5
    assert means == {"r": 1.75, "m1": 1.75, "m2": 2.5}
    assert [x.source for x in s.sources] == ["m1", "r", "m2"]  # ties by name
    assert next(x for x in s.sources if x.source == "m2").counts == {1: 0, 2: 2, 3: 2}
    assert (s.rankings, s.groups, s.raters, s.n_images) == (4, 2, 2, 3)
    assert (s.real_first, s.real_first_rate, s.chance) == (2, 0.5, pytest.approx(1 / 3))
    # Wilson 95% for 2/4: (p + z²/2n ± z·sqrt(p(1-p)/n + z²/4n²)) / (1 + z²/n)
    z = 1.959963984540054
    c, half = (0.5 + z * z / 8) / (1 + z * z / 4), z * math.sqrt(0.25 / 4 + z * z / 64) / (1 + z * z / 4)
    assert s.real_first_ci == pytest.approx((c - half, c + half))
    # Exact binomial, two-sided, 2 of 4 at p = 1/3: P(X=0..4) = 16, 32, 24, 8, 1 (/81); the outcomes no more
    # likely than the observed X=2 (24/81) are X=0, 2, 3, 4: (16 + 24 + 8 + 1) / 81.
    assert s.real_first_p == pytest.approx(49 / 81)
    t1, t2, t3 = s.tiers
    assert t1.sources == {"m1": 2, "r": 2} and t1.n == 4
    # Rank 1 went to m1 twice (FID 10, sharp 3) and to r twice (no FID, sharp 1).
    assert t1.set_metrics == {"fid": {"mean": 10.0, "n": 2}}
    assert t1.item_metrics == {"sharp": {"mean": 2.0, "n": 4}}
    # Rank 2: r once, m1 once, m2 twice -> FID (10 + 30 + 30) / 3; sharp (1 + 3 + 5 + 5) / 4.
    assert t2.sources == {"m1": 1, "m2": 2, "r": 1}
    assert t2.set_metrics["fid"]["mean"] == pytest.approx(70 / 3)
    assert t2.item_metrics["sharp"]["mean"] == pytest.approx(3.5)
    # Rank 3: m2 twice, m1 once, r once.
    assert t3.sources == {"m1": 1, "m2": 2, "r": 1}


def test_mean_rank_interval_brackets_the_mean_and_collapses_without_spread():
    s = summarize(_rows(), "r", n_boot=500)
    for x in s.sources:
        lo, hi = x.ci
        assert lo <= x.mean_rank <= hi
    # m1's group means are (2+3)/2 = 2.5 and (1+1)/2 = 1: the interval lies within them.
    m1 = next(x for x in s.sources if x.source == "m1")
    assert 1.0 <= m1.ci[0] < m1.ci[1] <= 2.5
    flat = [RankRow("a", g, src, k) for g in (1, 2, 3) for src, k in (("r", 1), ("m", 2))]
    s2 = summarize(flat, "r", n_boot=100)
    assert next(x for x in s2.sources if x.source == "r").ci == (1.0, 1.0)
    assert s2.real_first == 3 and s2.real_first_rate == 1.0


def test_cli_prints_the_blinded_summary_and_names_for_the_owner(study, capsys):
    store, _, _ = study
    for rater in ("ann", "bob"):
        while (t := next_rank_task(store, "s1", rater)) is not None:
            real = next(im.image_id for im in t.images if _origin(store, t.task_id, rater, im.image_id) == REAL)
            others = [im.image_id for im in t.images if im.image_id != real]
            submit_ranks(store, "s1", rater, t.task_id, {real: 1, others[0]: 2, others[1]: 3}, new_id())
    s = prompt_rank_summary(store, "s1")
    assert (s.real_first, s.rankings, s.real_first_rate) == (18, 18, 1.0)
    ann = str(store.root)
    assert main(["study", "--annotations", ann, "prompt-ranks", "s1"]) == 0
    out = capsys.readouterr().out
    assert "real image ranked first: 18/18" in out and "real image (real): 1.00" in out
    assert not any(m in out for m in MODELS)
    assert main(["study", "--annotations", ann, "prompt-ranks", "s1", "--owner", "olivia", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["real_source"] == REAL and {x["source"] for x in d["sources"]} == {REAL, *MODELS}
    assert main(["study", "--annotations", ann, "prompt-ranks", "s1", "--owner", "mallory"]) == 2
