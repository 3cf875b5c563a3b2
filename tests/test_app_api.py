"""The app through its public API (gradio_client against a real server), with the tiny model injected:
generation, recipes, comparison, admin, background sets, evaluation, and what is never served."""

from __future__ import annotations

import io
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import httpx
import numpy as np
import pytest
from app_testkit import ADMIN_PASSWORD, add_lora, make_services, served
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image
from waiting import GENEROUS, finish_task, join_all

from histolab.config import EMBEDDED_BASE_DIR
from histolab.errors import Cancelled
from histolab.recipe import read_recipe

ROOT = Path(__file__).resolve().parent.parent

# Every public endpoint; test_every_public_endpoint_is_listed_here keeps this list honest, and each is
# exercised in this file or in test_app_review.py / test_app_train.py.
ENDPOINTS = {
    "/generate",
    "/cancel_generation",
    "/list_adapters",
    "/read_recipe",
    "/rerun_recipe",
    "/generate_set",
    "/compare_seeds",
    "/xy_plot",
    "/cancel_compare",
    "/admin_sign_in",
    "/admin_sign_out",
    "/rater_sign_in",
    "/rater_submit",
    "/rater_rank_submit",
    "/rater_rank_next",
    "/rater_previous",
    "/rater_resume",
    "/rater_sign_out",
    "/study_sets",
    "/study_create",
    "/study_status",
    "/study_add_rater",
    "/study_reset_code",
    "/study_close",
    "/study_open",
    "/study_analyse",
    "/study_export",
    "/train_start",
    "/train_jobs",
    "/train_job",
    "/train_cancel",
    "/train_resume",
    "/evaluate_sets",
    "/evaluate_checkpoint",
    "/guidance_sweep",
    "/tasks",
    "/task_result",
    "/task_cancel",
    "/task_again",
}
ADMIN_ONLY = {
    "/generate_set": None,  # the generation form's arguments, then name, images, per class
    "/study_sets": (),
    "/study_status": ("any",),
    "/evaluate_sets": ("bundled:test (real)", "x", ["embedded"], True, 0),
    "/tasks": (),
    "/train_jobs": (None,),
}


def gen(**kw):
    """/generate's positional arguments, by name."""
    a = {
        "base": "embedded",
        "mode": "prompt",
        "prompt": "an h&e stained histology image of skin",
        "negative": "",
        "reference": None,
        "a1": "(none)",
        "s1": 1.0,
        "a2": "(none)",
        "s2": 1.0,
        "a3": "(none)",
        "s3": 1.0,
        "steps": 2,
        "guidance": 3.0,
        "scheduler": "ddim",
        "seed": 5,
        "batch": 2,
        "real_class": "(none)",
    }
    a.update(kw)
    return list(a.values())


