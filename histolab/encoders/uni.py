"""UNI and UNI2-h (Mahmood Lab pathology foundation models) as timm ViTs.

The architectures are built with the arguments published on the model cards
(huggingface.co/MahmoodLab/UNI2-h, huggingface.co/MahmoodLab/UNI), checked
against timm 1.0.31. The weights come from, in this order:

1. a local file ``checkpoints/encoders/<name>/model.safetensors`` or
   ``checkpoints/encoders/<name>/pytorch_model.bin`` (the hub's file name;
   either file is judged by its content, not its name);
2. the Hugging Face hub (both repos are gated: accept the licence on the model
   page and log in with ``hf auth login``), when it can be reached.

Before any weight is applied the file is validated against the model built on
the meta device (no memory used): every key present, no extra key, every
shape and dtype kind as the model has it, all values finite. The mismatch is
named in the error.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from histolab.config import Paths
from histolab.encoders.frozen import FrozenEncoder, normalise, resize_center_crop
from histolab.errors import ModelNotFound, OfflineError, UnsafeFile
from histolab.files import expected_from_module, load_state_dict, sha256_file

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LOCAL_FILES = ("model.safetensors", "pytorch_model.bin")  # looked for in this order


def _uni2h_kwargs() -> dict[str, Any]:
    import timm

    # MahmoodLab/UNI2-h model card, "timm_kwargs".
    return dict(
        img_size=224,
        patch_size=14,
        depth=24,
        num_heads=24,
        init_values=1e-5,
        embed_dim=1536,
        mlp_ratio=2.66667 * 2,
        num_classes=0,
        no_embed_class=True,
        mlp_layer=timm.layers.SwiGLUPacked,
        act_layer=torch.nn.SiLU,
        reg_tokens=8,
        dynamic_img_size=True,
    )


def _uni_kwargs() -> dict[str, Any]:
    # MahmoodLab/UNI model card.
    return dict(img_size=224, patch_size=16, init_values=1e-5, num_classes=0, dynamic_img_size=True)


@dataclass(frozen=True)
class TimmSpec:
    name: str
    title: str
    timm_name: str
    kwargs: Any  # () -> dict: built lazily so that importing histolab does not import timm
    dim: int
    hub_repo: str
    hub_filename: str
    description: str
    image_size: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    overrides: dict[str, Any] = field(default_factory=dict)

    def build(self, **overrides) -> torch.nn.Module:
        """The timm model with random (or, under ``torch.device('meta')``, no) weights.

        ``overrides`` replace published arguments (tests build a shallow copy
        of the same architecture this way)."""
        import timm

        kw = {**self.kwargs(), **self.overrides, **overrides}
        return timm.create_model(self.timm_name, pretrained=False, **kw)

    def local_dir(self, paths: Paths) -> Path:
        return paths.checkpoints / "encoders" / self.name


UNI2_H = TimmSpec(
    name="uni2-h",
    title="UNI2-h",
    timm_name="vit_giant_patch14_224",
    kwargs=_uni2h_kwargs,
    dim=1536,
    hub_repo="MahmoodLab/UNI2-h",
    hub_filename="pytorch_model.bin",
    description="UNI2-h: ViT-H/14 (681 M parameters, 8 register tokens, SwiGLU), 1536-d, "
    "self-supervised (DINOv2) on 200 M+ H&E and IHC tiles",
)
UNI = TimmSpec(
    name="uni",
    title="UNI",
    timm_name="vit_large_patch16_224",
    kwargs=_uni_kwargs,
    dim=1024,
    hub_repo="MahmoodLab/UNI",
    hub_filename="pytorch_model.bin",
    description="UNI: ViT-L/16 (303 M parameters), 1024-d, self-supervised (DINOv2) on 100 M H&E tiles",
)
SPECS = {s.name: s for s in (UNI2_H, UNI)}


def find_local(spec: TimmSpec, paths: Paths) -> Path | None:
    d = spec.local_dir(paths)
    for fn in LOCAL_FILES:
        if (d / fn).is_file():
            return d / fn
    return None


def fetch_from_hub(spec: TimmSpec, paths: Paths) -> Path:
    """The hub file (cached by huggingface_hub), or an OfflineError that says where to put it."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError

    target = spec.local_dir(paths) / spec.hub_filename
    try:
        try:
            return Path(hf_hub_download(spec.hub_repo, spec.hub_filename, local_files_only=True))
        except LocalEntryNotFoundError:
            return Path(hf_hub_download(spec.hub_repo, spec.hub_filename))
    except GatedRepoError as exc:
        raise ModelNotFound(
            f"{spec.title} weights are gated on the Hugging Face hub: accept the licence at "
            f"https://huggingface.co/{spec.hub_repo} and log in (`hf auth login`), "
            f"or put the file at {target}"
        ) from exc
    except Exception as exc:  # no network: OfflineModeIsEnabled, LocalEntryNotFoundError, connection errors
        raise OfflineError(
            f"{spec.title} weights not found: put {spec.hub_filename} from https://huggingface.co/{spec.hub_repo} "
            f"(gated: accept the licence there) at {target} "
            f"(a model.safetensors with the same tensors works too); the hub could not be reached "
            f"({type(exc).__name__})"
        ) from exc


