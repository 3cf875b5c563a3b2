"""The U-Net compiled ahead of time (histolab.compiled_unet): packages keyed by what they depend on, used
by generation once built, recorded in recipes, re-run with the kernels that made an image.

The module fixture compiles the tiny U-Net twice (2 and 4 rows: batch 1 and 2, guided) with the real
AOTInductor toolchain (g++); about 25 s per package on this machine."""

import subprocess
import sys

import numpy as np
import pytest
import torch

from histolab import compiled_unet as cu
from histolab.generation import GenerationRequest, generate, request_from_recipe
from histolab.pipeline import load_base, optimize_for_inference


def req(**kw):
    base = dict(prompt="an h&e stained histology image of skin", negative_prompt="blurry", steps=2, seed=21)
    return GenerationRequest(**{**base, **kw})


def startup_bundle_dir(folder, root):
    from histolab.startup_bundle import bundle_dir

    return bundle_dir(str(folder), "bfloat16", root)


def px(images):
    return np.stack([np.asarray(g.image).astype(np.int16) for g in images])


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(model, ATen images made before any package existed, the package folder, the tiny pipeline folder).
    The model is loaded from a pipeline folder, so that a subprocess can load the same weights."""
    from adapters_testkit import save_pipeline

    from histolab.embedded.random_init import random_base

    folder = save_pipeline(random_base("tiny", seed=0), tmp_path_factory.mktemp("tiny-pipeline"))
    root = tmp_path_factory.mktemp("compiled")
    model = optimize_for_inference(load_base(str(folder), dtype=torch.bfloat16))
    model.compiled_unets = cu.CompiledUNets(root)
    before = {bs: generate(model, req(batch_size=bs)) for bs in (1, 2)}
    assert all(g.recipe.kernels == "" for g in before[2])  # nothing built yet: ATen's kernels
    paths = cu.build_missing(model, cu.app_shapes(model, (2, 1)), root, log=lambda line: None)
    assert [p.parent for p in paths] == [root, root] and all(p.is_file() for p in paths)
    return model, before, root, folder


def test_generation_uses_the_packages_and_records_it(built):
    model, before, _, _ = built
    after = generate(model, req(batch_size=2))
    assert [g.recipe.kernels for g in after] == [cu.KIND, cu.KIND]
    # Other kernels, other rounding: the images are close to ATen's but not the same bits.
    diff = np.abs(px(after) - px(before[2]))
    assert diff.max() > 0 and diff.mean() < 2.0


def test_the_status_line_names_the_compiled_unet(built):
    from histolab.ui.services import describe_model

    model, _, _, _ = built
    generate(model, req(batch_size=1))
    assert model.compiled_unets.loaded >= 1 and "traced U-Net, compiled U-Net (" in describe_model(model)


def test_compiled_images_do_not_depend_on_the_batch(built):
    model, _, _, _ = built
    alone = generate(model, req(batch_size=1, seed=22))
    pair = generate(model, req(batch_size=2, seed=21))
    assert alone[0].recipe.kernels == cu.KIND
    assert np.array_equal(px(alone)[0], px(pair)[1])  # seed 22 is the pair's second image


def test_reruns_use_the_kernels_of_the_recipe(built):
    model, before, _, _ = built
    compiled = generate(model, req(batch_size=2))[1]
    again = generate(model, request_from_recipe(compiled.recipe))
    assert again[0].recipe.kernels == cu.KIND and np.array_equal(px(again)[0], px([compiled])[0])
    # An image made before the packages existed re-runs with ATen's kernels, bit for bit.
    old = before[2][1]
    rerun = generate(model, request_from_recipe(old.recipe))
    assert rerun[0].recipe.kernels == "" and np.array_equal(px(rerun)[0], px([old])[0])
    assert np.array_equal(px(generate(model, req(batch_size=2, kernels="aten"))), px(before[2]))


def test_adapters_run_the_eager_unet_even_with_packages(built, tmp_path):
    from test_adapters_textual_inversion import sdwebui_pt, vectors

    from histolab.generation import AdapterSpec

    model, _, _, _ = built
    f = sdwebui_pt(tmp_path / "glandemb.pt", vectors(2, seed=1) * 3)
    out = generate(model, req(prompt="glandemb colon tissue", adapters=(AdapterSpec(str(f), 1.0),)))
    assert out[0].recipe.kernels == ""


def test_a_weight_edit_makes_a_new_key(built):
    model, _, _, _ = built
    units = model.compiled_unets
    shape = cu.app_shapes(model, (1,))[0]
    path = units.path(model, shape)
    assert path.is_file()
    p = next(model.unet.parameters())
    saved = p.detach().clone()
    with torch.no_grad():
        p.add_(1.0)  # in place: the version counter moves, so the digest is taken again
    try:
        assert units.path(model, shape) != path
        x_shape, e_shape = (shape.rows, shape.channels, shape.height, shape.width), (shape.tokens, shape.dim)
        assert units.runner(model, x_shape, e_shape) is None  # no package for these weights
    finally:
        with torch.no_grad():
            p.copy_(saved)
    assert units.path(model, shape) == path


def test_keys_follow_dtype_shape_torch_and_isa():
    shape = cu.Shape(2, 4, 16, 16, 77, 32)
    key = cu.package_key("w", {"a": 1}, torch.bfloat16, shape, isa="avx512")
    assert key == cu.package_key("w", {"a": 1}, torch.bfloat16, shape, isa="avx512")
    others = [
        cu.package_key("v", {"a": 1}, torch.bfloat16, shape, isa="avx512"),
        cu.package_key("w", {"a": 2}, torch.bfloat16, shape, isa="avx512"),
        cu.package_key("w", {"a": 1}, torch.float32, shape, isa="avx512"),
        cu.package_key("w", {"a": 1}, torch.bfloat16, cu.Shape(4, 4, 16, 16, 77, 32), isa="avx512"),
        cu.package_key("w", {"a": 1}, torch.bfloat16, shape, isa="avx2"),
    ]
    assert key not in others and len(set(others)) == len(others)


def test_the_builder_process_finds_the_same_packages(built):
    """``python -m histolab compile-unet`` (what the app starts) loads the same weights in a process of
    its own: its keys must be the in-process ones, or the app would never see what it built."""
    _, _, root, folder = built
    before = sorted(p.name for p in root.glob("*.pt2"))
    cmd = [sys.executable, "-m", "histolab", "compile-unet", "--base", str(folder), "--dtype", "bfloat16"]
    cmd += ["--batches", "2,1", "--cache-dir", str(root)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "every package was built already" in done.stdout  # nothing was missing
    assert f"start-up bundle: {startup_bundle_dir(folder, root)}" in done.stdout
    assert sorted(p.name for p in root.glob("*.pt2")) == before


def test_the_app_starts_a_compile_only_when_packages_are_missing(built, monkeypatch):
    from histolab.ui import services as services_module

    model, _, root, folder = built
    started = []
    monkeypatch.setattr(services_module, "CompileJob", lambda argv, log, env: started.append((argv, log, env)) or "job")
    from histolab import startup_bundle

    startup_bundle.write(model, str(folder), [model.default_size], root)
    assert services_module.start_unet_compile(model, str(folder), (2, 1)) is None  # all built, bundle written
    assert services_module.start_unet_compile(model, str(folder), (3,)) == "job"
    argv, log, env = started[0]
    assert argv[argv.index("-m") + 1 :][:2] == ["histolab", "compile-unet"] and argv[argv.index("--batches") + 1] == "3"
    assert argv[argv.index("--cache-dir") + 1] == str(root) and log == root / "build.log"
    assert env["OMP_NUM_THREADS"] == "1"
    # Packages all there but no start-up bundle (one written before bundles existed): compile-unet writes it.
    import shutil

    shutil.rmtree(startup_bundle.bundle_dir(str(folder), "bfloat16", root))
    assert services_module.start_unet_compile(model, str(folder), (2, 1)) == "job" and len(started) == 2
    monkeypatch.setattr(services_module, "AUTO_COMPILE_MAX_PARAMS", 1000)  # an SD 1.5-sized U-Net: not by itself
    assert services_module.start_unet_compile(model, str(folder), (3,)) is None and len(started) == 2
    f32 = optimize_for_inference(load_base(str(folder)))  # float32: no traced U-Net, nothing to compile
    assert f32.compiled_unets is None and services_module.start_unet_compile(f32, str(folder), (1,)) is None


def test_a_failed_compile_says_where_its_log_is(tmp_path):
    from histolab.ui.services import CompileJob

    job = CompileJob([sys.executable, "-c", "import sys; print('no compiler'); sys.exit(3)"], tmp_path / "b.log", {})
    job.thread.join()
    assert job.state.startswith("failed (exit status 3") and str(tmp_path / "b.log") in job.state
    assert "no compiler" in (tmp_path / "b.log").read_text()


def test_vector_isa_is_read_from_cpuinfo(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse4_2 avx2 fma avx512f avx512_bf16 ht\n\nprocessor\t: 1\n")
    isa = cu.vector_isa(info)
    assert isa.endswith(":avx2,avx512_bf16,avx512f,fma,sse4_2")  # vector extensions only, sorted
    info.write_text("processor\t: 0\nflags\t\t: fpu sse4_2 avx2 fma\n")
    assert cu.vector_isa(info) != isa  # a CPU without avx512 gets other packages
    assert cu.vector_isa(tmp_path / "missing").endswith(":")


def test_compile_command_says_what_is_wrong(built, capsys):
    from histolab.cli import main

    _, _, root, folder = built
    assert main(["compile-unet", "--base", str(folder), "--batches", "4,x", "--cache-dir", str(root)]) == 2
    assert "--batches must be whole numbers" in capsys.readouterr().err
    assert main(["compile-unet", "--base", str(folder), "--dtype", "float32", "--cache-dir", str(root)]) == 2
    assert "bfloat16 CPU path only" in capsys.readouterr().err
