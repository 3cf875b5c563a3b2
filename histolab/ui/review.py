"""The Review tab: a rater signs in and scores their tasks blind.

Everything shown comes from the rater API (histolab.review.session), which
returns only what is safe to show: opaque ids, clean PNG bytes, aspects,
checklist, prompt text and progress. The images go to the page inline
(data URLs built from those bytes, with neutral alt text), never as a file
path or URL, so nothing in the page, its network traffic or a saved file name
can tell real from synthetic or one model from another.

Who is rating comes from the session's server-side state, set at sign-in.
The task being answered is the one this session was shown (kept server-side
with its fresh submission id); the page's copy of the task id only detects a
stale click. A submission id is minted per task view and reused when a submit
is retried, so a retry never stores an answer twice; an answer is acknowledged
only after the rater API has committed it.
"""

from __future__ import annotations

import html
import time
import uuid
from typing import Any

import gradio as gr

from histolab.errors import HistolabError, StudyError
from histolab.ui import review_rank
from histolab.ui.auth import AccessDenied
from histolab.ui.common import OnLoad, client_key, new_session, ui_errors
from histolab.ui.rating_page import ITEM_FIT_PX, KEYS_JS, LEGEND, SET_FIT_PX, ZOOM_CHOICES, ZOOM_JS, zoomed_images_html

MAX_ASPECTS = 12  # scale slots on the page; the default templates use 5-6 aspects
MAX_RANKS = 8  # models a ranking task can order
CONFIDENCE_INFO = "1: a guess · 3: fairly sure · 5: certain"
JUDGEMENT_CHOICES = [("Real", "real"), ("Synthetic", "synthetic")]
SCALE_CHOICES = list(range(11))  # 0..10, one radio each: nothing is pre-selected
CONFIDENCE_CHOICES = list(range(1, 6))


# ------------------------------------------------------------------ plain handlers


def _anchors_text(anchors) -> str:
    return " · ".join(f"{k}: {v}" for k, v in anchors)


def _view(task, done_message: str = "") -> dict[str, Any]:
    """What the page shows for a task (or for 'all done' when ``task`` is None).

    Every answer starts unset (None) on a new task: a pre-set slider anchors the score and hides a
    skipped answer. Only a revisited task shows the rater's own earlier answers.
    """
    if task is None:
        return {"done": True, "headline": done_message or "All your tasks are done. Thank you!", "message": ""}
    kind = task.kind
    caption = "Image" if kind == "item" else "Set image"
    prompt = f"**Prompt:** {html.escape(task.prompt)}" if task.prompt else ""
    if task.set_label:
        prompt = f"**{html.escape(task.set_label)}**" + (f" · {prompt}" if prompt else "")
    answers = task.answers
    return {
        "done": False,
        "task_id": task.task_id,
        "kind": kind,
        "position": task.position,
        "progress": (task.progress.done, task.progress.total),
        "instructions": task.instructions,
        "prompt": prompt,
        "references": zoomed_images_html([t.png for t in task.references], caption="Real reference", fit_px=SET_FIT_PX),
        "images": zoomed_images_html(
            [t.png for t in task.images], caption=caption, fit_px=ITEM_FIT_PX if kind == "item" else SET_FIT_PX
        ),
        "aspects": [
            {
                "key": a.key,
                "label": a.label + ("" if a.required else " (optional)"),
                "info": (a.description + " — " if a.description else "") + _anchors_text(a.anchors),
                "type": a.type,
                "required": a.required,
                "value": (answers.scores.get(a.key) if answers else None),
            }
            for a in task.aspects
        ],
        "artefacts": [(a.label, a.key) for a in task.artefacts],
        "artefacts_marked": list(answers.artefacts) if answers else [],
        "ask_judgement": task.ask_judgement,
        "judgement_required": task.ask_judgement and task.judgement_required,
        "judgement": answers.judgement if answers else None,
        "confidence": answers.confidence if answers else None,
        "ranking_options": list(task.ranking_options),
        "ranking": list(answers.ranking) if answers else [],
        "comment": answers.comment if answers else "",
        "revising": answers is not None,
    }


