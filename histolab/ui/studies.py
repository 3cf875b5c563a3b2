"""The Studies tab (admin only): build a study from generated and real image sets, assign raters,
watch progress, analyse and export. Every handler checks the session's admin identity first."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import gradio as gr

from histolab.errors import InvalidRequest, StudyError
from histolab.ui.common import OnLoad, new_session, to_int, ui_errors
from histolab.ui.images import copy_for_download, scratch_dir, zip_files

REAL_SPLITS = ("test", "val")
TEMPLATES = ("default", "colonoscopy")


def source_sets(services) -> dict[str, tuple[str, str]]:
    """Display name -> (kind, folder or bundled split) of every set a study can use."""
    out: dict[str, tuple[str, str]] = {}
    for split in REAL_SPLITS:
        out[f"bundled-{split} (real)"] = ("real", f"bundled:{split}")
    for root, kind in ((services.sets_root, "generated"), (services.datasets_root, "real")):
        if root.is_dir():
            for p in sorted(root.iterdir()):
                if p.is_dir() and not p.name.startswith("."):
                    out[f"{p.name} ({kind})"] = (kind, str(p))
    return out


def _slug(text: str) -> str:
    import re

    s = re.sub(r"[^a-z0-9_.-]+", "-", text.lower()).strip("-._")
    return (s or "set")[:60]


def _folder(services, where: str) -> Path:
    if where.startswith("bundled:"):
        return services.materialize_real(where.split(":", 1)[1])
    return Path(where)


def create(
    services,
    session: dict,
    study_id: str,
    title: str,
    template: str,
    rated: list[str],
    reference: str | None,
    raters_text: str,
    image_size,
    limit,
    turing: bool,
    show_prompt: bool,
    seed,
) -> dict[str, Any]:
    """Create a study from the chosen sets; returns the creation report and the raters' codes (shown once)."""
    from histolab.data.prompts import CLASS_PROMPTS
    from histolab.review import create_study, parse_config

    admin = services.auth.require_admin(session)
    sets = source_sets(services)
    if not rated:
        raise InvalidRequest("choose at least one set to rate")
    unknown = [r for r in [*rated, *([reference] if reference else [])] if r not in sets]
    if unknown:
        raise InvalidRequest(f"unknown set(s) {unknown}; refresh the list")
    if template not in TEMPLATES:
        raise InvalidRequest(f"template must be one of {list(TEMPLATES)} but is {template!r}")
    sources = []
    names = set()
    for label in rated:
        kind, where = sets[label]
        name = _slug(label.rsplit(" (", 1)[0])
        if name in names:
            raise InvalidRequest(f"two sets are called {name!r}")
        names.add(name)
        src: dict[str, Any] = {"name": name, "kind": kind, "path": str(_folder(services, where))}
        if limit not in (None, "", 0):
            src["limit"] = to_int("images per class", limit, 1)
        sources.append(src)
    if reference:
        kind, where = sets[reference]
        if kind != "real":
            raise InvalidRequest("reference images are shown as real: choose a real set for them")
        sources.append(
            {
                "name": "reference",
                "kind": "real",
                "path": str(_folder(services, where)),
                "role": "reference",
                "limit": 2,
            }
        )
    raters = [r.strip() for r in str(raters_text or "").replace("\n", ",").split(",") if r.strip()]
    config = {
        "id": str(study_id or "").strip(),
        "title": str(title or "").strip() or str(study_id or "").strip(),
        "owner": admin.name,
        "template": template,
        "seed": to_int("seed", seed, 0),
        "image_size": to_int("image size", image_size, 32, 2048),
        "show_prompt": bool(show_prompt),
        "prompts": dict(CLASS_PROMPTS),
        "sources": sources,
        "raters": raters,
    }
    if template == "default":
        config["turing_test"] = bool(turing)
    report = create_study(services.store(), parse_config(config, base_dir=services.paths.outputs))
    return {
        "lines": report.lines(),
        "codes": [[r, c] for r, c in report.raters.items()],
        "study_id": report.study_id,
        "title": config["title"],
    }


def invitations(study_id: str, title: str, codes: list[list[str]], base_url: str) -> tuple[str, str]:
    """The raters' invitations, all at once: (text to copy into a mail, path of a CSV to download)."""
    from histolab.review.invitations import invitation_rows, invitations_csv, invitations_text

    rows = invitation_rows(base_url, study_id, [(r, c) for r, c in codes])
    path = scratch_dir("histolab-invitations-") / f"{study_id}_invitations.csv"
    path.write_text(invitations_csv(rows), encoding="utf-8", newline="")
    return invitations_text(title, rows), str(path)