@pytest.fixture(scope="module")
def app_env(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("app")
    services = make_services(root, tiny_model)
    add_lora(tiny_model, services.paths.checkpoints, "lora-a", seed=1)
    add_lora(tiny_model, services.paths.checkpoints, "lora-b", seed=2)
    services.store()  # the review database exists under annotations/
    for folder in (services.paths.checkpoints, services.paths.annotations):
        (folder / "secret.txt").write_text("weights or ratings")
    with served(services) as (app, url):
        yield app, url, services


@pytest.fixture()
def admin(app_env):
    client = Client(app_env[1], verbose=False)
    client.predict("admin", ADMIN_PASSWORD, api_name="/admin_sign_in")
    return client


def pixels(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB")).astype(np.int16)


def test_every_public_endpoint_is_listed_here(app_env):
    api = Client(app_env[1], verbose=False).view_api(print_info=False, return_format="dict")
    assert set(api["named_endpoints"]) == ENDPOINTS
    assert not api["unnamed_endpoints"]  # page-only events (loads, timers, show/hide) are private


def test_generate_gives_pngs_with_recipes_real_patches_and_a_zip(app_env):
    _, url, _ = app_env
    client = Client(url, verbose=False)
    gallery, real, recipes, archive, _ = client.predict(
        *gen(real_class="skin_he", a1="lora-a", s1=0.8), api_name="/generate"
    )
    assert [g["caption"] for g in gallery] == ["seed 5", "seed 6"]
    recipe = read_recipe(gallery[1]["image"])  # the downloaded PNG carries its recipe
    assert (recipe.seed, recipe.steps, recipe.scheduler) == (6, 2, "ddim")
    assert [(a.name, a.kind, a.strength) for a in recipe.adapters] == [("lora-a", "lora", 0.8)]
    assert 'Adapters: "lora-a:0.8"' in recipes and "Seed: 6" in recipes
    assert len(real) == 2 and all(g["caption"] == "real skin_he" for g in real)
    assert Image.open(real[0]["image"]).size == (64, 64)  # bundled crops
    with zipfile.ZipFile(archive) as zf:
        names = sorted(zf.namelist())
        assert names == ["000-seed5.png", "001-seed6.png"]
        assert read_recipe(zf.read(names[0])).seed == 5
        assert np.array_equal(pixels(io.BytesIO(zf.read(names[1]))), pixels(gallery[1]["image"]))


def test_bad_inputs_are_clear_errors_and_the_app_keeps_running(app_env, tmp_path):
    _, url, _ = app_env
    client = Client(url, verbose=False)
    fake_png = tmp_path / "notes.png"
    fake_png.write_text("this is text named like an image")
    bomb = tmp_path / "bomb.png"
    Image.new("RGB", (20000, 8)).save(bomb)  # a small file that declares a huge image
    bad = [
        (gen(batch=9), "Value 9 is greater than maximum value 3"),
        (gen(steps=2.5), "whole number"),
        (gen(scheduler="k_fancy"), "k_fancy"),
        (gen(guidance=-1.0), "Value -1.0 is less than minimum value 0.0"),
        (gen(a1="no-such-lora"), "no-such-lora"),
        (gen(base="../../etc"), "../../etc"),
        (gen(mode="reference patch"), "the reference patch is empty"),
        (gen(mode="reference patch", reference=handle_file(str(fake_png))), "not a PNG/JPEG"),
        (gen(mode="reference patch", reference=handle_file(str(bomb))), "20000x8 pixels"),
    ]
    for args, message in bad:
        with pytest.raises(AppError) as exc:
            client.predict(*args, api_name="/generate")
        print(message, "->", exc.value)
        assert message in str(exc.value), (message, str(exc.value))
    gallery, *_ = client.predict(*gen(batch=1), api_name="/generate")
    assert len(gallery) == 1


def test_reference_mode_needs_a_projector_adapter_and_says_so(app_env, tmp_path):
    _, url, _ = app_env
    patch = tmp_path / "patch.png"
    Image.new("RGB", (64, 64), (200, 120, 180)).save(patch)
    with pytest.raises(AppError, match="reference mode needs a foundation-embedding adapter"):
        Client(url, verbose=False).predict(
            *gen(mode="reference patch", reference=handle_file(str(patch))), api_name="/generate"
        )


def test_two_sessions_with_different_adapters_never_mix(app_env, tiny_model):
    """Two browser sessions generate at the same time with different LoRAs: each gets exactly what it
    would get alone (the engine applies a request's adapters under the model lock and removes them)."""
    from histolab.generation import AdapterSpec, GenerationRequest, generate

    _, url, services = app_env
    ck = services.paths.checkpoints

    def alone(name):
        req = GenerationRequest(prompt="p", steps=2, guidance_scale=3.0, scheduler="ddim", seed=11, batch_size=2)
        if name:
            req = GenerationRequest(
                **{**req.__dict__, "adapters": (AdapterSpec(str(ck / f"{name}.safetensors"), 1.0),)}
            )
        return [np.asarray(g.image).astype(np.int16) for g in generate(tiny_model, req)]

    expected = {"lora-a": alone("lora-a"), "lora-b": alone("lora-b"), "(none)": alone(None)}
    assert not np.array_equal(expected["lora-a"][0], expected["lora-b"][0])
    results, errors = {}, []

    def session(name, rounds=3):
        client = Client(url, verbose=False)
        try:
            for r in range(rounds):
                gallery, *_ = client.predict(*gen(prompt="p", a1=name, seed=11), api_name="/generate")
                results[(name, r)] = [pixels(g["image"]) for g in gallery]
        except Exception as exc:  # reported below with the session's name
            errors.append((name, exc))

    threads = [threading.Thread(target=session, args=(n,)) for n in expected]
    for t in threads:
        t.start()
    join_all(threads)
    assert not errors, errors
    for (name, _), got in results.items():
        assert all(np.array_equal(a, b) for a, b in zip(got, expected[name], strict=True)), name
    assert len(results) == 9


def test_handlers_in_parallel_threads_keep_adapters_apart(app_env, tiny_model):
    """The same, below Gradio's queue (which runs one accelerator request at a time): the model lock alone."""
    from histolab.ui.common import new_session
    from histolab.ui.generate import Form, generate_images

    _, _, services = app_env

    def form(name):
        return Form("embedded", "prompt", "p", "", None, [(name, 1.0)], 2, 3.0, "ddim", 21, 2)

    baseline = {
        n: [np.asarray(im) for im, _ in generate_images(services, new_session(), form(n), None)["gallery"]]
        for n in ("lora-a", "lora-b")
    }
    bad = []

    def worker(name):
        for _ in range(4):
            got = [np.asarray(im) for im, _ in generate_images(services, new_session(), form(name), None)["gallery"]]
            if not all(np.array_equal(a, b) for a, b in zip(got, baseline[name], strict=True)):
                bad.append(name)

    threads = [threading.Thread(target=worker, args=(n,)) for n in ("lora-a", "lora-b", "lora-a", "lora-b")]
    for t in threads:
        t.start()
    join_all(threads)
    assert bad == []
    assert tiny_model.applied == []  # nothing left applied


def test_cancel_stops_a_generation_of_this_session_only(app_env):
    from histolab.ui.common import new_session
    from histolab.ui.generate import Form, cancel_generation, generate_images

    _, url, services = app_env
    assert Client(url, verbose=False).predict(api_name="/cancel_generation") == "nothing is running in this session"
    session, other = new_session(), new_session()
    steps_seen = []

    def progress(fraction, desc=""):
        steps_seen.append(desc)
        if len(steps_seen) == 1:
            assert cancel_generation(other) == "nothing is running in this session"
            assert cancel_generation(session) == "cancelling at the next step"

    f = Form("embedded", "prompt", "p", "", None, [], 6, 3.0, "ddim", 0, 1)
    with pytest.raises(Cancelled, match="after 1 of 6 steps"):
        generate_images(services, session, f, None, progress)
    assert session["cancel"] is None


def test_recipe_read_back_and_rerun_gives_the_same_pixels(app_env, tmp_path):
    _, url, _ = app_env
    client = Client(url, verbose=False)
    gallery, *_ = client.predict(*gen(a1="lora-b", s1=0.6, seed=40, batch=2, scheduler="euler_a"), api_name="/generate")
    png = gallery[1]["image"]
    form = client.predict(handle_file(png), api_name="/read_recipe")
    (base, mode, prompt, negative, a1, s1, a2, s2, a3, s3, steps, guidance, scheduler, seed, batch, note) = form
    assert (base["value"], mode["value"], prompt, negative) == ("embedded", "prompt", gen()[2], "")
    assert (a1["value"], s1["value"], a2["value"], s2["value"], a3["value"], s3["value"]) == (
        "lora-b",
        0.6,
        "(none)",
        1.0,
        "(none)",
        1.0,
    )
    assert (steps, guidance, scheduler, seed, batch) == (2, 3.0, "euler_a", 41, 1)
    assert "seed 41" in note
    again, recipes, note = client.predict(handle_file(png), None, api_name="/rerun_recipe")
    assert np.array_equal(pixels(again[0]["image"]), pixels(png))
    assert note == "same base, adapters and settings as the recipe" and "Seed: 41" in recipes
    plain = tmp_path / "plain.png"
    Image.new("RGB", (32, 32)).save(plain)
    with pytest.raises(AppError, match="carries no recipe"):
        client.predict(handle_file(str(plain)), api_name="/read_recipe")
    jpeg = tmp_path / "photo.png"
    Image.new("RGB", (32, 32)).save(jpeg, format="JPEG")
    with pytest.raises(AppError, match="not a PNG image"):
        client.predict(handle_file(str(jpeg)), None, api_name="/rerun_recipe")


def test_compare_same_seeds_grid_and_xy_plot(app_env):
    _, url, _ = app_env
    client = Client(url, verbose=False)
    common = ["embedded", "p", "", 2, 3.0, "ddim", 3, "(none)", 1.0]
    grid, cells, _ = client.predict(*common, ["lora-a", "lora-b"], 2, "tumour_he", api_name="/compare_seeds")
    with Image.open(grid) as im:
        from histolab.ui.images import CELL_MIN, HEADER_H, LABEL_W

        assert im.size == (LABEL_W + 2 * CELL_MIN, 2 * HEADER_H + 4 * CELL_MIN)  # base, 2 adapters, real: 4 rows
    assert [c["caption"] for c in cells] == [
        "base, seed 3",
        "base, seed 4",
        "lora-a x1, seed 3",
        "lora-a x1, seed 4",
        "lora-b x1, seed 3",
        "lora-b x1, seed 4",
    ]
    assert not np.array_equal(pixels(cells[0]["image"]), pixels(cells[2]["image"]))
    grid, cells, _ = client.predict(*common, "guidance", "1, 4", "adapter", "(none), lora-a", api_name="/xy_plot")
    assert [c["caption"] for c in cells] == [
        "guidance 1, adapter (none)",
        "guidance 4, adapter (none)",
        "guidance 1, adapter lora-a",
        "guidance 4, adapter lora-a",
    ]
    assert read_recipe(cells[3]["image"]).guidance_scale == 4.0
    for args, message in [
        (("steps", "1:40:1", "guidance", "1, 2"), "40 x 2 = 80 cells; at most 12"),
        (("guidance", "1, x", "seed", "1"), "numbers separated by commas"),
        (("adapter", "lora-z", "seed", "1"), "unknown adapter(s) ['lora-z']"),
        (("seed", "1", "seed", "2"), "both 'seed'"),
        (("strength", "0.5, 1", "seed", "1"), "a strength axis needs an adapter"),
    ]:
        with pytest.raises(AppError) as exc:
            client.predict(*common, *args, api_name="/xy_plot")
        assert message in str(exc.value)
    assert client.predict(api_name="/cancel_compare") == "nothing is running in this session"


def test_admin_sign_in_and_admin_only_endpoints(app_env):
    _, url, _ = app_env
    guest = Client(url, verbose=False)
    for name, args in ADMIN_ONLY.items():
        args = args if args is not None else (*gen()[:-1], "x", 2, True)
        with pytest.raises(AppError, match="sign in as admin"):
            guest.predict(*args, api_name=name)
    with pytest.raises(AppError, match="wrong admin name or password"):
        guest.predict("admin", "guess", api_name="/admin_sign_in")
    with pytest.raises(AppError, match="wrong admin name or password"):
        guest.predict("root", ADMIN_PASSWORD, api_name="/admin_sign_in")
    status, cleared = guest.predict("admin", ADMIN_PASSWORD, api_name="/admin_sign_in")
    assert status == "Signed in as admin **admin**" and cleared == ""
    guest.predict(api_name="/study_sets")  # now allowed
    other = Client(url, verbose=False)  # another browser is still a guest
    with pytest.raises(AppError, match="sign in as admin"):
        other.predict(api_name="/study_sets")
    status, _ = guest.predict(api_name="/admin_sign_out")
    assert status.startswith("Guest")
    with pytest.raises(AppError, match="sign in as admin"):
        guest.predict(api_name="/study_sets")


def test_background_set_then_evaluation_with_plots_and_reports(app_env, admin):
    _, _, services = app_env
    status = admin.predict(*gen(batch=2)[:-1], "mini-set", 4, True, api_name="/generate_set")
    task_id = status.split()[2].rstrip(";")
    info = services.tasks.get(task_id)
    info = finish_task(services.tasks, task_id)
    assert info.state == "done", info.message
    folder = services.sets_root / "mini-set"
    for cls in services.class_labels():
        pngs = sorted((folder / cls).glob("*.png"))
        assert len(pngs) == 4 and read_recipe(pngs[0]).prompt.startswith(("an h&e", "an immuno"))
    rows, _ = admin.predict(api_name="/tasks")
    assert task_id in [r[0] for r in rows["data"]]
    out = admin.predict("bundled:test (real)", "mini-set (generated)", ["embedded"], True, 0, api_name="/evaluate_sets")
    text, metrics, plots, archive, _, _ = out
    assert "done" in text and "[embedded]" in text
    spaces_classes = {(r[0], r[1]) for r in metrics["data"]}
    assert ("embedded", "all") in spaces_classes and ("embedded", "skin_he") in spaces_classes
    assert [p["caption"] for p in plots] == ["kid_per_class.png"]
    with zipfile.ZipFile(archive) as zf:
        assert sorted(zf.namelist()) == ["evaluation.json", "kid_per_class.png", "metrics.csv"]
    eval_id = out[5]["value"]
    text2, *_ = admin.predict(eval_id, api_name="/task_result")  # shown again from disk
    assert text2 == text
    with pytest.raises(AppError, match="unknown image set"):
        admin.predict("bundled:test (real)", "nope (generated)", ["embedded"], True, 0, api_name="/evaluate_sets")
    with pytest.raises(AppError, match="choose at least one feature space"):
        admin.predict("bundled:test (real)", "mini-set (generated)", [], True, 0, api_name="/evaluate_sets")
    with pytest.raises(AppError, match="not a task id"):
        admin.predict("../../annotations", api_name="/task_result")


def test_checkpoint_evaluation_and_guidance_sweep(app_env, admin):
    text, metrics, _, archive, _, _ = admin.predict(
        "embedded", "lora-a", 1.0, "bundled:test (real)", ["embedded"], 4, 2, 3.0, 0, api_name="/evaluate_checkpoint"
    )
    assert "done" in text and any(r[1] == "colon_ihc" for r in metrics["data"])
    with zipfile.ZipFile(archive) as zf:
        assert "evaluation.json" in zf.namelist()
    text, metrics, plots, _, _, _ = admin.predict(
        "embedded", "(none)", 1.0, "bundled:test (real)", ["embedded"], "2, 6", 4, 2, 0, api_name="/guidance_sweep"
    )
    assert "best guidance" in text and [p["caption"] for p in plots] == ["fid_by_guidance.png"]
    with pytest.raises(AppError, match="scales must be START:STOP:STEP"):
        admin.predict(
            "embedded", "(none)", 1.0, "bundled:test (real)", ["embedded"], "x", 4, 2, 0, api_name="/guidance_sweep"
        )


def test_task_cancel_and_start_again_resumes_a_batch(app_env, admin):
    _, _, services = app_env
    gate = threading.Event()

    def blocker(params, ctx):  # holds the single worker, so the next task is queued behind it
        assert gate.wait(GENEROUS), "the test never opened the gate"
        return {}

    services.tasks.register("blocker", blocker)
    first = services.tasks.submit("blocker", {}, title="hold", owner="admin")
    status = admin.predict(*gen(batch=2)[:-1], "later-set", 3, False, api_name="/generate_set")
    queued = status.split()[2].rstrip(";")
    msg, _ = admin.predict(queued, api_name="/task_cancel")
    assert "cancel asked" in msg
    gate.set()
    assert finish_task(services.tasks, first.id).state == "done"
    info = finish_task(services.tasks, queued)
    assert info.state == "cancelled", info
    text, *_ = admin.predict(queued, api_name="/task_again")
    assert "done" in text
    assert len(list((services.sets_root / "later-set").glob("*.png"))) == 3


def test_model_and_review_files_are_never_served(app_env):
    app, url, services = app_env
    client = Client(url, verbose=False)
    gallery, *_ = client.predict(*gen(batch=1), api_name="/generate")
    served_url = gallery[0]["image"]
    assert Path(served_url).is_file()  # the client downloaded it: generated images are served
    db = services.paths.annotations / "review.db"
    assert db.is_file()
    targets = [
        services.paths.checkpoints / "secret.txt",
        services.paths.checkpoints / "lora-a.safetensors",
        services.paths.annotations / "secret.txt",
        db,
        EMBEDDED_BASE_DIR.parent / "README.md",
        ROOT / "checkpoints" / "embedded-encoder" / "model.safetensors",
    ]
    forms = []
    for t in targets:
        rel = Path(*[".."] * len(Path.cwd().parts)) / t.relative_to("/")
        for p in (str(t), str(rel), t.as_posix().replace("/", "//")):
            for prefix in ("gradio_api/file=", "file=", "gradio_api/file/", "gradio_api/static/", "static/"):
                forms.append(f"{url}{prefix}{p}")
    cwd_rel = [
        "checkpoints/README.md",
        "checkpoints/embedded-encoder/manifest.json",
        "./checkpoints/embedded-encoder/model.safetensors",
        "annotations/review.db",
    ]
    forms += [f"{url}gradio_api/file={p}" for p in cwd_rel] + [f"{url}file={p}" for p in cwd_rel]
    forms += [f"{url}gradio_api/file=%2F{str(t).lstrip('/').replace('/', '%2F')}" for t in targets]
    with httpx.Client(timeout=GENEROUS) as http:
        for f in forms:
            r = http.get(f)
            assert r.status_code in (403, 404, 405), (f, r.status_code)
            assert b"weights or ratings" not in r.content and b"SQLite format" not in r.content
        for path in ("monitoring", "monitoring/summary", "gradio_api/monitoring", "gradio_api/monitoring/summary"):
            r = http.get(f"{url}{path}")
            assert r.status_code == 404 or (r.status_code == 403 and "Monitoring is not enabled" in r.text), path
    assert app.blocked_paths and str(services.paths.annotations.resolve()) in app.blocked_paths


def test_uploads_above_the_limit_are_refused_at_the_door(tiny_model, tmp_path):
    services = make_services(tmp_path, tiny_model, max_upload_mb=1)
    with served(services) as (_, url):
        big = b"\x89PNG\r\n\x1a\n" + b"\0" * (2 * 2**20)
        r = httpx.post(f"{url}gradio_api/upload", files={"files": ("big.png", big, "image/png")}, timeout=GENEROUS)
        assert r.status_code == 413
        client = Client(url, verbose=False)
        gallery, *_ = client.predict(*gen(batch=1), api_name="/generate")  # still serving
        assert len(gallery) == 1


def test_a_missing_embedded_base_is_said_clearly(tmp_path):
    from histolab.config import Paths
    from histolab.errors import ModelNotFound
    from histolab.ui import Services
    from histolab.ui.common import new_session
    from histolab.ui.generate import Form, generate_images

    services = Services(paths=Paths.from_env({"HISTOLAB_DATA_DIR": str(tmp_path)}), embedded_dir=tmp_path / "none")
    assert "The embedded default base model is not installed yet" in services.base_problem()
    with pytest.raises(ModelNotFound, match="not installed yet"):
        generate_images(
            services, new_session(), Form("embedded", "prompt", "p", "", None, [], 2, 3.0, "ddim", 0, 1), None
        )
    assert services.models.loads == 0


def test_importing_the_app_loads_nothing():
    code = (
        "import sys, app, histolab.ui; "
        "assert 'diffusers' not in sys.modules and 'transformers' not in sys.modules, 'heavy import'; "
        "assert 'gradio' not in sys.modules, 'gradio imported'; "
        "assert not hasattr(app, 'demo') and callable(app.main)"
    )
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=GENEROUS)
    assert run.returncode == 0, run.stderr
