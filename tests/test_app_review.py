"""Studies and blinded review through the app's API: an admin builds a study from a generated and a real
set, raters sign in and score in parallel, resume after a reload, revise; nothing a rater receives names
a source; a rater cannot see or change another's work; exports and analysis for the owner."""

from __future__ import annotations

import base64
import json
import re
import threading
import zipfile

import pytest
from app_testkit import ADMIN_PASSWORD, make_services, served
from gradio_client import Client
from gradio_client.exceptions import AppError
from waiting import join_all

from histolab.review.blinding import png_chunks

# Positions in what the rater endpoints return (layout blocks and buttons are not part of the API's output).
HEADER, INSTRUCTIONS, PROMPT, REFERENCES, IMAGES = 0, 1, 2, 3, 4
SLIDERS = slice(5, 17)
ARTEFACTS, JUDGEMENT, CONFIDENCE = 17, 18, 19
COMMENT, SHOWN, STATUS = 28, 29, 30
NUMBERS = slice(31, 43)  # continuous aspects' values (empty here: the default aspects are 0-10 scales)
TODO = 43
N_SLIDERS, N_RANKS = 12, 8


@pytest.fixture(scope="module")
def study(tiny_model, tmp_path_factory):
    from histolab.cli.demo_data import write_generated_set

    root = tmp_path_factory.mktemp("review")
    services = make_services(root, tiny_model)
    write_generated_set(tiny_model, services.sets_root / "gen-a", 3.0, per_class=2, steps=2, seed=0)
    with served(services) as (_, url):
        admin = Client(url, verbose=False)
        admin.predict("admin", ADMIN_PASSWORD, api_name="/admin_sign_in")
        admin.predict(api_name="/study_sets")
        created, codes, chosen, invitations, invitations_csv = admin.predict(
            "blind",
            "A blinded test",
            "default",
            ["gen-a (generated)", "bundled-test (real)"],
            "bundled-val (real)",
            "alice, bob, carol",
            64,
            2,
            True,
            True,
            7,
            api_name="/study_create",
        )
        assert "study blind: 12 tasks per rater" in created and chosen["value"] == "blind"
        with open(invitations_csv, encoding="utf-8") as fh:
            rows = [line.split(",") for line in fh.read().splitlines()]
        assert rows[0] == ["rater_id", "code", "link"] and [r[0] for r in rows[1:]] == ["alice", "bob", "carol"]
        assert all(r[2].endswith("/review?study=blind") and r[1] in invitations for r in rows[1:])
        yield {
            "url": url,
            "services": services,
            "admin": admin,
            "codes": {r[0]: r[1] for r in codes["data"]},
            "forbidden": ["gen-a", "bundled-test", "bundled-val", "generated", "random-tiny", str(root), "recipe"],
        }


def sign_in(env, rater: str) -> tuple[Client, tuple]:
    client = Client(env["url"], verbose=False)
    return client, client.predict("blind", rater, env["codes"][rater], api_name="/rater_sign_in")


def answers(view, score: int = 6, judgement: str = "synthetic", comment: str = "", artefacts=("patchy_stroma",)):
    """/rater_submit's arguments for the task in ``view``."""
    scales, numbers = [score] * N_SLIDERS, [None] * N_SLIDERS
    return [view[SHOWN], *scales, list(artefacts), judgement, 4, *[None] * N_RANKS, comment, *numbers]


def position(view) -> int:
    return int(re.search(r"Item (\d+) of", view[HEADER]).group(1))


def refusal(client, args, api_name: str) -> str:
    """Why a call was refused: the rater page answers a refused sign-in or answer with a message on the page
    (an error event would block the form); values Gradio itself rejects still raise."""
    try:
        view = client.predict(*args, api_name=api_name)
    except AppError as exc:
        return str(exc)
    return view[STATUS]


def stored(env, rater: str) -> list[tuple]:
    db = env["services"].store().db
    return db.execute(
        "SELECT s.task_id, s.revision, c.text FROM submissions s LEFT JOIN comments c ON c.submission_id = s.submission_id "
        "WHERE s.study_id = 'blind' AND s.rater_id = ? ORDER BY s.received_at",
        [rater],
    ).fetchall()


def test_sign_in_is_refused_alike_for_a_wrong_study_rater_or_code(study):
    client = Client(study["url"], verbose=False)
    for args in [("blind", "alice", "wrong"), ("blind", "mallory", study["codes"]["alice"]), ("nope", "alice", "x")]:
        view = client.predict(*args, api_name="/rater_sign_in")
        assert "unknown study, rater or code" in view[STATUS] and view[SHOWN] == "" and "tries left" in view[STATUS]
    # no identity in this session
    view = client.predict(*answers([None] * 31, artefacts=()), api_name="/rater_submit")
    assert "sign in with your study" in view[STATUS] and view[SHOWN] == ""
    view = client.predict("blind", "alice", study["codes"]["alice"], api_name="/rater_sign_in")  # then the right one
    assert position(view) >= 1 and view[STATUS] == ""


