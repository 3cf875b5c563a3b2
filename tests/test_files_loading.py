"""Good files load, whatever they are called: the format comes from the content."""

from __future__ import annotations

import hashlib

import pytest
import torch
from safetensors.torch import save_file

from histolab.errors import UnsafeFile
from histolab.files import (
    expected_from_module,
    load_state_dict,
    pickle_globals,
    sha256_file,
    sniff,
    validate_state_dict,
)


def test_safetensors_named_bin_loads_with_metadata(tmp_path):
    f = tmp_path / "pytorch_model.bin"
    w = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
    save_file({"w": w, "b": torch.zeros(0)}, str(f), metadata={"ss_network_dim": "4"})
    assert sniff(f) == "safetensors"
    tensors, meta = load_state_dict(f)
    assert torch.equal(tensors["w"], w) and tensors["b"].shape == (0,)
    assert meta == {"ss_network_dim": "4"}


def test_torch_zip_named_safetensors_loads(tmp_path):
    f = tmp_path / "model.safetensors"
    w = torch.arange(6.0).reshape(2, 3)
    torch.save({"w": w}, f)
    assert sniff(f) == "torch-zip"
    tensors, meta = load_state_dict(f)
    assert torch.equal(tensors["w"], w) and meta == {}


def test_legacy_torch_format_loads(tmp_path):
    f = tmp_path / "old.ckpt"
    torch.save({"w": torch.ones(2)}, f, _use_new_zipfile_serialization=False)
    assert sniff(f) == "pickle"
    assert torch.equal(load_state_dict(f)[0]["w"], torch.ones(2))


def test_a1111_nested_layouts_load(tmp_path):
    # SD-webui embedding (.pt) and hypernetwork (.pt) layouts: nested, with non-tensor fields.
    emb = tmp_path / "emb.pt"
    torch.save({"string_to_param": {"*": torch.ones(2, 8)}, "name": "tok", "step": 100}, emb)
    t, _ = load_state_dict(emb)
    assert t["string_to_param"]["*"].shape == (2, 8) and t["name"] == "tok"
    hyper = tmp_path / "hyper.pt"
    torch.save(
        {768: [{"linear.0.weight": torch.ones(4, 4)}], "activation_func": "relu", "layer_structure": [1, 2, 1]}, hyper
    )
    t, _ = load_state_dict(hyper)
    assert t[768][0]["linear.0.weight"].shape == (4, 4) and t["layer_structure"] == [1, 2, 1]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_float_dtypes_are_interchangeable_for_validation(tmp_path, dtype):
    f = tmp_path / "w.safetensors"
    save_file({"w": torch.ones(2, 2, dtype=dtype)}, str(f))
    tensors, _ = load_state_dict(f, expected={"w": torch.empty(2, 2)})
    assert tensors["w"].dtype == dtype


def test_expected_from_a_meta_module(tmp_path):
    with torch.device("meta"):
        model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    expected = expected_from_module(model)
    assert expected["1.num_batches_tracked"].dtype == torch.int64
    real = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    f = tmp_path / "m.safetensors"
    save_file(real.state_dict(), str(f))
    tensors, _ = load_state_dict(f, expected=expected)
    model.load_state_dict(tensors, assign=True)
    assert not any(p.is_meta for p in model.parameters())
    # The integer counter saved as float is a dtype mismatch, named.
    sd = dict(real.state_dict())
    sd["1.num_batches_tracked"] = sd["1.num_batches_tracked"].float()
    save_file(sd, str(f))
    with pytest.raises(UnsafeFile, match=r"1.num_batches_tracked: dtype torch.float32 in the file, a int dtype"):
        load_state_dict(f, expected=expected)


def test_validation_lists_many_mismatches_briefly():
    expected = {f"k{i}": (2,) for i in range(20)}
    tensors = {f"k{i}": torch.ones(3) for i in range(20)}
    with pytest.raises(UnsafeFile) as info:
        validate_state_dict(tensors, expected, name="f")
    msg = str(info.value)
    assert msg.startswith("f: 20 tensor(s) do not fit: k0: shape [3] in the file, [2] expected")
    assert "... and 12 more" in msg


def test_validation_non_strict_with_no_common_key():
    with pytest.raises(UnsafeFile, match="no key of the file matches"):
        validate_state_dict({"x": torch.ones(1)}, {"y": (1,)}, strict=False)


def test_sha256_matches_hashlib(tmp_path):
    f = tmp_path / "x.safetensors"
    save_file({"w": torch.ones(10)}, str(f))
    assert sha256_file(f) == hashlib.sha256(f.read_bytes()).hexdigest()


def test_pickle_globals_reads_without_running():
    import pickle

    class Call:
        def __reduce__(self):
            return (print, ("never printed",))

    names = pickle_globals(pickle.dumps([Call(), torch.nn.Linear], protocol=4))
    assert "builtins.print" in names and "torch.nn.modules.linear.Linear" in names
    assert pickle_globals(pickle.dumps([Call()], protocol=2)) == ["builtins.print"]


def test_load_torch_file_mmap_and_name_independence(tmp_path):
    from histolab.files import load_torch_file

    w = torch.arange(12.0).reshape(3, 4)
    for name in ("a.pt", "b.safetensors"):
        f = tmp_path / name
        torch.save({"w": w, "step": 3}, f)
        for mmap in (False, True):
            obj = load_torch_file(f, mmap=mmap)
            assert torch.equal(obj["w"], w) and obj["step"] == 3
    st = tmp_path / "real.safetensors"
    save_file({"w": w}, str(st))
    with pytest.raises(UnsafeFile, match="not a torch file"):
        load_torch_file(st)
