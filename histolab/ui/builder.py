"""``build_app(services) -> gr.Blocks``: the tabs, the admin sign-in, the queue; and how to serve it."""

from __future__ import annotations

from typing import Any

import gradio as gr

from histolab.config import EMBEDDED_BASE_DIR, Paths
from histolab.ui.rating_page import CSS as RATING_CSS
from histolab.ui.services import Services
from histolab.ui.settings import AppSettings

CSS = """
/* No page menu: the rater page is reached by the link its study's owner sends, not from a menu. */
.nav-holder { display: none !important; }
.histolab-small { font-size: 12px; color: #666; }
"""

RATER_PATH = "/review"

INTRO = (
    "# histolab\n"
    "Fine-tune diffusion models on histology, generate synthetic tissue patches, measure them, "
    "and have pathologists score them blind. Every generated PNG carries its recipe."
)


def build_app(services: Services | AppSettings | None = None):
    """The Gradio app (queued), with nothing loaded until a request needs it.

    ``services``: a ``Services`` (tests inject tiny models and temporary folders through it),
    or ``AppSettings`` (a ``Services`` is made from them), or None (settings from the environment).
    """
    from histolab.ui import compare, evaluate, generate, review, studies, train
    from histolab.ui.common import new_session, ui_errors

    if not isinstance(services, Services):
        services = Services(services if isinstance(services, AppSettings) else AppSettings.from_env())
    settings = services.settings
    services.tasks.register("generate-set", generate.run_set_task(services))

    with gr.Blocks(title="histolab", analytics_enabled=False, delete_cache=(3600, 24 * 3600)) as app:
        # Server-side per-session state: identities, the open review task, cancel flags. Dropped 1 h after
        # the session's last change once the browser is gone (Gradio deletes it on a closed tab anyway).
        session_state = gr.State(new_session(), time_to_live=settings.session_hours * 3600)
        with gr.Row():
            gr.Markdown(INTRO)
            with gr.Column(scale=0, min_width=320):
                admin_status = gr.Markdown("", elem_id="admin-status")
                # The default model's background load (Services.start_preload): polled until it is done.
                model_status = gr.Markdown(services.model_status_line(), elem_id="model-status")
                model_timer = gr.Timer(1.0, active=services.preload.thread is not None)
                with gr.Accordion("Admin sign-in", open=False, visible=not settings.admin_without_sign_in) as admin_box:
                    admin_user = gr.Textbox(label="Admin", value="", elem_id="admin-user")
                    admin_password = gr.Textbox(label="Password", type="password", elem_id="admin-password")
                    with gr.Row():
                        admin_in = gr.Button("Sign in", size="sm", elem_id="admin-signin")
                        admin_out = gr.Button("Sign out", size="sm")
        loads = []
        with gr.Tabs() as tabs:
            with gr.Tab("Generate", elem_id="tab-generate"):
                loads.append(generate.build(services, session_state))
            with gr.Tab("Compare", elem_id="tab-compare", id="compare"):
                loads.append(compare.build(services, session_state))
            compare.receive(loads[0], loads[1], tabs, "compare")  # "Send to Compare" on the Generate tab
            with gr.Tab("Review", elem_id="tab-review"):
                gr.Markdown(
                    f"Raters: the page [{RATER_PATH}?study=STUDY]({RATER_PATH}) shows nothing but your tasks "
                    "(the study's owner sends you the link, your rater id and your code). You can also rate here."
                )
                loads.append(review.build(services, session_state, api=False))
            admin_loads = []
            with gr.Tab("Train", elem_id="tab-train"):
                admin_loads.append(train.build(services, session_state))
            with gr.Tab("Evaluate", elem_id="tab-evaluate"):
                admin_loads.append(evaluate.build(services, session_state))
            with gr.Tab("Studies", elem_id="tab-studies"):
                admin_loads.append(studies.build(services, session_state))

        def status_text(session) -> str:
            session = session if isinstance(session, dict) else new_session()
            ident = services.auth.valid(session.get("admin")) or services.auth.local_admin()
            if ident is None:
                return "Guest. Raters sign in on the Review tab."
            if ident.local:
                return f"Admin **{ident.name}** (local: the app listens on this machine only)"
            return f"Signed in as admin **{ident.name}**"

        def on_admin_in(session, user, password, request: gr.Request):
            from histolab.ui.common import client_key

            session = session if isinstance(session, dict) else new_session()
            session["admin"] = services.auth.admin_sign_in(user, password, client_key(request))
            return status_text(session), "", gr.update(open=False)

        def on_admin_out(session):
            session = session if isinstance(session, dict) else new_session()
            session["admin"] = None
            return status_text(session), "", gr.update()

        light = {"concurrency_limit": settings.light_concurrency}
        ev_in = admin_in.click(
            ui_errors(on_admin_in),
            [session_state, admin_user, admin_password],
            [admin_status, admin_password, admin_box],
            api_name="admin_sign_in",
            **light,
        )
        ev_out = admin_out.click(
            ui_errors(on_admin_out),
            [session_state],
            [admin_status, admin_password, admin_box],
            api_name="admin_sign_out",
            **light,
        )
        for ev in (ev_in, ev_out):
            for hook in admin_loads:
                ev = ev.then(ui_errors(hook.fn), hook.inputs, hook.outputs, api_visibility="private")

        def on_model_tick():
            pre = services.preload
            return services.model_status_line(), gr.Timer(active=pre.thread is not None and not pre.done.is_set())

        model_timer.tick(on_model_tick, None, [model_status, model_timer], api_visibility="private", **light)
        app.load(on_model_tick, None, [model_status, model_timer], api_visibility="private")
        app.load(status_text, [session_state], [admin_status], api_visibility="private")
        app.load(None, js=generate.PAGE_JS, api_visibility="private", queue=False)  # Ctrl+Enter, clamp notes
        for hook in [*loads, *admin_loads]:
            app.load(ui_errors(hook.fn), hook.inputs, hook.outputs, api_visibility="private")

    # The rater page: a page of its own (Gradio sends each page only its own components and events), so
    # nothing about models, adapters or image sets is in what a rater's browser receives.
    with app.route("Rater", RATER_PATH, show_in_navbar=False):
        rater_state = gr.State(new_session(), time_to_live=settings.session_hours * 3600)
        gr.Markdown("# Blinded review\nScore each image as you see it. Nothing on this page tells its origin.")
        hook = review.build(services, rater_state, api=True)
        app.load(ui_errors(hook.fn), hook.inputs, hook.outputs, api_visibility="private")

    app.services = services  # for tests and benchmarks
    app.queue(max_size=settings.queue_size, default_concurrency_limit=settings.light_concurrency)
    return app