def load_weights_into(spec: TimmSpec, path: Path, device: str | torch.device = "cpu", **overrides) -> torch.nn.Module:
    """Build ``spec`` on the meta device, validate ``path`` against it, and load it (strict)."""
    with torch.device("meta"):
        model = spec.build(**overrides)
    expected = expected_from_module(model)
    what = f"{path} (for {spec.title}, timm {spec.timm_name})"
    try:
        tensors, _ = load_state_dict(path, expected=expected, strict=True, error=UnsafeFile)
    except UnsafeFile as exc:
        # Re-raised with the encoder and the full path named: load_state_dict names the file only.
        raise UnsafeFile(f"{spec.title} weights refused: {path}: {str(exc).split(': ', 1)[-1]}") from exc
    tensors = {k: v.to(dtype=expected[k].dtype) for k, v in tensors.items()}
    try:
        model.load_state_dict(tensors, strict=True, assign=True)
    except RuntimeError as exc:  # cannot happen after validation; kept so a timm change is reported clearly
        raise UnsafeFile(f"{what}: {exc}") from exc
    leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftover:
        raise UnsafeFile(f"{what}: tensors left without weights: {leftover[:5]}")
    return model.to(device).eval()


class TimmEncoder(FrozenEncoder):
    """UNI2-h or UNI with its weights: resize 224 (shorter side), centre crop 224, ImageNet mean/std."""

    def __init__(self, spec: TimmSpec, model: torch.nn.Module, weights_hash: str, device: str | torch.device = "cpu"):
        self.spec = spec
        self.name = spec.name
        self.dim = int(model.num_features)
        self.weights_hash = weights_hash
        self.model = model
        self.device = torch.device(device)
        self.batch_size = 16  # a ViT-H/14 batch of 16 at 224 px needs about 1 GB of activations

    def _prepare(self, im: Image.Image) -> torch.Tensor:
        return normalise(resize_center_crop(im, self.spec.image_size), self.spec.mean, self.spec.std)


def load_timm_encoder(
    spec: TimmSpec,
    *,
    paths: Paths,
    device: str | torch.device = "cpu",
    weights: str | Path | None = None,
    allow_hub: bool = True,
    **overrides,
) -> TimmEncoder:
    if weights is not None:
        path = Path(weights)
        if not path.exists():
            raise ModelNotFound(f"{spec.title} weights: {path} does not exist")
    else:
        path = find_local(spec, paths)
        if path is None:
            if not allow_hub:
                raise OfflineError(
                    f"{spec.title} weights not found: put {spec.hub_filename} from https://huggingface.co/{spec.hub_repo} "
                    f"at {spec.local_dir(paths) / spec.hub_filename}"
                )
            path = fetch_from_hub(spec, paths)
    model = load_weights_into(spec, path, device, **overrides)
    return TimmEncoder(spec, model, sha256_file(path), device)
