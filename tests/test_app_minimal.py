"""The minimal app: a real Gradio server driven through gradio_client."""

import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from gradio_client import Client
from gradio_client.exceptions import AppError

from histolab.config import EMBEDDED_BASE_DIR, Paths
from histolab.errors import InvalidRequest, ModelNotFound
from histolab.recipe import read_recipe
from histolab.ui import AppSettings, ModelCache, build_app, launch_options
from histolab.ui.generate import generate_images

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = AppSettings(max_batch=3, max_steps=10, queue_size=4)


@pytest.fixture(scope="module")
def served(tiny_model, tmp_path_factory):
    data = tmp_path_factory.mktemp("data")
    paths = Paths.from_env({"HISTOLAB_DATA_DIR": str(data)})
    for folder in (paths.checkpoints, paths.annotations, data / "public"):
        folder.mkdir()
        (folder / "secret.txt").write_text("weights or ratings")
    attempts = []

    def loader():
        attempts.append(1)
        if len(attempts) == 1:  # the first load fails, as with a missing model folder
            raise ModelNotFound("the embedded default model is missing from checkpoints/embedded-base")
        return tiny_model

    app = build_app(SETTINGS, model_loader=loader)
    assert attempts == []  # nothing is loaded when the app is built
    options = launch_options(SETTINGS, paths)
    # Allow the whole data folder on purpose: the blocked folders must still be refused inside it.
    options["allowed_paths"] = [str(data)]
    _, url, _ = app.launch(prevent_thread_lock=True, quiet=True, **options)
    try:
        yield app, url, data, attempts
    finally:
        app.close()


def test_generate_through_the_api(served):
    app, url, _, attempts = served
    client = Client(url, verbose=False)
    with pytest.raises(AppError, match="the embedded default model is missing"):
        client.predict("skin", "", 2, 3.0, "dpmpp_2m_karras", 5, 2, api_name="/generate")
    # The app keeps running; the next request loads the model and generates.
    gallery, recipes = client.predict("h&e stained skin", "blurry", 2, 3.0, "euler_a", 5, 2, api_name="/generate")
    assert len(gallery) == 2 and [g["caption"] for g in gallery] == ["seed 5", "seed 6"]
    recipe = read_recipe(gallery[1]["image"])  # the downloaded PNG carries its recipe
    assert (recipe.prompt, recipe.seed, recipe.steps, recipe.scheduler) == ("h&e stained skin", 6, 2, "euler_a")
    assert "Negative prompt: blurry" in recipes and "Seed: 6" in recipes
    client.predict("colon", "", 2, 1.0, "ddim", 0, 1, api_name="/generate")
    assert len(attempts) == 2 and app.model_cache.loads == 1  # loaded once, then cached


def test_bad_input_is_a_clear_error_and_the_app_keeps_running(served):
    _, url, _, _ = served
    client = Client(url, verbose=False)
    with pytest.raises(AppError) as exc:
        client.predict("skin", "", 0, 3.0, "ddim", 0, 1, api_name="/generate")
    assert "0" in str(exc.value) and "minimum" in str(exc.value).lower()
    with pytest.raises(AppError):
        client.predict("skin", "", 2, 3.0, "no_such_sampler", 0, 1, api_name="/generate")
    gallery, _ = client.predict("skin", "", 2, 3.0, "ddim", 0, 1, api_name="/generate")
    assert len(gallery) == 1


def test_model_and_review_files_are_never_served(served):
    _, url, data, _ = served
    get = lambda p: httpx.get(f"{url}gradio_api/file={p}", timeout=30)  # noqa: E731
    assert get(data / "public" / "secret.txt").status_code == 200  # the route serves allowed files...
    for folder in ("checkpoints", "annotations"):
        assert get(data / folder / "secret.txt").status_code == 403  # ...but never these, even when allowed
    assert get(EMBEDDED_BASE_DIR.parent / "README.md").status_code == 403


def test_launch_options_are_locked_down(tmp_path):
    paths = Paths.from_env({"HISTOLAB_DATA_DIR": str(tmp_path)})
    opts = launch_options(AppSettings(), paths)
    assert opts["allowed_paths"] == [] and opts["enable_monitoring"] is False and opts["ssr_mode"] is False
    assert str(paths.checkpoints.resolve()) in opts["blocked_paths"]
    assert str(paths.annotations.resolve()) in opts["blocked_paths"]
    assert opts["server_name"] == "127.0.0.1"


def test_settings_from_env():
    s = AppSettings.from_env(
        {"HISTOLAB_BASE": "checkpoints/sd15", "HISTOLAB_MAX_BATCH": "2", "GRADIO_SERVER_PORT": "7999"}
    )
    assert (s.base, s.max_batch, s.server_port, s.device) == ("checkpoints/sd15", 2, 7999, "auto")
    with pytest.raises(InvalidRequest, match="HISTOLAB_QUEUE_SIZE must be an integer but is 'many'"):
        AppSettings.from_env({"HISTOLAB_QUEUE_SIZE": "many"})


def test_handler_validates_before_loading(tiny_model):
    cache = ModelCache(lambda: pytest.fail("the model must not load for a bad request"))
    for args, message in [
        (("p", "", 2, 3.0, "ddim", 0, 9), "`batch size` must be at most 3 here but is 9"),
        (("p", "", 2.5, 3.0, "ddim", 0, 1), "`steps` must be a whole number but is 2.5"),
        (("p", "", 2, 3.0, "k_fancy", 0, 1), "unknown scheduler 'k_fancy'"),
        (("p", "", 2, -1.0, "ddim", 0, 1), "`guidance_scale` must be >= 0 but is -1.0"),
    ]:
        with pytest.raises(InvalidRequest, match=message.replace("(", r"\(").replace(")", r"\)")):
            generate_images(cache, SETTINGS, *args)


def test_importing_the_app_loads_nothing():
    code = (
        "import sys, app, histolab.ui; "
        "assert 'diffusers' not in sys.modules and 'transformers' not in sys.modules, 'heavy import'; "
        "assert not any(isinstance(v, __import__('gradio').Blocks) for v in vars(app).values()), 'app built'"
    )
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