def test_two_raters_in_parallel_cannot_see_or_change_each_others_work(study):
    alice, a_view = sign_in(study, "alice")
    bob, b_view = sign_in(study, "bob")
    assert a_view[SHOWN] != b_view[SHOWN]  # task ids are per rater
    errors = []

    def rate(client, view, who, n):
        try:
            for i in range(n):
                view = client.predict(*answers(view, comment=f"{who} note {i}"), api_name="/rater_submit")
                assert view[STATUS] == f"answer saved ({i + 1} of 12 done)"
        except Exception as exc:
            errors.append((who, exc))

    threads = [
        threading.Thread(target=rate, args=(alice, a_view, "alice", 3)),
        threading.Thread(target=rate, args=(bob, b_view, "bob", 2)),
    ]
    for t in threads:
        t.start()
    join_all(threads)
    assert not errors, errors
    a_rows, b_rows = stored(study, "alice"), stored(study, "bob")
    assert [r[2] for r in a_rows] == ["alice note 0", "alice note 1", "alice note 2"]
    assert [r[2] for r in b_rows] == ["bob note 0", "bob note 1"]
    # Bob sends Alice's task id: it is not his, so nothing is stored and he is shown his own current task.
    b_now = bob.predict(api_name="/rater_resume")
    view = bob.predict(
        *answers([*b_now[:SHOWN], a_rows[0][0], *b_now[SHOWN + 1 :]], comment="bob overwrites"),
        api_name="/rater_submit",
    )
    assert view[STATUS] == "that task was already answered; here is your current task" and view[SHOWN] == b_now[SHOWN]
    assert stored(study, "alice") == a_rows and stored(study, "bob") == b_rows
    # Bob looking back sees his own answers only.
    back = bob.predict(api_name="/rater_previous")
    assert back[COMMENT]["value"] == "bob note 1" and "alice" not in json.dumps(back)
    # A rater is not an admin.
    for name, args in [
        ("/study_status", ("blind",)),
        ("/study_export", ("blind", True, "all")),
        ("/study_analyse", ("blind", True)),
    ]:
        with pytest.raises(AppError, match="sign in as admin"):
            bob.predict(*args, api_name=name)


def test_reload_midway_resumes_where_the_rater_stopped(study):
    carol, view = sign_in(study, "carol")
    first = view[SHOWN]
    for _ in range(2):
        view = carol.predict(*answers(view), api_name="/rater_submit")
    third = view[SHOWN]
    carol.predict(api_name="/rater_sign_out")
    assert "sign in with your study" in carol.predict(api_name="/rater_resume")[STATUS]
    reloaded, view = sign_in(study, "carol")  # a new browser session: sign in again
    assert view[SHOWN] == third and position(view) == 3 and "2 answered" in view[HEADER]
    back = reloaded.predict(api_name="/rater_previous")
    back = reloaded.predict(api_name="/rater_previous")
    assert back[SHOWN] == first and "revising your answer" in back[HEADER]
    revised = reloaded.predict(*answers(back, score=2, comment="changed my mind"), api_name="/rater_submit")
    assert revised[STATUS] == "answer revised (2 of 12 done)" and revised[SHOWN] == third
    rows = stored(study, "carol")
    assert [r[1] for r in rows] == [1, 1, 2] and rows[2][0] == first


def test_a_retried_submit_reuses_its_submission_id_and_stores_once(study, monkeypatch):
    import histolab.review as review_api
    from histolab.ui.common import new_session
    from histolab.ui.review import sign_in as ui_sign_in
    from histolab.ui.review import submit_answers

    services = study["services"]
    session = new_session()
    view = ui_sign_in(services, session, "blind", "alice", study["codes"]["alice"])
    sid = session["review"]["submission_id"]
    real_next = review_api.next_task
    calls = []

    def flaky(*a, **k):  # the answer is committed, then showing the next task fails once
        calls.append(1)
        if len(calls) == 1:
            raise OSError("disk hiccup while reading the next image")
        return real_next(*a, **k)

    monkeypatch.setattr(review_api, "next_task", flaky)
    before = len(stored(study, "alice"))
    args = (view["task_id"], [5] * 5, [], "real", 3, [], "retry me")
    with pytest.raises(OSError):
        submit_answers(services, session, *args)
    assert session["review"]["submission_id"] == sid  # the session did not move on
    after = submit_answers(services, session, *args)  # the retry
    assert after["message"].startswith("answer saved") and session["review"]["submission_id"] != sid
    rows = stored(study, "alice")
    assert len(rows) == before + 1 and rows[-1][2] == "retry me"
    db = services.store().db
    assert db.execute("SELECT COUNT(*) FROM submissions WHERE submission_id = ?", [sid]).fetchone()[0] == 1


