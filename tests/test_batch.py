"""Large runs (histolab.batch): streaming to disk, resume after a stop or a crash, process split."""

import json
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from histolab.batch import (
    INDEX,
    MANIFEST,
    generate_distributed,
    generate_to_dir,
    image_name,
    manifest_for,
    merge_index,
    owned_indices,
    prepare_dir,
    run_worker,
)
from histolab.errors import Cancelled, InvalidRequest
from histolab.generation import GenerationRequest, generate
from histolab.recipe import read_recipe

N = 7
REQ = GenerationRequest(prompt="h&e stained skin", negative_prompt="blurry", steps=2, guidance_scale=3.0, seed=40)


def files(d):
    """{name: bytes} of the run's images and its index (the whole observable result)."""
    out = {p.name: p.read_bytes() for p in sorted(d.glob("*.png"))}
    out[INDEX] = (d / INDEX).read_bytes()
    return out


@pytest.fixture(scope="module")
def reference_run(tiny_model, tmp_path_factory):
    """One uninterrupted single-process run, micro-batch 3."""
    out = tmp_path_factory.mktemp("ref")
    result = generate_to_dir(tiny_model, replace(REQ, batch_size=3), N, out)
    assert result.written == list(range(N))
    return out


def test_run_layout_and_index(tiny_model, reference_run):
    names = sorted(p.name for p in reference_run.glob("*.png"))
    assert names == [image_name(i, 40 + i) for i in range(N)] == [f"{i:06d}-seed{40 + i}.png" for i in range(N)]
    rows = [json.loads(line) for line in (reference_run / INDEX).read_text().splitlines()]
    assert [r["index"] for r in rows] == list(range(N))
    for r in rows:
        assert read_recipe(reference_run / r["file"]).to_dict() == r["recipe"]
        assert r["recipe"]["seed"] == 40 + r["index"]
    # The images are the engine's: image 4 equals a plain generate() at seed 44.
    alone = generate(tiny_model, replace(REQ, seed=44))[0]
    assert np.array_equal(np.asarray(Image.open(reference_run / image_name(4, 44))), np.asarray(alone.image))
    assert not list(reference_run.glob(".*"))  # no temporary files left


def test_cancel_then_resume_gives_the_uninterrupted_run(tiny_model, reference_run, tmp_path):
    out = tmp_path / "run"
    stop_after = 3

    def cancel():
        return len(list(out.glob("*.png"))) >= stop_after

    with pytest.raises(Cancelled, match=r"after 4 of 7 images"):
        generate_to_dir(tiny_model, replace(REQ, batch_size=2), N, out, cancel=cancel)
    done = sorted(p.name for p in out.glob("*.png"))
    assert done == [image_name(i, 40 + i) for i in range(4)]  # whole micro-batches only
    lines = (out / INDEX).read_text().splitlines()
    assert [json.loads(x)["file"] for x in lines] == done  # the index matches the files after the stop

    with pytest.raises(InvalidRequest, match="pass --resume"):
        generate_to_dir(tiny_model, replace(REQ, batch_size=2), N, out)
    seen = []
    result = generate_to_dir(
        tiny_model, replace(REQ, batch_size=4), N, out, resume=True, progress=lambda d, t: seen.append((d, t))
    )
    assert result.written == [4, 5, 6] and result.skipped == 4
    assert seen[0] == (4, 7) and seen[-1] == (7, 7)
    assert files(out) == files(reference_run)  # same names, same bytes, no duplicates


def test_resume_repairs_a_crash(tiny_model, reference_run, tmp_path):
    """A crash mid-write: a .part file, a torn index line, a PNG without its line, a damaged PNG."""
    out = tmp_path / "run"
    with pytest.raises(Cancelled):
        generate_to_dir(tiny_model, REQ, N, out, cancel=lambda: len(list(out.glob("*.png"))) >= 5)
    assert len(list(out.glob("*.png"))) == 5
    lines = (out / INDEX).read_text().splitlines()
    # The index loses image 4's line and ends in half a line, as if the process died while appending.
    (out / INDEX).write_text("\n".join(lines[:4]) + "\n" + lines[4][:25])
    # Image 2 is truncated under its final name (only a disk fault can do this; it must not count as done).
    p2 = out / image_name(2, 42)
    p2.write_bytes(p2.read_bytes()[:200])
    # A half-written temporary file of image 5.
    (out / f".{image_name(5, 45)}.part").write_bytes(b"\x89PNG\r\n\x1a\n partial")

    result = generate_to_dir(tiny_model, REQ, N, out, resume=True)
    assert sorted(result.written) == [2, 5, 6]  # the damaged one is made again; image 4 is kept
    assert files(out) == files(reference_run)
    assert not list(out.glob(".*.part"))