def _remember(session: dict, task) -> None:
    """This session's current task, with a fresh submission id for this view."""
    if task is None:
        session["review"] = None
        return
    session["review"] = {
        "task_id": task.task_id,
        "position": task.position,
        "kind": task.kind,
        "aspects": [a.key for a in task.aspects],
        "aspect_labels": [a.label for a in task.aspects],
        "aspect_types": [a.type for a in task.aspects],
        "required": [a.required for a in task.aspects],
        "judgement_required": task.ask_judgement and task.judgement_required,
        "artefacts": [a.key for a in task.artefacts],
        "ask_judgement": task.ask_judgement,
        "ranking_options": list(task.ranking_options),
        "submission_id": uuid.uuid4().hex,
        "shown_at": time.monotonic(),
    }


def sign_in(services, session: dict, study_id: str, rater_id: str, code: str, client: str = "") -> dict[str, Any]:
    from histolab.review import next_task

    ident = services.auth.rater_sign_in(study_id, rater_id, code, client)
    session["rater"] = ident
    task = next_task(services.store(), ident.study_id, ident.name)  # resuming is asking for the next task
    _remember(session, task)
    return _view(task)


def resume(services, session: dict) -> dict[str, Any]:
    from histolab.review import next_task

    ident = services.auth.require_rater(session)
    task = next_task(services.store(), ident.study_id, ident.name)
    _remember(session, task)
    return _view(task)


def previous(services, session: dict) -> dict[str, Any]:
    """The task before the current one (to revise an answer)."""
    from histolab.review import progress, task_at

    ident = services.auth.require_rater(session)
    store = services.store()
    cur = session.get("review")
    position = cur["position"] - 1 if cur else progress(store, ident.study_id, ident.name).total
    if position < 1:
        raise StudyError("this is your first task")
    task = task_at(store, ident.study_id, ident.name, position)
    _remember(session, task)
    return _view(task)


def sign_out(session: dict) -> dict[str, Any]:
    session["rater"] = None
    session["review"] = None
    return {"done": True, "headline": "", "message": "signed out"}


def missing_answers(cur: dict, scores: list, judgement, confidence, ranking: list) -> list[str]:
    """The required answers still unset for this session's task, by the labels the rater sees."""
    if cur is None:
        return []
    if cur["kind"] == "ranking":
        n = len(cur["ranking_options"])
        return [f"rank {i + 1}" for i, r in enumerate(list(ranking)[:n] + [None] * (n - len(ranking))) if not r]
    required = cur.get("required") or [True] * len(cur["aspects"])
    labels = cur.get("aspect_labels") or cur["aspects"]
    out = [
        label
        for label, req, v in zip(labels, required, list(scores) + [None] * len(labels), strict=False)
        if req and v in (None, "")
    ]
    if cur["ask_judgement"]:
        if judgement not in ("real", "synthetic"):
            if cur.get("judgement_required", True) or confidence not in (None, ""):
                out.append("real or synthetic")
        elif confidence in (None, ""):
            out.append("how sure")
    return out


def _answers(cur: dict, scores: list, artefacts: list, judgement, confidence, ranking: list, comment: str):
    from histolab.review import Answers

    if cur["kind"] == "ranking":
        ranks = [r for r in ranking[: len(cur["ranking_options"])]]
        if any(not r for r in ranks):
            raise StudyError("give every rank a model (each model once)")
        return Answers(ranking=tuple(ranks), comment=comment or "")
    required = cur.get("required") or [True] * len(cur["aspects"])
    values = {}
    missing = []
    for key, typ, req, v in zip(cur["aspects"], cur["aspect_types"], required, scores, strict=False):
        if v is None or v == "":
            if req:
                missing.append(key)
            continue  # an optional answer left unset: nothing is sent for it, never a default
        values[key] = round(float(v)) if typ == "scale" and float(v) == round(float(v)) else float(v)
    if missing:
        raise StudyError(f"no score for {', '.join(repr(k) for k in missing)}: answer every required scale first")
    ask = cur["ask_judgement"]
    if ask and judgement not in ("real", "synthetic"):
        if cur.get("judgement_required", True) or confidence not in (None, ""):
            raise StudyError("say whether you think the image is real or synthetic")
        judgement = None
    conf = None
    if ask and judgement is not None:
        if confidence in (None, ""):
            raise StudyError("say how sure you are (1 to 5) with your real-or-synthetic answer")
        try:
            conf = round(float(confidence))
        except (TypeError, ValueError):
            raise StudyError(f"confidence must be 1 to 5 but is {confidence!r}") from None
    return Answers(
        scores=values,
        artefacts=tuple(artefacts or ()),
        judgement=judgement if ask else None,
        confidence=conf,
        comment=comment or "",
    )


