"""Training configurations: one dataclass per method over a shared base.

Every field has a default with the reason beside it; the presets
(``histolab.training.presets``) set the papers' values with theirs.
``check()`` rejects an invalid value before any work starts, naming the field
and the value, the way diffusers' ``check_inputs`` does.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar

from histolab.errors import InvalidRequest

METHODS = ("lora", "dreambooth", "textual_inversion", "hypernetwork", "projector")
METHOD_ALIASES = {
    "ti": "textual_inversion",
    "textual-inversion": "textual_inversion",
    "embedding": "textual_inversion",
    "hn": "hypernetwork",
    "hypernet": "hypernetwork",
    "db": "dreambooth",
    "foundation": "projector",
    "foundation-embedding": "projector",
    "reference": "projector",
}
LR_SCHEDULES = ("constant", "cosine", "linear")
PRECISIONS = ("no", "fp16", "bf16", "auto")
AUGMENTS = ("none", "flip", "dihedral")
VALIDATIONS = ("fid", "none")
OPTIMIZERS = ("adamw", "adamw8bit", "adam")
HOLDOUTS = ("val", "none")
CAPTIONS = ("class", "image")


def canonical_method(name: str) -> str:
    key = str(name).strip().lower().replace(" ", "_")
    key = METHOD_ALIASES.get(key, key)
    if key not in METHODS:
        raise InvalidRequest(f"unknown training method {name!r}: choose one of {', '.join(METHODS)}")
    return key


@dataclass
class TrainConfig:
    """What every method shares: run length, optimiser, precision, data, checkpoints, samples, validation."""

    prompt_fields: ClassVar[tuple[str, ...]] = ("label",)  # what prompt_template may name

    method: str = ""
    # --- run length
    epochs: int = 10  # passes over the (repeated) training set; most few-hundred-image fine-tunes converge in 5-20
    max_steps: int | None = None  # if set, the run length in optimiser steps (overrides epochs, as diffusers does)
    repeats: int = 1  # each image appears this often per epoch (kohya-ss's "repeats"); 1 = a plain epoch
    batch_size: int = 8  # images per optimiser step per device, before accumulation
    grad_accum: int = 1  # micro-batches per optimiser step; effective batch = batch_size * grad_accum * devices
    # --- optimiser (AdamW)
    lr: float = 1e-4  # the main parameter group's learning rate (diffusers' LoRA example default)
    weight_decay: float = 1e-2  # AdamW's usual decoupled decay (torch and diffusers default)
    betas: tuple[float, float] = (0.9, 0.999)  # Adam's defaults (Kingma & Ba 2015)
    eps: float = 1e-8  # Adam's default
    optimizer: str = "adamw"  # adamw (torch), adamw8bit (bitsandbytes' 8-bit AdamW, GPU only), adam (no decoupled
    # decay: weight_decay is then L2 in the gradient, as torch.optim.Adam does)
    max_grad_norm: float = 1.0  # gradient clipping as in diffusers' training examples; 0 turns it off
    lr_schedule: str = "constant"  # after warm-up: constant, cosine (to 0) or linear (to 0)
    warmup_ratio: float = 0.0  # linear warm-up over this share of all steps
    warmup_epochs: float = 0.0  # or over this many epochs (the larger of the two wins)
    # --- precision and memory
    # "fp16"/"bf16" autocast; "auto": bf16 on GPUs that support it (else fp16) and on CPUs with avx512_bf16/AMX
    # (else fp32). On a CPU without those, and for fp16 on any CPU, the run falls back to fp32 (and says so).
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False  # recompute U-Net activations in backward: less memory, about 30% slower
    # --- data
    resolution: int | None = None  # training size in pixels; None = the base model's native size
    augment: str = "flip"  # none / flip / dihedral (8 rotations and flips: tissue has no up or left)
    prompt_template: str = "{label}_tissue"  # class-label prompts as in the 2025 comparison ("adenocarcinoma_tissue")
    caption_dropout: float = 0.0  # share of samples trained with the empty prompt (none in the papers' recipes)
    latent_sampling: str = "sample"  # "sample" from the VAE posterior each step (as diffusers does) or its "mode"
    label_names: str = ""  # names for a JSON index's integer labels: "chaoyang" or "name0,name1,..." in label order
    min_images_per_class: int = 5  # fewer usable images than this in a class stops the run before it starts
    max_images_per_class: int | None = None  # a seeded subset per class; None = every image
    only_classes: str = ""  # comma-separated class names to train on (one model per class); "" = every class
    holdout: str = "val"  # "val": a dataset without a validation split gets a seeded 10% one; "none": every
    # image trains (as a paper that holds nothing out) and there is no per-epoch validation
    captions: str = "class"  # "class": prompt_template of the class label; "image": each image's own caption
    # from the dataset's caption column (CSV/JSON), truncated to the text encoder's 77 tokens
    # --- checkpoints, samples and validation
    samples_per_class: int = 4  # fixed-seed sample images per class, saved with every epoch's checkpoint
    sample_steps: int = 25  # sampler steps for samples and validation images
    sample_guidance: float = 7.5  # classifier-free guidance for samples (SD 1.5's usual)
    sample_scheduler: str = "ddim"  # deterministic given the seed
    validation: str = "fid"  # per-epoch FID on the validation split (histolab.evaluation), or "none"
    val_images_per_class: int = 32  # generated per class for validation FID
    val_reference_images: int = 1000  # at most this many validation images (a seeded stratified subset) as the
    # FID reference: its features are computed once, and beyond ~1000 the reference's own noise is small
    validate_every: int = 1  # epochs between validations
    val_per_image: bool = False  # reference mode: one generation per validation image (the 2026 protocol)
    # instead of val_images_per_class seeded picks per class
    select_best: bool = True  # at the end, the run's folder holds the epoch with the best validation FID
    save_state_every: int = 0  # also save the resume state every N steps inside an epoch (0: at epoch ends only)
    keep_epochs: int = 0  # per-epoch adapter folders to keep (the newest and the best are always kept); 0 = all
    seed: int = 0  # data order, noise, timesteps, dropout and initialisation all derive from it

    # ------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d

    def replace(self, **changes) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    def check(self) -> TrainConfig:
        """Raise InvalidRequest naming the first invalid field; return self."""
        _check_types(self)
        _positive_int(self, "epochs", "repeats", "batch_size", "grad_accum", "min_images_per_class", "validate_every")
        _positive_int(self, "sample_steps", "val_reference_images")
        if self.max_steps is not None:
            _positive_int(self, "max_steps")
        if self.max_images_per_class is not None:
            _positive_int(self, "max_images_per_class")
            if self.max_images_per_class < self.min_images_per_class:
                raise InvalidRequest(
                    f"`max_images_per_class` ({self.max_images_per_class}) is below "
                    f"`min_images_per_class` ({self.min_images_per_class})"
                )
        for name in ("samples_per_class", "val_images_per_class", "save_state_every", "keep_epochs", "seed"):
            v = getattr(self, name)
            if v < 0:
                raise InvalidRequest(f"`{name}` must be >= 0 but is {v!r}")
        _positive_float(self, "lr", "eps")
        _range(self, "weight_decay", 0.0, 10.0)
        _range(self, "max_grad_norm", 0.0, 1e6)
        _range(self, "warmup_ratio", 0.0, 1.0, high_open=True)
        _range(self, "warmup_epochs", 0.0, 1e6)
        _range(self, "caption_dropout", 0.0, 1.0, high_open=True)
        _range(self, "sample_guidance", 0.0, 50.0)
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise InvalidRequest(f"`betas` must be two numbers in [0, 1) but is {list(self.betas)!r}")
        _choice(self, "lr_schedule", LR_SCHEDULES)
        _choice(self, "mixed_precision", PRECISIONS)
        _choice(self, "augment", AUGMENTS)
        _choice(self, "latent_sampling", ("sample", "mode"))
        _choice(self, "validation", VALIDATIONS)
        _choice(self, "optimizer", OPTIMIZERS)
        _choice(self, "holdout", HOLDOUTS)
        _choice(self, "captions", CAPTIONS)
        if self.holdout == "none" and self.validation != "none":
            raise InvalidRequest(
                "`holdout` none trains on every image, so there is nothing to validate on: set validation=none"
            )
        from histolab.schedulers import SCHEDULER_NAMES

        _choice(self, "sample_scheduler", SCHEDULER_NAMES)
        if self.resolution is not None and (self.resolution < 8 or self.resolution % 8):
            raise InvalidRequest(f"`resolution` must be a multiple of 8, at least 8, but is {self.resolution!r}")
        self._check_template("prompt_template", self.prompt_template, self.prompt_fields)
        return self

    def _check_template(self, name: str, template: str, allowed: tuple[str, ...]) -> None:
        import string

        try:
            fields_ = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
        except ValueError as exc:
            raise InvalidRequest(f"`{name}` {template!r} is not a valid template: {exc}") from None
        bad = [f for f in fields_ if f not in allowed]
        if bad:
            raise InvalidRequest(
                f"`{name}` {template!r} uses {{{bad[0]}}}; it may use only {', '.join('{' + a + '}' for a in allowed)}"
            )


@dataclass
class LoraTrainConfig(TrainConfig):
    method: str = "lora"
    rank: int = 8  # low-rank dimension; 4-16 is the usual range for SD 1.5 fine-tunes
    alpha: float | None = None  # None = rank: update scale alpha / rank = 1
    target: str = "attention"  # "attention": to_q/k/v/out of every attention layer (diffusers' LoRA example);
    # "transformer": every Linear and 1x1 conv in the transformer blocks (kohya-ss sd-scripts' default set)
    cross_attention_only: bool = False  # LoRA on the cross-attention (attn2) layers only, as the chest X-ray study
    train_text_encoder: bool = False  # LoRA on the text encoder's attention and MLP too
    text_encoder_lr: float | None = None  # None = lr
    text_encoder_rank: int | None = None  # None = rank
    lora_init: str = "kaiming"  # down-projection init: "kaiming" uniform (peft's default) or "gaussian"
    # N(0, 1/rank) (peft's init_lora_weights="gaussian"); up starts at zero either way

    def check(self) -> LoraTrainConfig:
        super().check()
        _positive_int(self, "rank")
        if self.text_encoder_rank is not None:
            _positive_int(self, "text_encoder_rank")
        if self.alpha is not None:
            _positive_float(self, "alpha")
        if self.text_encoder_lr is not None:
            _positive_float(self, "text_encoder_lr")
        _choice(self, "target", ("attention", "transformer"))
        _choice(self, "lora_init", ("kaiming", "gaussian"))
        return self


@dataclass
class DreamBoothTrainConfig(TrainConfig):
    method: str = "dreambooth"
    lr: float = 5e-6  # diffusers' train_dreambooth default: full fine-tunes need a small lr
    train_text_encoder: bool = True  # Ruiz et al. 2023 tune the text encoder too (better identifier binding)
    text_encoder_lr: float | None = None  # None = lr (diffusers' DreamBooth script uses one lr for both)
    prior_preservation: bool = True  # class-prior loss against language drift and overfitting (Ruiz et al. 2023)
    prior_loss_weight: float = 1.0  # Ruiz et al. 2023 / diffusers default
    num_class_images: int = 100  # diffusers' default number of generated class images
    class_prompt: str = "a histology image"  # the class noun the instances belong to, which the base already knows
    class_image_steps: int = 25  # sampler steps for the class images, generated once before training
    save_dtype: str = "float16"  # the saved U-Net (and text encoder): fp16 halves the size, as SD checkpoints ship

    def check(self) -> DreamBoothTrainConfig:
        super().check()
        if self.text_encoder_lr is not None:
            _positive_float(self, "text_encoder_lr")
        _range(self, "prior_loss_weight", 0.0, 100.0)
        _positive_int(self, "num_class_images", "class_image_steps")
        if not self.class_prompt.strip() and self.prior_preservation:
            raise InvalidRequest("`class_prompt` is empty; prior preservation needs the class's prompt")
        _choice(self, "save_dtype", ("float16", "bfloat16", "float32"))
        return self


@dataclass
class TextualInversionTrainConfig(TrainConfig):
    prompt_fields: ClassVar[tuple[str, ...]] = ("label", "token")

    method: str = "textual_inversion"
    lr: float = 5e-4  # diffusers' textual_inversion default
    weight_decay: float = 0.0  # decay would pull the vectors toward 0, away from real token embeddings' norm
    n_vectors: int = 1  # vectors per token (SD-webui's default); more capture more, and cost prompt length
    init_text: str = "tissue"  # start each token from this word's embedding (Gal et al. 2023 start from a coarse word)
    token_template: str = "<{label}>"  # one new token per class; angle brackets keep it out of the vocabulary
    prompt_template: str = "{token}"  # the new token alone, as the class-label prompt

    def check(self) -> TextualInversionTrainConfig:
        super().check()
        _positive_int(self, "n_vectors")
        if self.n_vectors > 16:
            raise InvalidRequest(f"`n_vectors` must be at most 16 but is {self.n_vectors}")
        if not self.init_text.strip():
            raise InvalidRequest("`init_text` is empty; give a word to start the new tokens from, e.g. 'tissue'")
        self._check_template("token_template", self.token_template, ("label",))
        if "{label}" not in self.token_template:
            raise InvalidRequest(
                f"`token_template` {self.token_template!r} must contain {{label}}: one token per class"
            )
        if "{token}" not in self.prompt_template:
            raise InvalidRequest(f"`prompt_template` {self.prompt_template!r} must contain {{token}}")
        return self


@dataclass
class HypernetworkTrainConfig(TrainConfig):
    method: str = "hypernetwork"
    lr: float = 5e-6  # SD-webui's default hypernetwork learning rate
    weight_decay: float = 1e-2  # torch AdamW's default, which SD-webui's optimiser keeps
    layer_structure: list[float] = field(default_factory=lambda: [1.0, 2.0, 1.0])  # SD-webui's default
    activation_func: str = "linear"  # SD-webui's default: no activation
    add_layer_norm: bool = False  # SD-webui's default
    dropout_structure: list[float] | None = None  # per layer; None = no dropout (SD-webui's default)
    weight_init: str = "Normal"  # SD-webui's default: N(0, 0.01) weights, zero biases
    activate_output: bool = False  # SD-webui's default when creating a hypernetwork
    sizes: str = "all"  # "all" attention context widths (SD-webui's default modules 768/320/640/1280 on SD 1.5)
    # or "cross" (the text-token width only)
    export_sdwebui: bool = True  # also write SD-webui's .pt layout beside our safetensors, so SD-webui loads it

    def check(self) -> HypernetworkTrainConfig:
        super().check()
        ls = self.layer_structure
        if not (isinstance(ls, list) and len(ls) >= 2 and all(isinstance(x, int | float) and x > 0 for x in ls)):
            raise InvalidRequest(f"`layer_structure` must be a list of positive numbers but is {ls!r}")
        if ls[0] != 1 or ls[-1] != 1:
            raise InvalidRequest(f"`layer_structure` must start and end with 1 but is {ls!r}")
        # The list of activations comes from torch; "linear" (the default and every preset's) needs no
        # import, which keeps the app's page build free of torch (histolab.ui.train lists the presets).
        if self.activation_func != "linear" and self.activation_func not in _activations():
            raise InvalidRequest(
                f"`activation_func` {self.activation_func!r} is not one SD-webui knows (e.g. linear, relu, swish)"
            )
        ds = self.dropout_structure
        if ds is not None and not (isinstance(ds, list) and len(ds) == len(ls) and all(0 <= x < 1 for x in ds)):
            raise InvalidRequest(
                f"`dropout_structure` {ds!r} must have one value in [0, 1) per layer_structure entry ({len(ls)})"
            )
        if ds is not None and (ds[0] != 0 or ds[-1] != 0):
            raise InvalidRequest(f"`dropout_structure` {ds!r} must start and end with 0, as SD-webui requires")
        _choice(self, "weight_init", ("Normal", "XavierUniform", "XavierNormal", "KaimingUniform", "KaimingNormal"))
        _choice(self, "sizes", ("all", "cross"))
        return self


@dataclass
class ProjectorTrainConfig(TrainConfig):
    """The foundation-embedding adapter (Kuzmin & Berezsky 2026, Algorithm 1)."""

    method: str = "projector"
    encoder: str = "uni2-h"  # the pathology foundation encoder whose embedding conditions generation
    n_tokens: int = 4  # conditioning tokens made from one embedding
    depth: int = 2  # linear layers of the projector MLP
    hidden: int = 1024  # its hidden width
    rank: int = 8  # LoRA rank on Q/K/V/O of every attention layer
    alpha: float | None = None  # None = rank (scale 1)
    lr: float = 5e-5  # the LoRA group's learning rate
    weight_decay: float = 1e-3  # the LoRA group's weight decay
    projector_lr: float = 5e-4  # projector + null embedding group (10x the LoRA lr)
    projector_weight_decay: float = 1e-4  # projector + null embedding group
    cond_dropout: float = 0.1  # per sample, the embedding is replaced by the learned null embedding (for CFG)
    projector_dropout: float = 0.05  # dropout after the projector's hidden activations
    null_init_std: float = 0.01  # the null embedding starts as N(0, null_init_std^2) (2026 paper: small random)
    lr_schedule: str = "cosine"  # cosine decay after warm-up
    warmup_epochs: float = 1.0  # about one epoch of linear warm-up
    prompt_template: str = "{label}"  # unused for conditioning (the embedding is the condition); names the class
    sample_guidance: float = 1.3  # reference mode needs far less guidance than text prompts
    encoder_batch_size: int = 32  # images per encoder call while caching embeddings

    def check(self) -> ProjectorTrainConfig:
        super().check()
        if not self.encoder.strip():
            raise InvalidRequest("`encoder` is empty; name an image encoder, e.g. 'uni2-h' or 'embedded'")
        _positive_int(self, "n_tokens", "depth", "hidden", "rank", "encoder_batch_size")
        if self.n_tokens > 75:
            raise InvalidRequest(f"`n_tokens` must be at most 75 but is {self.n_tokens}")
        if self.alpha is not None:
            _positive_float(self, "alpha")
        _positive_float(self, "projector_lr")
        _range(self, "projector_weight_decay", 0.0, 10.0)
        _range(self, "cond_dropout", 0.0, 1.0, high_open=True)
        _range(self, "projector_dropout", 0.0, 1.0, high_open=True)
        _range(self, "null_init_std", 0.0, 10.0)
        return self


CONFIG_CLASSES: dict[str, type[TrainConfig]] = {
    "lora": LoraTrainConfig,
    "dreambooth": DreamBoothTrainConfig,
    "textual_inversion": TextualInversionTrainConfig,
    "hypernetwork": HypernetworkTrainConfig,
    "projector": ProjectorTrainConfig,
}


def config_class(method: str) -> type[TrainConfig]:
    return CONFIG_CLASSES[canonical_method(method)]


def config_from_dict(d: dict[str, Any]) -> TrainConfig:
    """A config from its ``to_dict()`` form (e.g. a saved training state); unknown fields are an error."""
    if not isinstance(d, dict) or "method" not in d:
        raise InvalidRequest("a training config must be a JSON object with a `method`")
    cls = config_class(d["method"])
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise InvalidRequest(f"unknown {cls.__name__} fields {unknown}")
    values = dict(d)
    values["method"] = canonical_method(d["method"])
    if "betas" in values:
        values["betas"] = tuple(values["betas"])
    return cls(**values)


def with_overrides(cfg: TrainConfig, overrides: dict[str, Any]) -> TrainConfig:
    """``cfg`` with fields replaced; text values (from ``--set k=v``) are parsed by the field's type."""
    if not overrides:
        return cfg
    hints = typing.get_type_hints(type(cfg))
    known = {f.name for f in dataclasses.fields(cfg)}
    changes = {}
    for key, value in overrides.items():
        name = key.strip().replace("-", "_")
        if name == "method":
            raise InvalidRequest("`method` cannot be overridden; choose it with --method")
        if name not in known:
            close = _close_names(name, known)
            raise InvalidRequest(
                f"unknown setting {key!r} for {cfg.method}" + (f" (did you mean {close}?)" if close else "")
            )
        changes[name] = parse_value(name, value, hints[name]) if isinstance(value, str) else value
    return dataclasses.replace(cfg, **changes)