def base_url(request) -> str:
    """Where the browser reached the app (behind a proxy: what it forwarded), for the rater page's link."""
    try:
        headers = {k.lower(): v for k, v in dict(request.headers).items()}
    except (AttributeError, TypeError):
        headers = {}
    host = headers.get("x-forwarded-host") or headers.get("host") or "localhost:7860"
    proto = headers.get("x-forwarded-proto") or "http"
    return f"{proto.split(',')[0].strip()}://{host.split(',')[0].strip()}/"


def studies(services, session: dict) -> list[dict[str, Any]]:
    from histolab.review import list_studies

    services.auth.require_admin(session)
    return list_studies(services.store())


def status(services, session: dict, study_id: str) -> dict[str, Any]:
    from histolab.review import study_status

    services.auth.require_admin(session)
    return study_status(services.store(), _study(study_id))


def add_rater(services, session: dict, study_id: str, rater_id: str) -> str:
    from histolab.review import add_rater as add

    services.auth.require_admin(session)
    return add(services.store(), _study(study_id), str(rater_id or "").strip())


def reset_code(services, session: dict, study_id: str, rater_id: str) -> str:
    from histolab.review import reset_rater_code

    services.auth.require_admin(session)
    return reset_rater_code(services.store(), _study(study_id), str(rater_id or "").strip())


def set_open(services, session: dict, study_id: str, open_: bool) -> str:
    from histolab.review import set_status

    admin = services.auth.require_admin(session)
    set_status(services.store(), _study(study_id), admin.name, "open" if open_ else "closed")
    return "open" if open_ else "closed"


def analyse(services, session: dict, study_id: str, blinded: bool) -> dict[str, Any]:
    from histolab.review import load_study
    from histolab.review.analysis import analyse as run
    from histolab.review.export import present
    from histolab.review.study import require_owner

    admin = services.auth.require_admin(session)
    store = services.store()
    info = load_study(store, _study(study_id))
    if not blinded:
        require_owner(info, admin.name)
    view = present(run(store, info.study_id), info, blinded)
    rows = [
        [s["source"], s["aspect"], s["n_ratings"], _num(s["mean"]), _num(s["median"]), _ci(s["ci_low"], s["ci_high"])]
        for s in view["summaries"]
    ]
    extra = []
    for a in view["agreement"]:
        extra.append(
            f"- {a['aspect']}: Krippendorff's alpha {_num(a['alpha_interval'])}, ICC(2,1) {_num(a['icc_2_1'])}"
        )
    tur = view.get("turing")
    if tur:
        acc = tur["accuracy"]
        extra.append(
            f"- visual Turing test: accuracy {_num(acc['value'])} ({acc['k']}/{acc['n']}, 95% CI {_ci(acc['ci_low'], acc['ci_high'])})"
        )
    return {"rows": rows, "notes": "\n".join(extra)}


def export(services, session: dict, study_id: str, blinded: bool, fmt: str) -> str:
    """A zip of the export (CSV/JSON) and the HTML report, copied to a temp folder for download."""
    from histolab.review.export import export_study
    from histolab.review.report import write_report

    admin = services.auth.require_admin(session)
    store = services.store()
    sid = _study(study_id)
    owner = None if blinded else admin.name
    out = scratch_dir("histolab-export-")
    files = export_study(store, sid, out, fmt=fmt, blinded=blinded, owner=owner)
    tag = "blinded" if blinded else "unblinded"
    files.append(write_report(store, sid, out / f"{sid}_{tag}_report.html", blinded=blinded, owner=owner))
    return zip_files(files, f"{sid}_{tag}_export.zip", root=out)


def report_file(services, session: dict, study_id: str, blinded: bool) -> str:
    from histolab.review.report import write_report

    admin = services.auth.require_admin(session)
    sid = _study(study_id)
    out = scratch_dir("histolab-report-")
    tag = "blinded" if blinded else "unblinded"
    path = write_report(
        services.store(), sid, out / f"{sid}_{tag}_report.html", blinded=blinded, owner=None if blinded else admin.name
    )
    return copy_for_download(path)


