"""The hostile and broken file corpus: built here, never committed as binaries.

Every file must give an UnsafeFile (a HistolabError) with a message that says
what is wrong, must not run code, and must not take the process down. The
files that try to run code are also shown to run it when loaded the unsafe
way (in a throw-away subprocess), so these tests cannot pass vacuously.
"""

from __future__ import annotations

import collections
import io
import json
import pickle
import struct
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from histolab.errors import HistolabError, ModelNotFound, UnsafeFile
from histolab.files import load_state_dict, sniff, validate_state_dict

ROOT = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------ builders


class _Payload:
    """Unpickling this runs ``code`` (here: writes a marker file)."""

    def __init__(self, code: str):
        self.code = code

    def __reduce__(self):
        return (exec, (self.code,))


class _OsSystem:
    def __init__(self, cmd: str):
        self.cmd = cmd

    def __reduce__(self):
        import os

        return (os.system, (self.cmd,))


def marker_code(marker: Path) -> str:
    return f"open({str(marker)!r}, 'w').write('code ran')"


def evil_pickle(marker: Path, protocol: int = 4) -> bytes:
    return pickle.dumps({"weight": _Payload(marker_code(marker))}, protocol=protocol)


def evil_legacy_torch(marker: Path) -> bytes:
    """The pre-1.6 torch format: magic, protocol, sys info, then the object (here malicious)."""
    from torch.serialization import MAGIC_NUMBER, PROTOCOL_VERSION

    buf = io.BytesIO()
    for obj in (MAGIC_NUMBER, PROTOCOL_VERSION, {"protocol_version": PROTOCOL_VERSION, "little_endian": True}):
        pickle.dump(obj, buf, protocol=2)
    pickle.dump({"weight": _OsSystem(f"touch {marker}")}, buf, protocol=2)
    return buf.getvalue()


def torch_zip_with_pickle(tmp: Path, data_pkl: bytes, name: str = "evil.pt") -> Path:
    """A genuine torch.save zip whose data.pkl is replaced."""
    good = tmp / "good-for-zip.pt"
    torch.save({"weight": torch.ones(3)}, good)
    out = tmp / name
    with zipfile.ZipFile(good) as zi, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as zo:
        for n in zi.namelist():
            zo.writestr(n, data_pkl if n.endswith("/data.pkl") else zi.read(n))
    return out


def huge_storage_legacy(path: Path, numel: int) -> None:
    """A legacy torch file whose one tensor claims a storage of ``numel`` floats (it has 3)."""
    from torch.serialization import MAGIC_NUMBER, PROTOCOL_VERSION

    class Storage:
        pass

    class Tensor:
        def __reduce__(self):
            return (torch._utils._rebuild_tensor_v2, (Storage(), 0, (3,), (1,), False, collections.OrderedDict()))

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            return ("storage", torch.FloatStorage, "0", "cpu", numel, None) if isinstance(obj, Storage) else None

    with open(path, "wb") as fh:
        for obj in (MAGIC_NUMBER, PROTOCOL_VERSION, {"protocol_version": PROTOCOL_VERSION, "little_endian": True}):
            pickle.dump(obj, fh, protocol=2)
        Pickler(fh, protocol=2).dump({"weight": Tensor()})
        pickle.dump(["0"], fh, protocol=2)
        fh.write(struct.pack("<q", 3) + struct.pack("<3f", 1, 1, 1))


def raw_safetensors(header: dict, data: bytes) -> bytes:
    blob = json.dumps(header).encode()
    return struct.pack("<Q", len(blob)) + blob + data


def good_safetensors(path: Path) -> Path:
    save_file({"a": torch.ones(2, 3), "b": torch.zeros(4)}, str(path))
    return path


# ------------------------------------------------------------ helpers


def assert_refused(path: Path, *words: str, exc: type[HistolabError] = UnsafeFile) -> str:
    with pytest.raises(exc) as info:
        load_state_dict(path)
    msg = str(info.value)
    for w in words:
        assert w.lower() in msg.lower(), f"{w!r} not in {msg!r}"
    return msg


def run_isolated(code: str) -> subprocess.CompletedProcess:
    return run_isolated_args(code)


def run_isolated_args(code: str, *args: str) -> subprocess.CompletedProcess:
    """Python in a fresh process (the dangerous loads: a crash there is visible as a return code)."""
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"},
    )


