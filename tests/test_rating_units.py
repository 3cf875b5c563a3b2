"""Rating protocol pieces without a server (issue 13): the sign-in rate limiter on an injected clock, the
invitations CSV, which answers keep Submit disabled, and the zoomed images' HTML."""

from __future__ import annotations

import csv
import io
import re

import pytest
from PIL import Image

from histolab.errors import StudyError
from histolab.ui.auth import FAILURE_WINDOW_S, AccessDenied, Auth, SignInGuard
from histolab.ui.settings import AppSettings


class Clock:
    def __init__(self):
        self.t = 5000.0

    def __call__(self):
        return self.t


def test_the_guard_counts_tries_left_and_pauses_per_key():
    clock = Clock()
    guard = SignInGuard(clock, max_failures=3, lockout_s=60)
    keys = ("rater:s1/ann", "client:1.2.3.4")
    messages = [str(guard.refused("wrong code", *keys)) for _ in range(3)]
    assert messages[:2] == ["wrong code (2 tries left before a pause)", "wrong code (1 try left before a pause)"]
    assert messages[2] == "wrong code. Too many failed sign-ins: try again in 60 s"
    with pytest.raises(AccessDenied, match="too many failed sign-ins for this rater id; try again in 60 s"):
        guard.check("rater:s1/ann")
    with pytest.raises(AccessDenied, match="from this computer; try again in 60 s"):
        guard.check("client:1.2.3.4")
    guard.check("rater:s1/bob", "client:9.9.9.9")  # other raters and other clients are not paused
    clock.t += 45.5
    with pytest.raises(AccessDenied, match="try again in 15 s"):
        guard.check(*keys)
    clock.t += 15
    guard.check(*keys)  # the pause is over: no wait on the wall clock, the injected one moved
    # Failures older than the window no longer count.
    guard.failed("rater:s1/ann")
    clock.t += FAILURE_WINDOW_S + 1
    assert guard.failed("rater:s1/ann") == 2


def test_rater_sign_in_is_limited_per_rater_and_per_client(monkeypatch):
    import histolab.review

    codes = {("s1", "ann"): "right", ("s1", "bob"): "bobs"}
    monkeypatch.setattr(histolab.review, "verify_rater_code", lambda store, s, r, c: codes.get((s, r)) == c)
    clock = Clock()
    auth = Auth(AppSettings(), lambda: None, clock, guard=SignInGuard(clock, max_failures=3, lockout_s=30))
    with pytest.raises(AccessDenied, match=r"unknown study, rater or code.*\(2 tries left"):
        auth.rater_sign_in("s1", "ann", "wrong", "10.0.0.1")
    assert auth.rater_sign_in("s1", "ann", "right", "10.0.0.1").name == "ann"  # a wrong code, then the right one
    # Per rater id: guesses at ann's code from three computers pause ann, not bob.
    for client in ("10.0.0.2", "10.0.0.3", "10.0.0.4"):
        with pytest.raises(AccessDenied, match="unknown study, rater or code"):
            auth.rater_sign_in("s1", "ann", "guess", client)
    with pytest.raises(AccessDenied, match="for this rater id; try again in 30 s"):
        auth.rater_sign_in("s1", "ann", "right", "10.0.0.5")
    assert auth.rater_sign_in("s1", "bob", "bobs", "10.0.0.5").name == "bob"
    # Per client: one computer guessing at several raters is paused, whoever it tries next.
    for rater in ("carl", "dora", "emil"):
        with pytest.raises(AccessDenied, match="unknown study, rater or code"):
            auth.rater_sign_in("s1", rater, "guess", "10.0.0.9")
    with pytest.raises(AccessDenied, match="from this computer; try again in 30 s"):
        auth.rater_sign_in("s1", "bob", "bobs", "10.0.0.9")
    clock.t += 30
    assert auth.rater_sign_in("s1", "ann", "right", "10.0.0.9").name == "ann"