def parse_value(name: str, text: str, hint) -> Any:
    """Text to a field's type: ints, floats, bools, None, lists and tuples (JSON or comma-separated)."""
    t = text.strip()
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if t.lower() in ("none", "null", "") and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return parse_value(name, t, inner[0])
    try:
        if hint is bool:
            if t.lower() in ("1", "true", "yes", "on"):
                return True
            if t.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError("expected true or false")
        if hint is int:
            v = float(t)
            if not v.is_integer():
                raise ValueError("expected an integer")
            return int(v)
        if hint is float:
            return float(t)
        if hint is str:
            return text
        if origin in (list, tuple):
            items = json.loads(t) if t.startswith("[") else [x for x in t.split(",") if x.strip()]
            elem = args[0] if args else float
            parsed = [parse_value(name, str(x), elem) for x in items]
            return tuple(parsed) if origin is tuple else parsed
    except (ValueError, json.JSONDecodeError) as exc:
        raise InvalidRequest(f"`{name}`: cannot read {text!r} as {_type_name(hint)} ({exc})") from None
    return text


def _type_name(hint) -> str:
    return getattr(hint, "__name__", str(hint))


def _close_names(name: str, known: set[str]) -> str:
    import difflib

    return ", ".join(difflib.get_close_matches(name, sorted(known), n=3))