LOAD_IN_CHILD = """
import json, sys
import histolab
from histolab.errors import UnsafeFile
from histolab.files import load_state_dict
out = {}
for path in json.loads(sys.argv[1]):
    try:
        load_state_dict(path)
        out[path] = "LOADED"
    except UnsafeFile as exc:
        out[path] = "REFUSED: " + str(exc)
print(json.dumps(out))
"""


# ------------------------------------------------------------ the corpus: code execution


def test_pickle_with_code_executing_reduce_does_not_run(tmp_path):
    marker = tmp_path / "pwned"
    f = tmp_path / "embedding.pt"
    f.write_bytes(evil_pickle(marker))
    msg = assert_refused(f, "refused", "builtins.exec")
    assert "weights_only" not in msg.replace("weights-only", ""), "never advise weights_only=False"
    assert not marker.exists()


def test_pickle_renamed_safetensors_is_judged_by_content(tmp_path):
    marker = tmp_path / "pwned"
    f = tmp_path / "model.safetensors"
    f.write_bytes(evil_pickle(marker, protocol=2))
    assert sniff(f) == "pickle"
    assert_refused(f, "refused")
    assert not marker.exists()


def test_plain_pickle_of_tensors_is_refused(tmp_path):
    # Not a torch file (no magic number), so not a weights file, even though it holds only floats.
    f = tmp_path / "weights.safetensors"
    f.write_bytes(pickle.dumps({"w": [1.0, 2.0]}, protocol=2))
    assert_refused(f, "refused")


def test_legacy_torch_file_with_malicious_object(tmp_path):
    marker = tmp_path / "pwned-legacy"
    f = tmp_path / "hypernet.pt"
    f.write_bytes(evil_legacy_torch(marker))
    assert_refused(f, "refused", "system")
    assert not marker.exists()


def test_torch_zip_with_malicious_data_pkl(tmp_path):
    marker = tmp_path / "pwned-zip"
    f = torch_zip_with_pickle(tmp_path, pickle.dumps({"weight": _Payload(marker_code(marker))}, protocol=2))
    assert sniff(f) == "torch-zip"
    assert_refused(f, "refused", "exec")
    assert not marker.exists()


def test_the_corpus_really_runs_code_when_loaded_unsafely(tmp_path):
    # Proof that the corpus files are dangerous: plain pickle.load and
    # torch.load(weights_only=False) run them (in a throw-away child process).
    files, markers = {}, {}
    for kind in ("pickle", "legacy", "zip"):
        markers[kind] = tmp_path / f"proof-{kind}"
        files[kind] = tmp_path / f"proof-{kind}.bin"
    files["pickle"].write_bytes(evil_pickle(markers["pickle"]))
    files["legacy"].write_bytes(evil_legacy_torch(markers["legacy"]))
    zipped = torch_zip_with_pickle(tmp_path, pickle.dumps({"w": _Payload(marker_code(markers["zip"]))}, protocol=2))
    r = run_isolated(
        f"""
        import pickle, torch
        pickle.load(open({str(files["pickle"])!r}, "rb"))
        for f in ({str(files["legacy"])!r}, {str(zipped)!r}):
            try:
                torch.load(f, weights_only=False)
            except Exception:
                pass  # the payload has run by then; what it returns is not a state dict
        """
    )
    assert r.returncode == 0, r.stderr
    assert all(m.exists() for m in markers.values()), {k: m.exists() for k, m in markers.items()}


def test_dangerous_files_in_a_child_process_survive_and_run_nothing(tmp_path):
    markers = {k: tmp_path / f"pwned-{k}" for k in ("pickle", "legacy", "zip")}
    files = {k: tmp_path / f"{k}.safetensors" for k in ("pickle", "legacy", "huge-storage")}
    files["pickle"].write_bytes(evil_pickle(markers["pickle"]))
    files["legacy"].write_bytes(evil_legacy_torch(markers["legacy"]))
    files["zip"] = torch_zip_with_pickle(
        tmp_path, pickle.dumps({"w": _Payload(marker_code(markers["zip"]))}, protocol=2)
    )
    huge_storage_legacy(files["huge-storage"], numel=10**12)  # claims 4 TB of floats
    r = run_isolated_args(LOAD_IN_CHILD, json.dumps([str(f) for f in files.values()]))
    assert r.returncode == 0, f"the process died: rc={r.returncode} {r.stderr[-2000:]}"
    outcome = json.loads(r.stdout.strip().splitlines()[-1])
    for kind, f in files.items():
        assert outcome[str(f)].startswith("REFUSED: "), (kind, outcome[str(f)])
    assert not any(m.exists() for m in markers.values())