def test_bad_answers_are_refused_and_nothing_is_stored(study):
    bob, view = sign_in(study, "bob")
    before = stored(study, "bob")
    for args, message in [
        (answers(view, judgement=None), "say whether you think the image is real or synthetic"),
        (answers(view, artefacts=["not_an_artefact"]), "not_an_artefact"),
        ([view[SHOWN], 11, *answers(view)[2:]], "is not in the list of choices"),
        ([view[SHOWN], None, *answers(view)[2:]], "no score for 'clinical_realism'"),
        (answers(view, score=None), "answer every required scale first"),
        (answers(view, comment="x" * 6000), "comment must be text of at most 5000 characters"),
    ]:
        assert message in refusal(bob, args, "/rater_submit")
    assert stored(study, "bob") == before
    view = bob.predict(*answers(view), api_name="/rater_submit")  # the session still works
    assert view[STATUS].startswith("answer saved")


def test_nothing_a_rater_receives_names_a_source(study):
    dave_code = study["admin"].predict("blind", "dave", api_name="/study_add_rater")
    code = re.search(r"`([^`]+)`\s*$", dave_code).group(1)
    client = Client(study["url"], verbose=False)
    views = [client.predict("blind", "dave", code, api_name="/rater_sign_in")]
    for i in range(12):
        views.append(
            client.predict(*answers(views[-1], judgement="real" if i % 2 else "synthetic"), api_name="/rater_submit")
        )
    views.append(client.predict(api_name="/rater_previous"))
    assert "All your tasks are done" in views[-2][HEADER]
    text = json.dumps(views)
    for word in study["forbidden"]:
        assert word not in text, word
    pngs = [base64.b64decode(m) for m in re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", text)]
    assert len(pngs) >= 24  # every task's image and its references
    for png in pngs:
        assert set(png_chunks(png)) <= {"IHDR", "IDAT", "IEND"}  # no text, no metadata
    assert not re.search(r"/gradio_api/file=|\.png\"|\.jpg", text)  # no file URLs or names at all


def test_owner_status_codes_analysis_and_exports(study):
    admin, url = study["admin"], study["url"]
    rows, summary = admin.predict("blind", api_name="/study_status")
    assert {r[0] for r in rows["data"]} >= {"alice", "bob", "carol"} and "12 tasks per rater" in summary
    new_code = admin.predict("blind", "bob", api_name="/study_reset_code")
    code = re.search(r"`([^`]+)`\s*$", new_code).group(1)
    old = Client(url, verbose=False).predict("blind", "bob", study["codes"]["bob"], api_name="/rater_sign_in")
    assert "unknown study, rater or code" in old[STATUS]
    bob = Client(url, verbose=False)
    view = bob.predict("blind", "bob", code, api_name="/rater_sign_in")
    assert admin.predict("blind", api_name="/study_close") == "study is now closed"
    assert "is closed" in refusal(bob, answers(view), "/rater_submit")
    assert admin.predict("blind", api_name="/study_open") == "study is now open"
    table, notes = admin.predict("blind", True, api_name="/study_analyse")
    sources = {r[0] for r in table["data"]}
    assert sources <= {"Source A", "Source B"} and sources
    table, notes = admin.predict("blind", False, api_name="/study_analyse")
    assert {r[0] for r in table["data"]} <= {"gen-a", "bundled-test"} and "visual Turing test" in notes
    blinded = admin.predict("blind", True, "all", api_name="/study_export")
    with zipfile.ZipFile(blinded) as zf:
        names = zf.namelist()
        assert "blind_blinded_report.html" in names and "blind_blinded.json" in names
        body = b"".join(zf.read(n) for n in names)
        assert b"gen-a" not in body and b"bundled-test" not in body
    unblinded = admin.predict("blind", False, "csv", api_name="/study_export")
    with zipfile.ZipFile(unblinded) as zf:
        assert b"gen-a" in b"".join(zf.read(n) for n in zf.namelist())
    with pytest.raises(AppError, match="choose a study"):
        admin.predict("../x", True, "all", api_name="/study_export")
    with pytest.raises(AppError, match="already exists"):
        admin.predict(
            "blind", "", "default", ["gen-a (generated)"], None, "zed", 64, 2, True, True, 0, api_name="/study_create"
        )
    # The sets picker is a checkbox group now: Gradio refuses a set it did not offer before the handler runs.
    with pytest.raises(AppError, match="not in the list of choices"):
        admin.predict(
            "other", "", "default", ["/etc (generated)"], None, "", 64, 2, True, True, 0, api_name="/study_create"
        )