# ------------------------------------------------------------------ checks


def _check_types(cfg: TrainConfig) -> None:
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if not _is_instance(v, hints[f.name]):
            raise InvalidRequest(f"`{f.name}` must be {_type_name(hints[f.name])} but is {v!r}")


def _is_instance(v, hint) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_is_instance(v, a) for a in args)
    if hint is type(None):
        return v is None
    if hint is float:
        return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
    if hint is int:
        return isinstance(v, int) and not isinstance(v, bool)
    if origin in (list, tuple):
        return isinstance(v, list | tuple) and all(_is_instance(x, args[0]) for x in v) if args else True
    return isinstance(v, hint)


def _positive_int(cfg, *names: str) -> None:
    for name in names:
        v = getattr(cfg, name)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise InvalidRequest(f"`{name}` must be a positive integer but is {v!r}")


def _positive_float(cfg, *names: str) -> None:
    for name in names:
        v = getattr(cfg, name)
        if not (isinstance(v, int | float) and math.isfinite(v) and v > 0):
            raise InvalidRequest(f"`{name}` must be a positive number but is {v!r}")


def _range(cfg, name: str, low: float, high: float, high_open: bool = False) -> None:
    v = getattr(cfg, name)
    ok = isinstance(v, int | float) and math.isfinite(v) and low <= v and (v < high if high_open else v <= high)
    if not ok:
        raise InvalidRequest(f"`{name}` must be in [{low}, {high}{')' if high_open else ']'} but is {v!r}")


def _choice(cfg, name: str, options) -> None:
    v = getattr(cfg, name)
    if v not in options:
        raise InvalidRequest(f"`{name}` must be one of {', '.join(map(str, options))} but is {v!r}")


def _activations() -> dict:
    from histolab.adapters.hypernetwork import ACTIVATIONS

    return ACTIVATIONS
