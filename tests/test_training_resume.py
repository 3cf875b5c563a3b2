"""Cancel and resume: a run cancelled mid-epoch and resumed ends with exactly the weights and optimiser state
of an uninterrupted run with the same seed (tolerance 0 on the CPU: every random draw derives from
(seed, step)); the cancelled run leaves a complete, loadable adapter."""

import numpy as np
import pytest
from adapters_testkit import pixels
from training_testkit import encoder_for, max_state_difference, quick_config, tiny_base_dir  # noqa: F401

from histolab.adapters.loader import locate, open_located
from histolab.adapters.manifest import read_manifest
from histolab.errors import InvalidRequest
from histolab.pipeline import load_base
from histolab.training.loop import train
from histolab.training.state import load_state

# Dropout inside the trained parts (hypernetwork, projector) must also replay exactly.
CASES = {
    "lora": {},
    "dreambooth": {},
    "textual_inversion": {},
    "hypernetwork": {"dropout_structure": [0.0, 0.3, 0.0]},
    "projector": {},
}


def _cancel_after(n):
    seen = {"step": 0}

    def progress(p):
        if p.phase == "training":
            seen["step"] = p.step

    return progress, lambda: seen["step"] >= n


@pytest.mark.parametrize("method", list(CASES))
def test_resume_after_cancel_reaches_the_same_weights(tiny_base_dir, tmp_path, method):  # noqa: F811
    cfg = quick_config(method, epochs=2, samples_per_class=0, **CASES[method])
    enc = encoder_for(method)
    common = dict(base=str(tiny_base_dir), data="bundled", encoder=enc, log=None)
    full = train(cfg, out=tmp_path / "full", **common)
    assert full.status == "done" and full.step == 6

    progress, cancel = _cancel_after(4)  # in the middle of epoch 2
    part = train(cfg, out=tmp_path / "part", progress=progress, cancel=cancel, **common)
    assert part.status == "cancelled" and part.step == 4
    # The cancelled run's folder is a complete adapter at step 4, and says how to go on.
    m = read_manifest(tmp_path / "part")
    assert m.kind == method and m.training["step"] == 4 and "cancelled" in m.training["status"]
    assert open_located(locate(tmp_path / "part")).kind == method

    resumed = train(None, out=tmp_path / "part", resume=True, encoder=enc, log=None)
    assert resumed.status == "done" and resumed.step == 6
    diff = max_state_difference(load_state(tmp_path / "full" / "training"), load_state(tmp_path / "part" / "training"))
    assert diff == 0.0, f"{method}: resumed run differs from the uninterrupted one by {diff}"
    assert [h["epoch"] for h in resumed.history] == [1, 2]
    assert resumed.history[0] == full.history[0]


def test_cancelled_adapter_generates_like_the_saved_state(tiny_base_dir, tmp_path):  # noqa: F811
    """The adapter a cancel leaves is the weights at the cancel step (not the last epoch's)."""
    cfg = quick_config("lora", epochs=2, samples_per_class=0, lr=1e-2)
    progress, cancel = _cancel_after(2)
    train(cfg, base=str(tiny_base_dir), out=tmp_path / "c", progress=progress, cancel=cancel, log=None)
    base = load_base(str(tiny_base_dir))
    at_cancel = pixels(base, [(str(tmp_path / "c"), 1.0)], prompt="skin_he_tissue")
    assert not np.array_equal(at_cancel, pixels(base, prompt="skin_he_tissue"))
    st = load_state(tmp_path / "c" / "training")
    assert st.step == 2
    payload = open_located(locate(tmp_path / "c")).payload
    saved = {f"{layer.target[0]}.{layer.target[1]}.down": layer.down for layer in payload.layers}
    for k, v in saved.items():
        assert np.array_equal(v.numpy(), st.trainable[k].numpy()), k


def test_a_second_run_into_the_same_folder_needs_resume(tiny_base_dir, tmp_path):  # noqa: F811
    cfg = quick_config("lora", max_steps=1, samples_per_class=0)
    train(cfg, base=str(tiny_base_dir), out=tmp_path / "r", log=None)
    with pytest.raises(InvalidRequest, match="already holds a training run"):
        train(cfg, base=str(tiny_base_dir), out=tmp_path / "r", log=None)
    with pytest.raises(InvalidRequest, match=r"lr: saved 0\.001, given 0\.002"):
        train(cfg.replace(lr=2e-3), base=str(tiny_base_dir), out=tmp_path / "r", resume=True, log=None)
