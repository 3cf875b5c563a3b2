"""``python app.py``: the histolab app in the browser (settings from the environment, see
histolab.ui.settings.AppSettings; HISTOLAB_DATA_DIR=/data for a Space's persistent storage).
Importing this file loads and serves nothing."""

import os


def main() -> None:
    from histolab.ui import AppSettings, Services
    from histolab.ui.spaces import on_space, zero_gpu

    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    if on_space():
        # Hosted: users may name only adapters inside checkpoints/ (histolab.adapters.runtime).
        os.environ.setdefault("HISTOLAB_ADAPTERS_ONLY_CHECKPOINTS", "1")
        os.environ.setdefault("GRADIO_SERVER_NAME", "0.0.0.0")
    if zero_gpu():
        import spaces  # noqa: F401  (ZeroGPU must be imported before torch touches CUDA)
    settings = AppSettings.from_env()
    services = Services(settings)
    if zero_gpu() and not services.base_problem():
        services.model(settings.base)  # ZeroGPU moves a model loaded at start-up onto the GPU of each call
    elif settings.preload:
        # A second process makes the first images from the start-up bundle, if compile-unet wrote one
        # (histolab.startup_worker); the preload here then waits for its turn (Services.wait_for_startup_turn).
        services.start_startup_worker()
        services.start_preload()  # in the background; the status line shows its state
    from histolab.ui import build_app, launch_options  # imports gradio: after the worker and preload started

    app = build_app(services)
    app.launch(prevent_thread_lock=True, **launch_options(settings, services=services))
    services.page_up.set()
    app.block_thread()


if __name__ == "__main__":
    main()