def test_huge_storage_claim_in_zip_is_refused(tmp_path):
    class Storage:
        pass

    class Tensor:
        def __reduce__(self):
            return (torch._utils._rebuild_tensor_v2, (Storage(), 0, (3,), (1,), False, collections.OrderedDict()))

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            return ("storage", torch.FloatStorage, "0", "cpu", 10**12) if isinstance(obj, Storage) else None

    buf = io.BytesIO()
    Pickler(buf, protocol=2).dump({"w": Tensor()})
    f = torch_zip_with_pickle(tmp_path, buf.getvalue(), "huge.pt")
    assert_refused(f, "refused", "record size")


def test_compressed_zip_member_is_refused(tmp_path):
    good = tmp_path / "good.pt"
    torch.save({"w": torch.zeros(1000)}, good)
    f = tmp_path / "deflated.pt"
    with zipfile.ZipFile(good) as zi, zipfile.ZipFile(f, "w", zipfile.ZIP_DEFLATED) as zo:
        for n in zi.namelist():
            zo.writestr(n, zi.read(n))
    assert_refused(f, "compressed")


def test_zip_without_data_pkl_is_refused(tmp_path):
    f = tmp_path / "archive.pt"
    with zipfile.ZipFile(f, "w") as zo:
        zo.writestr("readme.txt", "hello")
    assert_refused(f, "data.pkl")


def test_damaged_zip_is_refused(tmp_path):
    good = tmp_path / "good.pt"
    torch.save({"w": torch.zeros(1000)}, good)
    f = tmp_path / "cut.pt"
    f.write_bytes(good.read_bytes()[:600])
    assert_refused(f, "zip")


# ------------------------------------------------------------ the corpus: broken safetensors


def test_truncated_safetensors(tmp_path):
    good = good_safetensors(tmp_path / "good.safetensors")
    f = tmp_path / "truncated.safetensors"
    f.write_bytes(good.read_bytes()[:-5])
    assert_refused(f, "truncated")


def test_truncated_inside_the_header(tmp_path):
    good = good_safetensors(tmp_path / "good.safetensors")
    f = tmp_path / "cut-header.safetensors"
    f.write_bytes(good.read_bytes()[:20])
    assert_refused(f, "header length")


def test_oversized_header_length(tmp_path):
    f = tmp_path / "oversized.safetensors"
    f.write_bytes(struct.pack("<Q", 1 << 40) + b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}')
    assert sniff(f) == "safetensors-oversized"
    assert_refused(f, "limit")


def test_header_length_past_end_of_file(tmp_path):
    f = tmp_path / "long.safetensors"
    f.write_bytes(struct.pack("<Q", 5000) + b'{"a": 1}')
    assert_refused(f, "past the end")


def test_header_not_json(tmp_path):
    f = tmp_path / "notjson.safetensors"
    blob = b"{this is not json at all"
    f.write_bytes(struct.pack("<Q", len(blob)) + blob)
    assert_refused(f, "not valid JSON")


def test_header_not_utf8(tmp_path):
    f = tmp_path / "latin.safetensors"
    blob = b'{"\xff\xfe": 1}'
    f.write_bytes(struct.pack("<Q", len(blob)) + blob)
    assert_refused(f, "not valid JSON")