def test_invitations_csv_has_every_rater_code_and_link():
    from histolab.review.invitations import invitation_rows, invitations_csv, invitations_text, rater_link

    rows = invitation_rows("http://host:7860/", "my-study", [("ann", "c0de-A_1"), ("bob", 'we"ird,code')])
    assert rows[0] == ("ann", "c0de-A_1", "http://host:7860/review?study=my-study")
    text = invitations_csv(rows)
    parsed = list(csv.reader(io.StringIO(text)))
    assert parsed == [
        ["rater_id", "code", "link"],
        ["ann", "c0de-A_1", "http://host:7860/review?study=my-study"],
        ["bob", 'we"ird,code', "http://host:7860/review?study=my-study"],
    ]
    assert "c0de-A_1" not in rows[0][2]  # the code never goes into the link
    mail = invitations_text("Skin study", rows)
    assert mail.count("Open http://host:7860/review?study=my-study") == 2 and "Code: c0de-A_1" in mail
    with pytest.raises(StudyError, match="unknown study"):
        rater_link("http://h/", "../x")
    with pytest.raises(StudyError, match="needs a rater id and a code"):
        invitation_rows("http://h/", "s", [("ann", "")])


def test_studies_tab_writes_the_invitations_file(tmp_path):
    from types import SimpleNamespace

    from histolab.ui.studies import base_url, invitations

    base = base_url(SimpleNamespace(headers={"Host": "lab.example:7860", "X-Forwarded-Proto": "https"}))
    assert base == "https://lab.example:7860/"
    text, path = invitations("skin", "Skin", [["ann", "abc"], ["bob", "def"]], base)
    with open(path, newline="", encoding="utf-8") as fh:
        assert list(csv.reader(fh))[1:] == [
            ["ann", "abc", "https://lab.example:7860/review?study=skin"],
            ["bob", "def", "https://lab.example:7860/review?study=skin"],
        ]
    assert path.endswith("skin_invitations.csv") and "Rater id: bob" in text


def test_submit_stays_disabled_until_every_required_answer_is_set():
    from histolab.ui.review import _answers, missing_answers

    cur = {
        "kind": "item",
        "aspects": ["realism", "stain", "nuclei"],
        "aspect_labels": ["Realism", "Stain", "Nuclei (optional)"],
        "aspect_types": ["scale", "continuous", "scale"],
        "required": [True, True, False],
        "ask_judgement": True,
        "judgement_required": True,
        "ranking_options": [],
    }
    assert missing_answers(cur, [None, None, None], None, None, []) == ["Realism", "Stain", "real or synthetic"]
    assert missing_answers(cur, [0, None, None], "real", None, []) == ["Stain", "how sure"]
    assert missing_answers(cur, [0, 0.0, None], "real", 1, []) == []  # 0 is an answer, not "unset"
    with pytest.raises(StudyError, match="no score for 'stain'"):
        _answers(cur, [4, None, None], [], "real", 2, [], "")
    a = _answers(cur, [4, 2.5, None], [], "synthetic", 2, [], "")
    assert a.scores == {"realism": 4, "stain": 2.5}  # the optional one left unset: absent, not a default
    optional_judgement = {**cur, "judgement_required": False}
    assert missing_answers(optional_judgement, [1, 1, None], None, None, []) == []
    assert missing_answers(optional_judgement, [1, 1, None], None, 3, []) == ["real or synthetic"]
    assert _answers(optional_judgement, [1, 1, None], [], None, None, [], "").judgement is None
    ranking = {"kind": "ranking", "ranking_options": ["Model A", "Model B"], "aspects": [], "ask_judgement": False}
    assert missing_answers(ranking, [], None, None, ["Model B", None]) == ["rank 2"]


def test_review_images_are_shown_at_whole_pixel_zoom():
    from histolab.ui.rating_page import auto_zoom, zoomed_images_html

    buf = io.BytesIO()
    Image.new("RGB", (64, 64), "white").save(buf, format="PNG")
    out = zoomed_images_html([buf.getvalue()], caption="Image", fit_px=384)
    assert "image-rendering:pixelated" in out and "calc(64px * var(--hl-zoom, 6))" in out
    assert re.search(r'alt="Image"', out) and "max-width:none" in out
    assert (auto_zoom(64, 384), auto_zoom(512, 384), auto_zoom(100, 384)) == (6, 1, 3)
    assert zoomed_images_html([], caption="Image", fit_px=384) == ""
    assert 'alt="Set image &lt;&quot;x&quot;&gt;"' in zoomed_images_html(
        [buf.getvalue()], caption='Set image <"x">', fit_px=9
    )