def submit_answers(
    services,
    session: dict,
    shown_task_id: str,
    scores: list,
    artefacts: list,
    judgement,
    confidence,
    ranking: list,
    comment: str,
) -> dict[str, Any]:
    """Store the answers to this session's current task; return the next task's view (the ack in ``message``)."""
    from histolab.review import get_task, next_task, submit

    ident = services.auth.require_rater(session)
    store = services.store()
    cur = session.get("review")
    if cur is None:
        raise StudyError("no task is open in this session; press Resume")
    if shown_task_id and shown_task_id != cur["task_id"]:
        # A click on a task this session has moved past (e.g. a double click): show the current one again.
        view = _view(get_task(store, ident.study_id, ident.name, cur["task_id"]))
        view["message"] = "that task was already answered; here is your current task"
        return view
    answers = _answers(cur, scores, artefacts, judgement, confidence, ranking, comment)
    answers = type(answers)(**{**answers.__dict__, "time_ms": int((time.monotonic() - cur["shown_at"]) * 1000)})
    try:
        ack = submit(store, ident.study_id, ident.name, cur["task_id"], answers, submission_id=cur["submission_id"])
    except StudyError as exc:
        if "already used for other answers" in str(exc):
            cur["submission_id"] = uuid.uuid4().hex  # the first answer is stored; these become a revision
            raise StudyError("your earlier answer to this task was saved; press Submit again to replace it") from exc
        raise
    # Acknowledged: committed. Only now does the session move on (a failure above keeps the id for a retry).
    task = next_task(store, ident.study_id, ident.name)
    _remember(session, task)
    view = _view(task)
    what = "revised" if ack.revision > 1 else "saved"
    view["message"] = f"answer {what} ({ack.progress.done} of {ack.progress.total} done)"
    return view


# ------------------------------------------------------------------ the page


def _todo_text(missing: list[str]) -> str:
    if missing:
        return "Still to answer: " + ", ".join(html.escape(m) for m in missing)
    return "Every required answer is given: press Enter or Submit."


def _view_missing(view: dict[str, Any]) -> list[str]:
    """The view's required answers still unset (what keeps Submit disabled when a task is shown)."""
    cur = {
        "kind": view["kind"],
        "aspects": [a["key"] for a in view["aspects"]],
        "aspect_labels": [a["label"] for a in view["aspects"]],
        "required": [a["required"] for a in view["aspects"]],
        "ask_judgement": view["ask_judgement"],
        "judgement_required": view["judgement_required"],
        "ranking_options": view["ranking_options"],
    }
    scores = [a["value"] for a in view["aspects"]]
    return missing_answers(cur, scores, view["judgement"], view["confidence"], view["ranking"])