def launch_options(
    settings: AppSettings, paths: Paths | None = None, services: Services | None = None
) -> dict[str, Any]:
    """``launch()`` keyword arguments: no telemetry, no monitoring, and never serving model or review files.
    Also makes launch's own reachability check patient on a busy machine (histolab.ui.reachable)."""
    from histolab.ui import reachable

    reachable.install()
    paths = paths or (services.paths if services else Paths.from_env())
    folders = [paths.checkpoints, paths.annotations, paths.jobs, paths.outputs, EMBEDDED_BASE_DIR.parent]
    if services is not None:
        folders.append(services.datasets_root)
    # Gradio serves only what the app returns (copied to its cache) or allowed_paths names; blocking these
    # folders as well means no handler can ever hand out a weights file or the review database (whose rows
    # tell real from synthetic), whatever path a request names.
    blocked = {str(p.resolve()) for p in folders}
    return {
        "server_name": settings.server_name,
        "server_port": settings.server_port,
        "enable_monitoring": False,
        "blocked_paths": sorted(blocked),
        "allowed_paths": [],
        "ssr_mode": False,  # no Node server: the page works offline from the Python server alone
        "mcp_server": False,
        "max_file_size": f"{settings.max_upload_mb}mb",
        "css": CSS + RATING_CSS,
        "footer_links": ["gradio", "settings"],  # no link to the API page: the endpoints are there, not advertised
        # No run history: it would keep every call's inputs (rater codes, the admin password, ratings) in the
        # browser's storage, where the next person at a shared workstation could read them.
        "run_history": False,
    }
