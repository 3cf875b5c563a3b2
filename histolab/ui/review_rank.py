"""The rater's per-prompt ranking (the Prompt-to-Polyp protocol, histolab.review.prompt_rank) on the rater page.

Once a rater's ordinary tasks are done, their rank groups follow in the rater's seeded order: the prompt, the N
images side by side, one rank choice (1..N, nothing pre-selected) under each, and Submit, enabled only when each
rank is used exactly once (the library checks again and refuses anything else with its own message).

Blinding as on the rest of the page: the images go inline as data URLs of the study's clean PNGs with neutral
captions ("Image 2 of 4"); the page knows the images only by their slot. Which opaque image id sits in which
slot is kept in the session's server-side state, with the task id and a submission id minted per view (reused
by a retried submit, so a retry never stores the ranks twice).
"""

from __future__ import annotations

import html
import time
import uuid
from dataclasses import dataclass
from typing import Any

import gradio as gr

from histolab.errors import HistolabError, StudyError
from histolab.ui.common import new_session, ui_errors
from histolab.ui.rating_page import SET_FIT_PX, zoomed_images_html

MAX_IMAGES = 8  # slots on the page: a group holds one image per rated source (4 in the paper)
SCORING_DONE = "Your scoring tasks are done. Now rank the images of each prompt below."


# ------------------------------------------------------------------ plain handlers


def rank_value(v: Any) -> int | None:
    """A slot's choice as sent by the page (an int, or its text), None when unset."""
    if v is None or v == "":
        return None
    if isinstance(v, int) and not isinstance(v, bool):
        return v
    if isinstance(v, str) and v.strip().isdigit():
        return int(v.strip())
    raise StudyError(f"a rank must be a whole number but is {str(v)[:20]!r}")


def rank_missing(n: int, values: list) -> list[str]:
    """What keeps the ranks of ``n`` images from being complete: images without a rank, ranks used twice."""
    got = [rank_value(v) for v in (list(values) + [None] * n)[:n]]
    out = [f"a rank for image {i + 1}" for i, r in enumerate(got) if r is None]
    twice = sorted({r for r in got if r is not None and got.count(r) > 1})
    out += [f"rank {r} is given more than once" for r in twice]
    return out


def todo_text(missing: list[str]) -> str:
    if missing:
        return "Still to do: " + "; ".join(html.escape(m) for m in missing)
    return "Each rank is used once: press Submit ranks."


def _remember(session: dict, task) -> None:
    session["prank"] = (
        None
        if task is None
        else {
            "task_id": task.task_id,
            "image_ids": [im.image_id for im in task.images],  # slot -> opaque id, never sent to the page
            "submission_id": uuid.uuid4().hex,
            "shown_at": time.monotonic(),
        }
    )


def _view(task) -> dict[str, Any]:
    if task is None:
        return {"visible": False}
    n = len(task.images)
    return {
        "visible": True,
        "task_id": task.task_id,
        "head": f"<div><b>Group {task.position} of {task.total}</b> · {task.done} ranked"
        f'<br><progress max="{task.total}" value="{task.done}" style="width:100%"></progress></div>',
        "instructions": task.instructions,
        "prompt": f"**Prompt:** {html.escape(task.prompt)}" if task.prompt else "",
        # One figure per slot, each captioned by its place only.
        "images": [
            zoomed_images_html([im.png], caption=f"Image {i + 1} of {n}", fit_px=SET_FIT_PX)
            for i, im in enumerate(task.images)
        ],
        "ranks": list(task.ranks),
        "message": "",
    }


def show_next(services, session: dict) -> dict[str, Any]:
    """The rater's next rank group, once no ordinary task is open in this session (hidden otherwise)."""
    from histolab.review.prompt_rank import next_rank_task

    ident = services.auth.valid(session.get("rater"))
    if ident is None or session.get("review") is not None:
        session["prank"] = None
        return {"visible": False}
    task = next_rank_task(services.store(), ident.study_id, ident.name)
    _remember(session, task)
    return _view(task)


def submit_group(services, session: dict, shown_task_id: str, values: list) -> dict[str, Any]:
    """Store this session's current group's ranks (slot i -> values[i]); the next group's view, with the ack."""
    from histolab.review.prompt_rank import get_rank_task, next_rank_task, submit_ranks

    ident = services.auth.require_rater(session)
    store = services.store()
    cur = session.get("prank")
    if cur is None:
        raise StudyError("no rank group is open in this session; sign in again to resume")
    if shown_task_id and shown_task_id != cur["task_id"]:
        view = _view(get_rank_task(store, ident.study_id, ident.name, cur["task_id"]))
        view["message"] = "those ranks were already saved; here is your current group"
        return view
    ids = cur["image_ids"]
    ranks = {i: r for i, r in zip(ids, [rank_value(v) for v in values[: len(ids)]], strict=False) if r is not None}
    elapsed = int((time.monotonic() - cur["shown_at"]) * 1000)
    try:
        ack = submit_ranks(store, ident.study_id, ident.name, cur["task_id"], ranks, cur["submission_id"], elapsed)
    except StudyError as exc:
        if "already used for other answers" in str(exc):
            cur["submission_id"] = uuid.uuid4().hex  # the first ranks are stored; these become a revision
            raise StudyError(
                "your earlier ranks for this group were saved; press Submit again to replace them"
            ) from exc
        raise
    task = next_rank_task(store, ident.study_id, ident.name)
    _remember(session, task)
    view = _view(task) if task else {"visible": False, "done": True}
    view["message"] = f"ranks saved ({ack.done} of {ack.total} groups done)"
    return view


