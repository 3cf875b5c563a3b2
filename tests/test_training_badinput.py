"""Bad input: too few images in a class, unreadable images, a full disk while saving, running out of memory,
a diverging loss. Each stops with a message that says what happened and where the last good checkpoint is,
and that checkpoint stays intact and loadable."""

import errno
import math

import pytest
import torch
from training_testkit import max_state_difference, quick_config, tiny_base_dir, write_user_dataset  # noqa: F401

from histolab.adapters.loader import locate, open_located
from histolab.adapters.manifest import read_manifest
from histolab.errors import DataError, TrainingError
from histolab.training.loop import train
from histolab.training.state import load_state


def test_too_few_images_in_a_class_stops_before_training(tiny_base_dir, tmp_path):  # noqa: F811
    data = write_user_dataset(tmp_path / "data", {"normal": 6, "adenoma": 1})
    cfg = quick_config("lora", min_images_per_class=3)
    with pytest.raises(DataError, match=r"class 'adenoma' has 1 usable training image; at least 3 are needed"):
        train(cfg, base=str(tiny_base_dir), data=str(data), out=tmp_path / "o", log=None)
    assert load_state(tmp_path / "o" / "training") is None


def test_unreadable_images_are_skipped_counted_and_listed(tiny_base_dir, tmp_path):  # noqa: F811
    data = write_user_dataset(tmp_path / "data", {"normal": 10, "adenoma": 10})
    (data / "normal" / "notes.png").write_text("this is not an image")
    good = (data / "adenoma" / "adenoma_000.png").read_bytes()
    (data / "adenoma" / "truncated.png").write_bytes(good[: len(good) // 2])
    logs: list[str] = []
    cfg = quick_config("lora", max_steps=2, min_images_per_class=2, max_images_per_class=None, samples_per_class=0)
    result = train(cfg, base=str(tiny_base_dir), data=str(data), out=tmp_path / "o", log=logs.append)
    assert result.status == "done"
    m = read_manifest(tmp_path / "o")
    assert m.training["data"]["skipped"] == 2
    # Without splits: a seeded stratified 90/10 split; 9 of each 10 good images train.
    assert m.training["data"]["train"] == {"adenoma": 9, "normal": 9}
    text = "\n".join(logs)
    assert "2 not usable as images (skipped)" in text and "notes.png" in text and "truncated.png" in text


def _fail_second_epoch_save(monkeypatch):
    """A full disk while the epoch-2 checkpoint is being written: a partial file, then ENOSPC."""
    import safetensors.torch

    real = safetensors.torch.save_file

    def save_file(tensors, filename, metadata=None):
        if "epoch-002" in str(filename):
            with open(filename, "wb") as fh:
                fh.write(b"\0" * 100)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)


def test_full_disk_while_saving_keeps_the_last_good_checkpoint(tiny_base_dir, tmp_path, monkeypatch):  # noqa: F811
    cfg = quick_config("lora", epochs=3, samples_per_class=0)
    _fail_second_epoch_save(monkeypatch)
    with pytest.raises(TrainingError) as info:
        train(cfg, base=str(tiny_base_dir), out=tmp_path / "o", log=None)
    msg = str(info.value)
    assert "could not save the epoch 2 checkpoint: the disk is full" in msg and "resume with --resume" in msg
    assert "The last good checkpoint is epoch 1" in msg and "the resume state is at step 3" in msg
    out = tmp_path / "o"
    assert sorted(p.name for p in (out / "epochs").iterdir()) == ["epoch-001"]  # no partial epoch-002, no temp
    for folder in (out, out / "epochs" / "epoch-001"):
        assert read_manifest(folder).training["step"] == 3
        assert open_located(locate(folder)).kind == "lora"
    assert load_state(out / "training").step == 3
    # Space freed: the run resumes and ends exactly as a run that never hit the full disk.
    monkeypatch.undo()
    assert train(None, out=out, resume=True, log=None).step == 9
    train(cfg, base=str(tiny_base_dir), out=tmp_path / "ref", log=None)
    assert max_state_difference(load_state(tmp_path / "ref" / "training"), load_state(out / "training")) == 0.0


def test_out_of_memory_in_a_step_stops_with_advice(tiny_base_dir, tmp_path, monkeypatch):  # noqa: F811
    from histolab.training.lora import LoraNet

    real = LoraNet.forward
    calls = {"n": 0}

    def forward(self, batch):
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(self, batch)

    monkeypatch.setattr(LoraNet, "forward", forward)
    cfg = quick_config("lora", epochs=2, samples_per_class=0)
    with pytest.raises(TrainingError) as info:
        train(cfg, base=str(tiny_base_dir), out=tmp_path / "o", log=None)
    msg = str(info.value)
    assert msg.startswith("out of memory at step 5 (batch_size 4")
    assert "lower batch_size" in msg and "gradient_checkpointing" in msg and "epoch 1" in msg
    assert open_located(locate(tmp_path / "o")).kind == "lora" and load_state(tmp_path / "o" / "training").step == 3


def test_a_diverging_loss_stops_the_run(tiny_base_dir, tmp_path, monkeypatch):  # noqa: F811
    from histolab.training.lora import LoraNet

    monkeypatch.setattr(LoraNet, "forward", lambda self, batch: torch.tensor(math.nan, requires_grad=True))
    with pytest.raises(TrainingError, match=r"the loss is nan at step 1: training diverged; lower the learning rate"):
        train(quick_config("lora", samples_per_class=0), base=str(tiny_base_dir), out=tmp_path / "o", log=None)


@pytest.mark.parametrize("header_length", [640, 896, 1152, 1408])
def test_safetensors_whose_header_length_looks_like_a_pickle_opcode_loads(tmp_path, header_length):
    """Found by a hypernetwork checkpoint with an 896-byte header (bytes 0x80 0x03 ...): it was refused as a pickle."""
    import json
    import struct

    from histolab.files import load_state_dict, sniff

    body = {"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}
    text = json.dumps(body)
    text += " " * (header_length - len(text))  # safetensors pads its header with spaces
    path = tmp_path / "x.safetensors"
    path.write_bytes(struct.pack("<Q", header_length) + text.encode() + struct.pack("<2f", 1.0, 2.0))
    assert path.read_bytes()[0] == 0x80 and path.read_bytes()[1] in range(2, 6)
    assert sniff(path) == "safetensors"
    tensors, _ = load_state_dict(path)
    assert tensors["w"].tolist() == [1.0, 2.0]