def test_header_entry_not_an_object(tmp_path):
    f = tmp_path / "entry.safetensors"
    header = {"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "b": []}
    f.write_bytes(raw_safetensors(header, b"\0" * 4))
    assert_refused(f, "'b'", "not an object")


def test_json_list_header_is_not_safetensors(tmp_path):
    f = tmp_path / "list.safetensors"
    f.write_bytes(struct.pack("<Q", 2) + b"[]")
    assert sniff(f) == "unknown"
    assert_refused(f, "unrecognised content")


def test_duplicate_keys_in_header(tmp_path):
    f = tmp_path / "dup.safetensors"
    e = '{"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}'
    blob = ('{"a": ' + e + ', "a": ' + e + "}").encode()
    f.write_bytes(struct.pack("<Q", len(blob)) + blob + b"\0" * 4)
    assert_refused(f, "duplicate key 'a'")


def test_overlapping_data_offsets(tmp_path):
    f = tmp_path / "overlap.safetensors"
    header = {
        "a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
        "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]},
    }
    f.write_bytes(raw_safetensors(header, b"\0" * 24))
    assert_refused(f, "overlap", "'a'", "'b'")


def test_out_of_range_data_offsets(tmp_path):
    f = tmp_path / "range.safetensors"
    header = {"a": {"dtype": "F32", "shape": [250000000], "data_offsets": [0, 1000000000]}}
    f.write_bytes(raw_safetensors(header, b"\0" * 16))
    assert_refused(f, "past the end", "'a'")


def test_offsets_that_disagree_with_shape(tmp_path):
    f = tmp_path / "shape.safetensors"
    header = {"a": {"dtype": "F32", "shape": [100], "data_offsets": [0, 16]}}
    f.write_bytes(raw_safetensors(header, b"\0" * 16))
    assert_refused(f, "needs 400")


def test_negative_and_non_integer_offsets_and_shapes(tmp_path):
    f = tmp_path / "neg.safetensors"
    f.write_bytes(raw_safetensors({"a": {"dtype": "F32", "shape": [1], "data_offsets": [-4, 0]}}, b"\0" * 4))
    assert_refused(f, "invalid data_offsets")
    f.write_bytes(raw_safetensors({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4))
    assert_refused(f, "invalid shape")
    f.write_bytes(raw_safetensors({"a": {"dtype": "F32", "shape": [1.5], "data_offsets": [0, 4]}}, b"\0" * 4))
    assert_refused(f, "invalid shape")


def test_gap_and_trailing_bytes(tmp_path):
    f = tmp_path / "gap.safetensors"
    f.write_bytes(raw_safetensors({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"\0" * 8))
    assert_refused(f, "gap")
    f.write_bytes(raw_safetensors({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 12))
    assert_refused(f, "trailing")


def test_unknown_dtype(tmp_path):
    f = tmp_path / "dtype.safetensors"
    f.write_bytes(raw_safetensors({"a": {"dtype": "F128", "shape": [1], "data_offsets": [0, 16]}}, b"\0" * 16))
    assert_refused(f, "unknown dtype 'F128'")


def test_bad_metadata(tmp_path):
    f = tmp_path / "meta.safetensors"
    header = {"__metadata__": {"x": 1}, "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}
    f.write_bytes(raw_safetensors(header, b"\0" * 4))
    assert_refused(f, "__metadata__")


def test_zero_tensors_safetensors(tmp_path):
    f = tmp_path / "none.safetensors"
    f.write_bytes(raw_safetensors({"__metadata__": {"format": "pt"}}, b""))
    assert_refused(f, "no tensors")
    f.write_bytes(raw_safetensors({}, b""))
    assert_refused(f, "no tensors")


def test_zero_tensors_torch(tmp_path):
    f = tmp_path / "empty-dict.pt"
    torch.save({}, f)
    assert_refused(f, "no tensors")
    torch.save({"name": "x", "step": 3}, f)
    assert_refused(f, "no tensors")


# ------------------------------------------------------------ the corpus: bad values


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weights_safetensors(tmp_path, bad):
    f = tmp_path / "nan.safetensors"
    w = torch.ones(3, 3)
    w[1, 2] = bad
    save_file({"ok": torch.ones(2), "layer.weight": w}, str(f))
    assert_refused(f, "'layer.weight'", "non-finite")


def test_non_finite_weights_nested_torch(tmp_path):
    # The A1111 embedding layout: the bad tensor is two levels down.
    f = tmp_path / "emb.pt"
    torch.save({"string_to_param": {"*": torch.tensor([[1.0, float("nan")]])}, "name": "x"}, f)
    assert_refused(f, "string_to_param.*", "NaN")


def test_non_finite_half_precision(tmp_path):
    f = tmp_path / "half.safetensors"
    save_file({"w": torch.tensor([1.0, 70000.0]).half()}, str(f))  # 70000 overflows fp16 to inf
    assert_refused(f, "'w'", "infinite")


def test_wrong_shapes_are_named(tmp_path):
    f = tmp_path / "sdxl-on-sd15.safetensors"
    save_file({"to_k.weight": torch.ones(320, 2048), "to_v.weight": torch.ones(320, 768)}, str(f))
    with pytest.raises(UnsafeFile) as info:
        load_state_dict(f, expected={"to_k.weight": (320, 768), "to_v.weight": (320, 768)})
    msg = str(info.value)
    assert "to_k.weight: shape [320, 2048] in the file, [320, 768] expected" in msg
    assert "to_v.weight" not in msg


def test_wrong_dtype_int_where_float_expected(tmp_path):
    f = tmp_path / "ints.safetensors"
    save_file({"w": torch.ones(4, 4, dtype=torch.int32)}, str(f))
    with pytest.raises(UnsafeFile, match=r"w: dtype torch.int32 in the file, a float dtype expected"):
        load_state_dict(f, expected={"w": (4, 4)})
    # A model tensor gives the dtype kind: an int buffer where the model has one is fine.
    load_state_dict(f, expected={"w": torch.zeros(4, 4, dtype=torch.int64)})


def test_missing_and_unexpected_keys(tmp_path):
    f = tmp_path / "keys.safetensors"
    save_file({"a": torch.ones(1), "extra": torch.ones(1)}, str(f))
    with pytest.raises(UnsafeFile) as info:
        load_state_dict(f, expected={"a": (1,), "b": (1,)})
    msg = str(info.value)
    assert "1 key(s) missing from the file: b" in msg and "1 unexpected key(s) in the file: extra" in msg
    load_state_dict(f, expected={"a": (1,), "b": (1,)}, strict=False)  # non-strict: a subset is fine


def test_validation_error_type_can_be_chosen():
    from histolab.errors import AdapterError

    with pytest.raises(AdapterError, match="shape"):
        validate_state_dict({"w": torch.ones(2)}, {"w": (3,)}, name="lora", error=AdapterError)


# ------------------------------------------------------------ the corpus: not files at all


def test_empty_file(tmp_path):
    f = tmp_path / "empty.safetensors"
    f.write_bytes(b"")
    assert_refused(f, "empty")


@pytest.mark.parametrize("prefix", [b"", b"\x80\x04", b"PK\x03\x04", struct.pack("<Q", 60) + b"{"])
def test_random_bytes(tmp_path, prefix):
    g = torch.Generator().manual_seed(1234)
    data = prefix + bytes(torch.randint(0, 256, (4096,), generator=g, dtype=torch.uint8).tolist())
    f = tmp_path / "random.bin"
    f.write_bytes(data)
    assert_refused(f)


def test_text_file(tmp_path):
    f = tmp_path / "model.ckpt"
    f.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 12345\n")
    assert_refused(f, "unrecognised content")


def test_directory_where_a_file_is_expected(tmp_path):
    d = tmp_path / "model.safetensors"
    d.mkdir()
    assert_refused(d, "directory")
    with pytest.raises(UnsafeFile):
        sniff(d)


def test_missing_file(tmp_path):
    assert_refused(tmp_path / "nope.safetensors", "no such file", exc=ModelNotFound)


def test_deeply_nested_torch_file(tmp_path):
    obj: object = torch.ones(1)
    for _ in range(100):
        obj = [obj]
    f = tmp_path / "deep.pt"
    torch.save({"w": obj}, f)
    assert_refused(f, "nested")


def test_torch_file_that_is_not_a_dict(tmp_path):
    f = tmp_path / "tensor.pt"
    torch.save(torch.ones(3), f)
    assert_refused(f, "not a state dict")


def test_torch_internal_objects_allowed_by_weights_only_are_refused(tmp_path):
    # A nested (jagged) tensor passes torch's weights-only unpickler; no weights file we read holds one.
    nt = torch.nested.nested_tensor([torch.ones(2), torch.ones(3)], layout=torch.jagged)
    f = tmp_path / "nested.pt"
    torch.save({"w": nt}, f)
    assert torch.load(f, weights_only=True)["w"].is_nested
    assert_refused(f, "not a plain weights file")


def test_sparse_tensor_is_refused(tmp_path):
    f = tmp_path / "sparse.pt"
    torch.save({"w": torch.eye(3).to_sparse()}, f)
    assert_refused(f, "layout")


def test_fifo_is_not_opened(tmp_path):
    import os

    fifo = tmp_path / "model.safetensors"
    os.mkfifo(fifo)
    assert_refused(fifo, "not a regular file")  # opening it would block forever


def test_dangerous_callable_inside_the_torch_namespace_is_refused_and_named(tmp_path):
    class Fetch:
        def __reduce__(self):
            return (torch.hub.load_state_dict_from_url, ("http://127.0.0.1:9/weights.pt",))

    f = tmp_path / "fetch.pt"
    f.write_bytes(pickle.dumps({"w": Fetch()}, protocol=2))
    assert_refused(f, "refused", "torch.hub.load_state_dict_from_url")