# ------------------------------------------------------------------ the page


@dataclass
class RankSection:
    refresh: Any  # session -> outputs: call after each event of the rater page that changes what is open
    outputs: list


def build(services, session_state, header, *, api: bool = True) -> RankSection:
    """The rank section, below the rater's tasks. ``header``: the task box's headline, which says what's next."""
    with gr.Column(visible=False, elem_id="rank-task") as box:
        head = gr.HTML("", elem_id="rank-progress")
        instructions = gr.Markdown("", elem_id="rank-instructions")
        prompt = gr.Markdown("", elem_id="rank-prompt")
        slots, images, choices = [], [], []
        with gr.Row(equal_height=False):
            for i in range(MAX_IMAGES):
                with gr.Column(visible=False, min_width=160, elem_id=f"rank-slot-{i}") as slot:
                    images.append(gr.HTML("", elem_id=f"rank-image-{i}"))
                    # Radios start unset: a pre-selected rank would anchor the answer and hide a skipped one.
                    choices.append(gr.Radio([], value=None, label="Rank", elem_id=f"rank-choice-{i}"))
                slots.append(slot)
        shown = gr.Textbox(visible=False)
        todo = gr.Markdown("", elem_id="rank-todo")
        send = gr.Button("Submit ranks", variant="primary", interactive=False, elem_id="rank-submit")
        status = gr.Markdown("", elem_id="rank-status")
    outputs = [box, head, instructions, prompt, *slots, *images, *choices, shown, todo, send, status, header]

    def render(view: dict[str, Any]) -> tuple:
        if not view.get("visible"):
            all_done = view.get("done")
            return (
                gr.update(visible=bool(view.get("message"))),
                *[""] * 3,
                *[gr.update(visible=False)] * MAX_IMAGES,
                *[""] * MAX_IMAGES,
                *[gr.update(choices=[], value=None)] * MAX_IMAGES,
                "",
                "",
                gr.update(visible=False, interactive=False),
                view.get("message", ""),
                "<p><b>All your tasks are done. Thank you!</b></p>" if all_done else gr.update(),
            )
        n = len(view["images"])
        return (
            gr.update(visible=True),
            view["head"],
            view["instructions"],
            view["prompt"],
            *[gr.update(visible=i < n) for i in range(MAX_IMAGES)],
            *[view["images"][i] if i < n else "" for i in range(MAX_IMAGES)],
            *[gr.update(choices=view["ranks"] if i < n else [], value=None) for i in range(MAX_IMAGES)],
            view["task_id"],
            todo_text(rank_missing(n, [])),
            gr.update(visible=True, interactive=False),
            view.get("message", ""),
            f"<p><b>{SCORING_DONE}</b></p>",
        )

    def unchanged(message: str) -> tuple:
        return (*[gr.update()] * (len(outputs) - 2), message, gr.update())

    def guarded(session, call) -> tuple:
        """A refused submit keeps the page as it is, with the library's reason (no error overlay)."""
        session = session if isinstance(session, dict) else new_session()
        try:
            return render(call(session))
        except HistolabError as exc:
            gr.Warning(str(exc))
            return unchanged(str(exc))

    @ui_errors
    def refresh(session):
        return guarded(session, lambda s: show_next(services, s))

    @ui_errors
    def do_submit(session, shown_id, *values):
        return guarded(session, lambda s: submit_group(services, s, shown_id, list(values)))

    def readiness(session, shown_id, *values):
        """Submit is enabled only once each rank 1..N is used exactly once (checked again on submit)."""
        session = session if isinstance(session, dict) else new_session()
        cur = session.get("prank")
        if cur is None or services.auth.valid(session.get("rater")) is None:
            return gr.update(interactive=False), "", gr.update()
        if shown_id != cur["task_id"]:
            return gr.update(), gr.update(), gr.update()  # values of a group the page has moved past
        try:
            missing = rank_missing(len(cur["image_ids"]), list(values))
        except StudyError as exc:
            missing = [str(exc)]
        return gr.update(interactive=not missing), todo_text(missing), ""  # a new choice: an old refusal is stale

    named = {"api_name": "rater_rank_submit"} if api else {"api_visibility": "private"}
    send.click(
        do_submit,
        [session_state, shown, *choices],
        outputs,
        concurrency_limit=services.settings.light_concurrency,
        **named,
    )
    # The rater API's way to the next group (the page gets it after each of its own events, see review.py).
    nxt = gr.Button("Next rank group", visible=False)
    nxt.click(
        refresh,
        [session_state],
        outputs,
        concurrency_limit=services.settings.light_concurrency,
        **({"api_name": "rater_rank_next"} if api else {"api_visibility": "private"}),
    )
    # As the task page's readiness check: on the rater's own input only, outside the queue.
    gr.on(
        [c.input for c in choices],
        readiness,
        [session_state, shown, *choices],
        [send, todo, status],
        api_visibility="private",
        show_progress="hidden",
        trigger_mode="always_last",
        queue=False,
    )
    return RankSection(refresh, outputs)