def build(services, session_state, *, api: bool = True):
    """The rater's UI. ``api``: its events get the public names (the rater page); False: private (a second
    copy of the UI, in the main page's Review tab, calls the same handlers)."""
    with gr.Column(visible=True) as signin_box:
        gr.Markdown(
            "### Rater sign-in\nEnter the study, your rater id and the code the study's owner sent you. "
            "You can stop at any time and sign in again later: you resume where you left off."
        )
        with gr.Row():
            study = gr.Textbox(label="Study", elem_id="rater-study")
            rater = gr.Textbox(label="Rater id", elem_id="rater-id")
            code = gr.Textbox(label="Code", type="password", elem_id="rater-code")
        signin = gr.Button("Sign in", variant="primary", elem_id="rater-signin")
    with gr.Column(visible=False, elem_id="review-task") as task_box:
        header = gr.HTML("", elem_id="review-progress")
        # One click away on every task (or the I key); closed so the image stays in view.
        with gr.Accordion("Instructions (I)", open=False, elem_id="review-instructions"):
            instructions = gr.Markdown("")
        gr.HTML(LEGEND, elem_id="review-keys", js_on_load=KEYS_JS)
        zoom = gr.Radio(ZOOM_CHOICES, value="auto", label="Zoom (whole pixels: + / −)", elem_id="review-zoom")
        prompt = gr.Markdown("")
        references = gr.HTML("", elem_id="review-references")
        images = gr.HTML("", elem_id="review-images")
        # Radios, not sliders: a slider always has a value, which anchors the score and hides a skipped answer.
        scales = [
            gr.Radio(
                SCALE_CHOICES,
                value=None,
                label=f"Aspect {i + 1}",
                visible=False,
                elem_id=f"review-aspect-{i}",
                elem_classes=["hl-scale"],
            )
            for i in range(MAX_ASPECTS)
        ]
        # Continuous aspects (any value 0-10) take a number instead, empty until the rater types one.
        numbers = [
            gr.Number(
                value=None, minimum=0, maximum=10, label=f"Aspect {i + 1}", visible=False, elem_id=f"review-value-{i}"
            )
            for i in range(MAX_ASPECTS)
        ]
        artefacts = gr.CheckboxGroup([], label="Artefacts you see", elem_id="review-artefacts")
        with gr.Row():
            judgement = gr.Radio(
                JUDGEMENT_CHOICES,
                value=None,
                label="Real or synthetic? (R / S)",
                visible=False,
                elem_id="review-judgement",
            )
            confidence = gr.Radio(
                CONFIDENCE_CHOICES,
                value=None,
                label="How sure?",
                info=CONFIDENCE_INFO,
                visible=False,
                elem_id="review-confidence",
                elem_classes=["hl-scale"],
            )
        ranks = [
            gr.Dropdown(choices=[], label=f"Rank {i + 1}", visible=False, allow_custom_value=True)
            for i in range(MAX_RANKS)
        ]
        comment = gr.Textbox(label="Comment (optional)", lines=2, elem_id="review-comment")
        shown = gr.Textbox(visible=False)
        todo = gr.Markdown("", elem_id="review-todo")
        with gr.Row():
            back = gr.Button("Previous task", elem_id="review-previous")
            send = gr.Button("Submit (Enter)", variant="primary", interactive=False, elem_id="review-submit")
            signout = gr.Button("Sign out", elem_id="review-signout")
    status = gr.Markdown("", elem_id="review-status")
    rank = review_rank.build(services, session_state, header, api=api)  # the per-prompt rank groups, after these

    # The API's outputs keep their places (header 0 ... status 30); the number slots and the to-do line follow.
    outputs = [
        signin_box,
        task_box,
        header,
        instructions,
        prompt,
        references,
        images,
        *scales,
        artefacts,
        judgement,
        confidence,
        *ranks,
        comment,
        shown,
        back,
        send,
        status,
        *numbers,
        todo,
    ]

    def blank(headline: str, message: str, show_signin: bool) -> tuple:
        """Nothing of a task left on the page (signed out, or all done)."""
        return (
            gr.update(visible=show_signin),
            gr.update(visible=not show_signin),
            "" if show_signin else f"<p><b>{html.escape(headline)}</b></p>",
            "",
            "",
            "",
            "",
            *[gr.update(visible=False, value=None) for _ in range(MAX_ASPECTS)],
            gr.update(visible=False, choices=[], value=[]),
            gr.update(visible=False, value=None),
            gr.update(visible=False, value=None),
            *[gr.update(visible=False, choices=[], value=None) for _ in ranks],
            gr.update(visible=not show_signin, value=""),
            "",
            gr.update(visible=not show_signin),
            gr.update(visible=False, interactive=False),
            message,
            *[gr.update(visible=False, value=None) for _ in range(MAX_ASPECTS)],
            "",
        )

    def unchanged(message: str) -> tuple:
        """The page as it is, with a message (a refused answer must not block the form it came from)."""
        return (
            *[gr.update() for _ in outputs[: -1 - MAX_ASPECTS - 1]],
            message,
            *[gr.update()] * MAX_ASPECTS,
            gr.update(),
        )

    def render(view: dict[str, Any], signed_in: bool) -> tuple:
        if not signed_in:
            return blank("", view.get("message", ""), show_signin=True)
        if view.get("done"):
            return blank(view.get("headline", ""), view.get("message", ""), show_signin=False)
        done, total = view["progress"]
        noun = "Item" if view["kind"] == "item" else "Task"
        head = (
            f"<div><b>{noun} {view['position']} of {total}</b> · {done} answered"
            f"{' · revising your answer' if view['revising'] else ''}"
            f'<br><progress max="{total}" value="{done}" style="width:100%"></progress></div>'
        )
        scale_updates, number_updates = [], []
        for i in range(MAX_ASPECTS):
            if i < len(view["aspects"]):
                a = view["aspects"][i]
                scale = a["type"] == "scale"
                value = None if a["value"] is None else (int(a["value"]) if scale else a["value"])
                scale_updates.append(
                    gr.update(visible=scale, label=a["label"], info=a["info"], value=value if scale else None)
                )
                number_updates.append(
                    gr.update(visible=not scale, label=a["label"], info=a["info"], value=None if scale else value)
                )
            else:
                scale_updates.append(gr.update(visible=False, value=None))
                number_updates.append(gr.update(visible=False, value=None))
        rank_updates = []
        opts = view["ranking_options"]
        for i in range(MAX_RANKS):
            if i < len(opts):
                val = view["ranking"][i] if i < len(view["ranking"]) else None
                rank_updates.append(gr.update(visible=True, choices=opts, value=val, label=f"Rank {i + 1}"))
            else:
                rank_updates.append(gr.update(visible=False, choices=[], value=None))
        item = view["kind"] != "ranking"
        missing = _view_missing(view)
        sure = "How sure?" + ("" if view["judgement_required"] else " (optional)")
        return (
            gr.update(visible=False),
            gr.update(visible=True),
            head,
            view["instructions"],
            view["prompt"],
            view["references"],
            view["images"],
            *scale_updates,
            gr.update(
                visible=item and bool(view["artefacts"]), choices=view["artefacts"], value=view["artefacts_marked"]
            ),
            gr.update(visible=view["ask_judgement"], value=view["judgement"]),
            gr.update(visible=view["ask_judgement"], value=view["confidence"], label=sure),
            *rank_updates,
            gr.update(visible=True, value=view["comment"]),
            view["task_id"],
            gr.update(visible=True),
            gr.update(visible=True, interactive=not missing),
            view.get("message", ""),
            *number_updates,
            _todo_text(missing),
        )

    def guarded(session, call) -> tuple:
        """Run a handler. A refused sign-in or an expired session shows the sign-in form again, usable, with
        the reason; a refused answer leaves the page as it is with the reason. Neither raises: an error
        event would lay Gradio's error overlay over the form the rater must use next."""
        session = session if isinstance(session, dict) else new_session()
        try:
            view = call(session)
        except AccessDenied as exc:
            session["rater"], session["review"] = None, None
            gr.Warning(str(exc))
            return blank("", str(exc), show_signin=True)
        except HistolabError as exc:
            gr.Warning(str(exc))
            return unchanged(str(exc))
        signed = services.auth.valid(session.get("rater")) is not None
        return render(view, signed)

    def handled(fn):
        @ui_errors
        def wrapper(session, *args):
            return guarded(session, lambda s: fn(s, *args))

        return wrapper

    # Gradio passes the request only to a parameter before any *args: the client's address counts failed
    # sign-ins per computer (with it missing, every computer would share one count and one pause).
    @ui_errors
    def do_sign_in(session, s, r, c, request: gr.Request = None):
        return guarded(session, lambda sess: sign_in(services, sess, s, r, c, client_key(request)))

    def do_submit(session, shown_id, *values):
        scores = list(values[:MAX_ASPECTS])
        arte, judge, conf = values[MAX_ASPECTS : MAX_ASPECTS + 3]
        ranking = list(values[MAX_ASPECTS + 3 : MAX_ASPECTS + 3 + MAX_RANKS])
        comm = values[MAX_ASPECTS + 3 + MAX_RANKS]
        nums = list(values[MAX_ASPECTS + 4 + MAX_RANKS :])
        cur = session.get("review") or {}
        types = cur.get("aspect_types") or []
        # Each aspect's answer comes from its own kind of control: a radio (scale) or a number (continuous).
        merged = [nums[i] if i < len(types) and types[i] == "continuous" else v for i, v in enumerate(scores)]
        return submit_answers(services, session, shown_id, merged, arte, judge, conf, ranking, comm)

    light = {"concurrency_limit": services.settings.light_concurrency}

    def named(name: str) -> dict:
        return {"api_name": name} if api else {"api_visibility": "private"}

    ev_in = signin.click(do_sign_in, [session_state, study, rater, code], outputs, **named("rater_sign_in"), **light)
    ev_code = code.submit(do_sign_in, [session_state, study, rater, code], outputs, api_visibility="private", **light)
    ev_send = send.click(
        handled(do_submit),
        [session_state, shown, *scales, artefacts, judgement, confidence, *ranks, comment, *numbers],
        outputs,
        **named("rater_submit"),
        **light,
    )

    def readiness(session, shown_id, *values):
        """Submit is enabled only once every required answer is set (the server checks again on submit)."""
        session = session if isinstance(session, dict) else new_session()
        cur = session.get("review")
        if cur is None or services.auth.valid(session.get("rater")) is None:
            return gr.update(interactive=False), ""
        if shown_id != cur["task_id"]:
            # Values of a task the page has moved past (this check ran after the next task was shown):
            # they must not enable Submit for the new one. The new task's own changes follow.
            return gr.update(), gr.update()
        scores = list(values[:MAX_ASPECTS])
        judge, conf = values[MAX_ASPECTS : MAX_ASPECTS + 2]
        ranking = list(values[MAX_ASPECTS + 2 : MAX_ASPECTS + 2 + MAX_RANKS])
        nums = list(values[MAX_ASPECTS + 2 + MAX_RANKS :])
        types = cur.get("aspect_types") or []
        merged = [nums[i] if i < len(types) and types[i] == "continuous" else v for i, v in enumerate(scores)]
        missing = missing_answers(cur, merged, judge, conf, ranking)
        return gr.update(interactive=not missing), _todo_text(missing)

    answer_inputs = [*scales, judgement, confidence, *ranks, *numbers]
    # On the rater's own input only (showing the next item resets every answer, and those programmatic
    # changes must not each send a check), and outside the queue: a quick series of clicks or keys must never
    # fill the queue and show "This application is currently busy" to the rater.
    gr.on(
        [c.input for c in answer_inputs],
        readiness,
        [session_state, shown, *answer_inputs],
        [send, todo],
        api_visibility="private",
        show_progress="hidden",
        trigger_mode="always_last",
        queue=False,
    )
    zoom.change(None, [zoom], None, js=ZOOM_JS, api_visibility="private")
    ev_back = back.click(
        handled(lambda session: previous(services, session)),
        [session_state],
        outputs,
        **named("rater_previous"),
        **light,
    )
    ev_out = signout.click(
        handled(lambda session: sign_out(session)),
        [session_state],
        outputs,
        **named("rater_sign_out"),
        **light,
    )
    resume_btn = gr.Button("Resume", visible=False)
    ev_resume = resume_btn.click(
        handled(lambda session: resume(services, session)),
        [session_state],
        outputs,
        **named("rater_resume"),
        **light,
    )

    for ev in (ev_in, ev_code, ev_send, ev_back, ev_out, ev_resume):  # what is open may have changed
        ev.then(rank.refresh, [session_state], rank.outputs, api_visibility="private", show_progress="hidden")

    def on_page_load(request: gr.Request):
        # ?study=ID in the link the owner sends pre-fills the study (a convenience, not an identity).
        study_id = ""
        try:
            study_id = str(request.query_params.get("study", ""))[:64]
        except (AttributeError, HistolabError):
            study_id = ""
        return gr.update(value=study_id) if study_id else gr.update()

    return OnLoad(on_page_load, [], [study])