def _study(study_id: str) -> str:
    from histolab.review.config import SLUG

    sid = str(study_id or "").strip()
    if not SLUG.match(sid):
        raise StudyError(f"choose a study (got {sid[:64]!r})")
    return sid


def _num(x) -> str:
    return "" if x is None else f"{x:.2f}"


def _ci(lo, hi) -> str:
    return "" if lo is None or hi is None else f"{lo:.2f}–{hi:.2f}"


# ------------------------------------------------------------------ the page


def _ranked(r: dict) -> str:
    """A rater's per-prompt rank groups done, "k/n" (empty when the study has none)."""
    return f"{r['rank_done']}/{r['rank_total']}" if r.get("rank_total") else ""


def build(services, session_state):
    with gr.Column() as locked:
        gr.Markdown("This tab is for the studies' owner: sign in as admin at the top of the page.")
    with gr.Column(visible=False) as panel:
        with gr.Accordion("Build a study", open=True):
            with gr.Row():
                sid = gr.Textbox(label="Study id (short, lowercase)", value="my-study", elem_id="study-id")
                title = gr.Textbox(label="Title", value="")
                template = gr.Dropdown(list(TEMPLATES), value="default", label="Template")
            with gr.Row():
                # Checkboxes, not a dropdown: a study rates several sets, and a dropdown closes after each pick.
                rated = gr.CheckboxGroup(
                    choices=[], value=[], label="Sets to rate (generated and real)", elem_id="study-rated"
                )
                reference = gr.Dropdown(
                    choices=[], value=None, label="Real reference images (optional)", allow_custom_value=True
                )
            with gr.Row():
                raters = gr.Textbox(label="Raters (ids, comma separated)", value="rater1", elem_id="study-raters")
                image_size = gr.Number(value=256, precision=0, label="Image size (px, every image served square)")
                limit = gr.Number(
                    value=10, precision=0, label="Images per class and set (0: all)", elem_id="study-limit"
                )
            with gr.Row():
                turing = gr.Checkbox(value=True, label="Ask real or synthetic (visual Turing test)")
                show_prompt = gr.Checkbox(value=True, label="Show the class's prompt")
                seed = gr.Number(value=0, precision=0, label="Seed (order of every rater)")
            with gr.Row():
                refresh_sets = gr.Button("Refresh the sets")
                create_btn = gr.Button("Create the study", variant="primary", elem_id="study-create")
            created = gr.Markdown("", elem_id="study-created")
            codes = gr.Dataframe(
                headers=["rater", "sign-in code (shown once)"], interactive=False, elem_id="study-codes"
            )
            with gr.Row():
                invite_text = gr.Textbox(
                    label="Invitations (copy them all; the codes are shown only now)",
                    lines=4,
                    interactive=False,
                    buttons=["copy"],
                    elem_id="study-invitations",
                )
                invite_file = gr.File(
                    label="Invitations as CSV (rater id, code, link)",
                    interactive=False,
                    elem_id="study-invitations-csv",
                )
        with gr.Accordion("Studies", open=True):
            with gr.Row():
                chosen = gr.Dropdown(allow_custom_value=True, choices=[], label="Study", elem_id="study-chosen")
                refresh = gr.Button("Refresh")
            progress_table = gr.Dataframe(
                headers=["rater", "name", "done", "total", "last activity", "rank groups done"], interactive=False
            )
            summary = gr.Markdown("")
            with gr.Row():
                new_rater = gr.Textbox(label="Rater id")
                add_btn = gr.Button("Add rater")
                reset_btn = gr.Button("New code for rater")
                close_btn = gr.Button("Close study")
                open_btn = gr.Button("Reopen study")
            rater_msg = gr.Markdown("")
            with gr.Row():
                blinded = gr.Checkbox(value=True, label="Blinded (sources as Model A/B..., raters as R1...)")
                fmt = gr.Dropdown(["all", "csv", "json"], value="all", label="Export format")
                analyse_btn = gr.Button("Analyse")
                export_btn = gr.Button("Export (zip with the HTML report)", elem_id="study-export")
            analysis = gr.Dataframe(
                headers=["source", "aspect", "ratings", "mean", "median", "95% CI"], interactive=False
            )
            notes = gr.Markdown("")
            export_file = gr.File(label="Export", interactive=False, elem_id="study-export-file")

    def session(s):
        return s if isinstance(s, dict) else new_session()

    def set_choices():
        names = list(source_sets(services))
        return gr.update(choices=names), gr.update(choices=[n for n in names if n.endswith("(real)")], value=None)

    @ui_errors
    def on_refresh_sets(s):
        services.auth.require_admin(session(s))
        return set_choices()

    refresh_sets.click(on_refresh_sets, [session_state], [rated, reference], api_name="study_sets")

    def study_choices(s, value=None):
        ids = [r["study_id"] for r in studies(services, session(s))]
        return gr.update(choices=ids, value=value if value in ids else (ids[-1] if ids else None))

    @ui_errors
    # Named parameters, not *values: Gradio passes the request only to a parameter before any *args.
    def on_create(
        s, sid_, title_, template_, rated_, ref_, raters_, size_, limit_, turing_, prompt_, seed_, request: gr.Request
    ):
        values = (sid_, title_, template_, rated_, ref_, raters_, size_, limit_, turing_, prompt_, seed_)
        out = create(services, session(s), *values)
        lines = "\n".join(f"    {line}" for line in out["lines"])
        base = base_url(request)
        text, csv_path = invitations(out["study_id"], out["title"], out["codes"], base)
        link = (
            f"Raters sign in on the rater page ({base}review?study={out['study_id']}) with their id and the code "
            "below: copy or download the invitations now, the codes are not shown again."
        )
        return f"```\n{lines}\n```\n{link}", out["codes"], study_choices(s, out["study_id"]), text, csv_path

    create_btn.click(
        on_create,
        [session_state, sid, title, template, rated, reference, raters, image_size, limit, turing, show_prompt, seed],
        [created, codes, chosen, invite_text, invite_file],
        api_name="study_create",
    )

    @ui_errors
    def on_status(s, study_id):
        if not study_id:
            return [], ""
        st = status(services, session(s), study_id)
        rows = [
            [r["rater_id"], r["name"], r["done"], r["total"], r["last_activity"] or "", _ranked(r)]
            for r in st["raters"]
        ]
        text = (
            f"**{html.escape(st['title'])}** · {st['status']} · {st['mode']} mode · {st['tasks_per_rater']} tasks "
            f"per rater · {st['submissions']} submissions"
        )
        return rows, text

    chosen.change(on_status, [session_state, chosen], [progress_table, summary], api_visibility="private")
    refresh.click(on_status, [session_state, chosen], [progress_table, summary], api_name="study_status")

    @ui_errors
    def on_add(s, study_id, rater_id):
        code = add_rater(services, session(s), study_id, rater_id)
        return f"rater `{rater_id}` added; their code (shown once): `{code}`"

    add_btn.click(on_add, [session_state, chosen, new_rater], [rater_msg], api_name="study_add_rater")

    @ui_errors
    def on_reset(s, study_id, rater_id):
        code = reset_code(services, session(s), study_id, rater_id)
        return f"new code for `{rater_id}` (the old one no longer works): `{code}`"

    reset_btn.click(on_reset, [session_state, chosen, new_rater], [rater_msg], api_name="study_reset_code")

    @ui_errors
    def on_close(s, study_id):
        return f"study is now {set_open(services, session(s), study_id, False)}"

    @ui_errors
    def on_open(s, study_id):
        return f"study is now {set_open(services, session(s), study_id, True)}"

    close_btn.click(on_close, [session_state, chosen], [rater_msg], api_name="study_close")
    open_btn.click(on_open, [session_state, chosen], [rater_msg], api_name="study_open")

    @ui_errors
    def on_analyse(s, study_id, blind):
        out = analyse(services, session(s), study_id, blind)
        return out["rows"], out["notes"]

    analyse_btn.click(on_analyse, [session_state, chosen, blinded], [analysis, notes], api_name="study_analyse")

    @ui_errors
    def on_export(s, study_id, blind, f):
        return export(services, session(s), study_id, blind, f)

    export_btn.click(on_export, [session_state, chosen, blinded, fmt], [export_file], api_name="study_export")

    def on_page_load(s):
        if not services.auth.is_admin(session(s)):
            return gr.update(visible=True), gr.update(visible=False), gr.update(), gr.update(), gr.update()
        r, ref = set_choices()
        return gr.update(visible=False), gr.update(visible=True), r, ref, study_choices(s)

    return OnLoad(on_page_load, [session_state], [locked, panel, rated, reference, chosen])
