"""The start-up worker (histolab.startup_worker, startup_client, startup_bundle): a second process that makes
the app's first images from a bundle, the very images and recipes the app's own model makes.

The module fixture compiles the tiny U-Net once (4 rows: two images, guided) with the real AOTInductor
toolchain (about 25 s here) and writes the bundle as ``compile-unet`` does."""

import json
import os
import shutil

import numpy as np
import pytest
import torch

from histolab import compiled_unet as cu
from histolab import startup_bundle
from histolab.errors import Cancelled, InvalidRequest
from histolab.generation import GenerationRequest, generate
from histolab.pipeline import load_base, optimize_for_inference
from histolab.startup_client import StartupWorker, bundle_exists


def req(**kw):
    base = dict(prompt="an h&e stained histology image of skin", negative_prompt="blurry", steps=2, seed=5)
    return GenerationRequest(**{**base, "batch_size": 2, **kw})


def px(images):
    return np.stack([np.asarray(g.image).astype(np.int16) for g in images])


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    """(model, pipeline folder, package root): the tiny model in bfloat16, its U-Net compiled for 4 rows,
    and its start-up bundle written beside the package."""
    from adapters_testkit import save_pipeline

    from histolab.embedded.random_init import random_base

    folder = save_pipeline(random_base("tiny", seed=0), tmp_path_factory.mktemp("tiny-pipeline"))
    root = tmp_path_factory.mktemp("compiled")
    model = optimize_for_inference(load_base(str(folder), dtype=torch.bfloat16))
    model.compiled_unets = cu.CompiledUNets(root)
    cu.build_missing(model, cu.app_shapes(model, (2,)), root, log=lambda line: None)
    assert startup_bundle.write(model, str(folder), [model.default_size], root) is not None
    return model, folder, root


@pytest.fixture(scope="module")
def worker(bundle):
    _, folder, root = bundle
    w = StartupWorker(str(folder), "cpu", "bfloat16", cache_dir=root)
    yield w
    w.close()


@pytest.mark.parametrize("scheduler", ["dpmpp_2m_karras", "dpmpp_2m"])
def test_the_worker_makes_the_apps_images_bit_for_bit(bundle, worker, scheduler):
    model, _, _ = bundle
    assert worker.usable(), worker.detail
    steps = []
    got = worker.generate(req(scheduler=scheduler), progress=lambda d, n: steps.append((d, n)))
    assert got is not None, worker.detail
    mine = generate(model, req(scheduler=scheduler))
    assert [g.recipe for g in got] == [g.recipe for g in mine]
    assert all(g.recipe.kernels == cu.KIND and g.recipe.dtype == "bfloat16" for g in got)
    assert np.array_equal(px(got), px(mine))
    assert steps == [(1, 2), (2, 2)]


def test_a_new_prompt_and_seed_too(bundle, worker):
    """Not only what the warm-up or an earlier test encoded: the text encoder's trace runs each prompt."""
    model, _, _ = bundle
    r = req(prompt="dense lymphocytic infiltrate, high grade", negative_prompt="", seed=123, guidance_scale=3.0)
    got = worker.generate(r)
    assert got is not None and np.array_equal(px(got), px(generate(model, r)))


def test_it_declines_what_it_cannot_make_exactly(worker):
    served = worker.served
    cases = {
        "euler": req(scheduler="euler"),
        "no compiled U-Net for 2 rows": req(batch_size=1),  # guided batch of one: 2 rows, not compiled
        "kernels 'aten'": req(kernels="aten"),
        "size 128x128": req(width=128, height=128),
    }
    for why, r in cases.items():
        assert worker.generate(r) is None, why
        assert why in worker.detail
    assert worker.served == served
    assert worker.usable()  # declining leaves it serving
    assert worker.generate(req()) is not None


def test_a_bad_request_is_the_engines_error(worker):
    with pytest.raises(InvalidRequest, match="steps"):
        worker.generate(req(steps=0))
    assert worker.generate(req()) is not None


def test_a_bundle_for_other_weights_or_another_torch_is_not_used(bundle, tmp_path):
    _, folder, root = bundle
    copy = shutil.copytree(folder, tmp_path / "copy")
    cm = optimize_for_inference(load_base(str(copy), dtype=torch.bfloat16))
    where = startup_bundle.write(cm, str(copy), [cm.default_size], root)
    assert bundle_exists(str(copy), root) and startup_bundle.is_current(cm, str(copy), [cm.default_size], root)
    # Another torch wrote it:
    manifest = json.loads((where / startup_bundle.MANIFEST).read_text())
    (where / startup_bundle.MANIFEST).write_text(json.dumps({**manifest, "torch": "0.0.1"}))
    w = StartupWorker(str(copy), "cpu", "bfloat16", cache_dir=root)
    assert not w.usable() and "made with torch 0.0.1" in w.detail
    assert w.generate(req()) is None
    w.close()
    # The weights changed since:
    (where / startup_bundle.MANIFEST).write_text(json.dumps(manifest))
    weights = next((copy / "unet").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-8] + b"\x00" * 8)
    w = StartupWorker(str(copy), "cpu", "bfloat16", cache_dir=root)
    assert not w.usable() and "changed since the bundle was written" in w.detail
    w.close()
    assert not bundle_exists("somewhere-else", root)