def test_resume_refuses_other_settings(tiny_model, tmp_path):
    out = tmp_path / "run"
    generate_to_dir(tiny_model, REQ, 2, out)
    with pytest.raises(InvalidRequest, match=r"request.prompt: 'h&e stained skin' there, 'colon' now"):
        generate_to_dir(tiny_model, replace(REQ, prompt="colon"), 2, out, resume=True)
    with pytest.raises(InvalidRequest, match="pass --n 2 or more"):
        generate_to_dir(tiny_model, REQ, 1, out, resume=True)
    # More images for the same run: the first two are kept, the third is added.
    before = files(out)
    result = generate_to_dir(tiny_model, replace(REQ, batch_size=2), 3, out, resume=True)
    assert result.written == [2]
    after = files(out)
    assert all(after[k] == v for k, v in before.items() if k != INDEX)
    assert json.loads((out / MANIFEST).read_text())["n"] == 3


def test_two_processes_union_equals_one(tiny_model, reference_run, tmp_path):
    """Simulated `accelerate launch --num_processes 2`: worker 0 and worker 1, then the merge."""
    out = tmp_path / "split"
    req = replace(REQ, batch_size=2)
    prepare_dir(out, manifest_for(tiny_model, req, N), resume=False)
    merge_index(out)
    r1 = run_worker(tiny_model, req, out, process_index=1, num_processes=2)
    r0 = run_worker(tiny_model, req, out, process_index=0, num_processes=2)
    assert r0.written == [0, 2, 4, 6] and r1.written == [1, 3, 5]
    shards = sorted(p.name for p in out.glob("recipes.p*.jsonl"))
    assert shards == ["recipes.p0.jsonl", "recipes.p1.jsonl"]
    assert merge_index(out) == list(range(N))
    assert not list(out.glob("recipes.p*.jsonl"))
    assert files(out) == files(reference_run)


class FakeState:
    """The parts of accelerate.PartialState the run uses, for one process of a simulated launch."""

    def __init__(self, index, count):
        self.process_index, self.num_processes = index, count
        self.is_main_process = index == 0
        self.barriers = 0

    def wait_for_everyone(self):
        self.barriers += 1


def test_distributed_entry_point_with_a_three_process_split(tiny_model, reference_run, tmp_path):
    out = tmp_path / "split3"
    states = [FakeState(i, 3) for i in range(3)]
    # Main first (it prepares the folder), then the others; each merges nothing but its shard.
    results = [generate_distributed(tiny_model, REQ, N, out, state=s) for s in states]
    assert [r.written for r in results] == [[0, 3, 6], [1, 4], [2, 5]]
    assert all(s.barriers == 2 for s in states)
    merge_index(out)  # the main process's final merge, after the last worker (here: sequential)
    assert files(out) == files(reference_run)


def test_owned_indices_partition_the_run():
    parts = [set(owned_indices(10, i, 3)) for i in range(3)]
    assert set().union(*parts) == set(range(10)) and sum(map(len, parts)) == 10
    with pytest.raises(InvalidRequest, match="process 2 of 2"):
        owned_indices(10, 2, 2)


def test_bad_counts_and_outputs(tiny_model, tmp_path):
    with pytest.raises(InvalidRequest, match="number of images must be from 1 to"):
        generate_to_dir(tiny_model, REQ, 0, tmp_path / "x")
    (tmp_path / "file").write_text("x")
    with pytest.raises(InvalidRequest, match="is a file, not a folder"):
        generate_to_dir(tiny_model, REQ, 1, tmp_path / "file")


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_every_batch_position_matches_the_image_alone(tiny_model, guidance):
    """What resume and the process split rely on: an image's pixels do not depend on its batch-mates."""
    req = replace(REQ, guidance_scale=guidance)
    seeds = [43, 44, 45, 3, 12]
    together = generate(tiny_model, req, seeds=seeds)
    for g in together:
        alone = generate(tiny_model, replace(req, seed=g.recipe.seed))[0]
        assert np.array_equal(np.asarray(g.image), np.asarray(alone.image)), f"seed {g.recipe.seed}"