def test_cancel_stops_the_job_it_names(bundle):
    """The worker's loop in this process, fed through a pipe: a cancel frame that arrives before its job
    starts still cancels it (the job's id is remembered), and the next job runs."""
    import io

    from histolab import startup_worker as sw

    _, folder, root = bundle
    model = sw.load(str(folder), "cpu", "bfloat16", root)
    fields = {k: v for k, v in req().__dict__.items() if k not in ("reference", "adapters")}
    r, w = os.pipe()
    with os.fdopen(w, "wb") as out:
        sw.send(out, {"generate": fields, "id": 1})
        sw.send(out, {"cancel": 1})
        sw.send(out, {"generate": fields, "id": 2})
    answers = io.BytesIO()
    with os.fdopen(r, "rb") as inp:
        sw.serve(model, inp, answers)
    answers.seek(0)
    frames = []
    while (f := sw.receive(answers)) is not None:
        frames.append(f)
    kinds = [next(k for k in ("progress", "error", "images", "decline") if k in h) for h, _ in frames]
    # A cancel set before the first step: no progress, a Cancelled error; then job 2 whole.
    assert kinds[0] == "error" and frames[0][0]["kind"] == Cancelled.__name__
    assert kinds[1:] == ["progress", "progress", "images"]
    side = model.default_size
    assert len(frames[-1][1]) == 2 and all(len(p) == side * side * 3 for p in frames[-1][1])


def test_the_app_takes_its_first_images_from_the_worker_then_from_its_model(bundle, tmp_path, monkeypatch):
    """Services as app.py drives it: the worker started before anything loads, a visitor's generation served
    by it while the model is not loaded, the preload waiting for that, then closing the worker; the next
    generation comes from the app's own model, with the same bits."""
    from histolab.config import Paths
    from histolab.ui import generate as page
    from histolab.ui.services import Services
    from histolab.ui.settings import AppSettings

    model, folder, root = bundle
    monkeypatch.setenv("HISTOLAB_COMPILED_CACHE", str(root))
    data = tmp_path / "data"
    paths = Paths(data / "checkpoints", data / "annotations", data / "jobs", data / "outputs")
    settings = AppSettings(base=str(folder), device="cpu", dtype="bfloat16", compile_unet=False)
    services = Services(settings, paths)
    worker = services.start_startup_worker()
    assert worker is not None and worker.usable(), worker and worker.detail
    pre = services.start_preload()
    assert services.startup_serves(str(folder))
    with services.visitor_request():
        first = page.run(services, str(folder), req(seed=40))
    assert worker.served == 1 and services.models.loaded(str(folder)) is None
    assert not pre.done.is_set() and pre.state == "waiting for the first images"  # waits for the page
    assert "First images come from the start-up worker" in services.model_status_line()
    services.page_up.set()
    assert pre.done.wait(600) and pre.state == "ready", pre.detail
    assert worker.state == "closed" and not services.startup_serves(str(folder))
    again = page.run(services, str(folder), req(seed=40))
    assert worker.served == 1 and [g.recipe for g in again] == [g.recipe for g in first]
    assert np.array_equal(px(again), px(first))
    assert np.array_equal(px(first), px(generate(model, req(seed=40))))


def test_no_worker_without_a_bundle_or_when_turned_off(bundle, tmp_path, monkeypatch):
    from histolab.config import Paths
    from histolab.ui.services import Services
    from histolab.ui.settings import AppSettings

    _, folder, root = bundle
    data = tmp_path / "data"
    paths = Paths(data / "checkpoints", data / "annotations", data / "jobs", data / "outputs")
    monkeypatch.setenv("HISTOLAB_COMPILED_CACHE", str(tmp_path / "empty"))
    assert Services(AppSettings(base=str(folder)), paths).start_startup_worker() is None  # no bundle there
    monkeypatch.setenv("HISTOLAB_COMPILED_CACHE", str(root))
    off = AppSettings(base=str(folder), startup_worker=False)
    assert Services(off, paths).start_startup_worker() is None
    lazy = AppSettings(base=str(folder), preload=False)
    assert Services(lazy, paths).start_startup_worker() is None


def test_the_api_serves_the_first_images_from_the_worker(bundle, tmp_path, monkeypatch):
    """/generate through Gradio (gradio_client), as a Space's first visitor: the worker makes the images,
    and the PNGs the app returns carry the same pixels and recipe as the app model's own."""
    from app_testkit import served
    from gradio_client import Client
    from PIL import Image

    from histolab.config import Paths
    from histolab.recipe import read_recipe
    from histolab.ui.services import Services
    from histolab.ui.settings import AppSettings

    model, folder, root = bundle
    monkeypatch.setenv("HISTOLAB_COMPILED_CACHE", str(root))
    paths = Paths.from_env({"HISTOLAB_DATA_DIR": str(tmp_path / "data")})
    services = Services(AppSettings(base=str(folder), device="cpu", dtype="bfloat16", compile_unet=False), paths)
    worker = services.start_startup_worker()
    services.start_preload()  # waits for the page and for the first images, as in app.py
    with served(services) as (_, url):
        args = [folder.name, "prompt", "an h&e stained histology image of skin", "blurry", None]
        args += ["(none)", 1.0] * 3 + [2, 7.5, "dpmpp_2m_karras", 5, 2, "(none)"]
        gallery = Client(url, verbose=False).predict(*args, api_name="/generate")[0]
        assert worker.served == 1 and services.models.loaded(str(folder)) is None
        services.page_up.set()
        assert services.preload.done.wait(600) and services.preload.state == "ready"
    mine = generate(model, req())
    for item, g in zip(gallery, mine, strict=True):
        path = item["image"] if isinstance(item["image"], str) else item["image"]["path"]
        assert np.array_equal(np.asarray(Image.open(path).convert("RGB")), np.asarray(g.image))
        assert read_recipe(path) == g.recipe
