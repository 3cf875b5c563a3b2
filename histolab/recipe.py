"""Recipes: everything needed to make one image again, and their PNG form.

A PNG carries its recipe twice: an SD-webui-style ``parameters`` text chunk
(so SD-webui, ComfyUI and image viewers show it) and a ``histolab`` JSON chunk
that is exact. Reading prefers the JSON; a PNG from SD-webui (text only) is
read too, as far as its fields go.
"""

from __future__ import annotations

import io
import json
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from PIL import Image, PngImagePlugin

from histolab.errors import InvalidRequest
from histolab.schedulers import A1111_NAMES, FROM_A1111

JSON_KEY = "histolab"
PARAMETERS_KEY = "parameters"
RECIPE_VERSION = 1


@dataclass(frozen=True)
class AdapterUse:
    """One adapter as used for an image: where it came from and how strongly."""

    name: str
    kind: str
    strength: float
    hash: str
    path: str = ""


@dataclass(frozen=True)
class Recipe:
    base_model: str
    base_hash: str
    prompt: str = ""
    negative_prompt: str = ""
    mode: str = "prompt"  # "prompt" or "reference"
    reference_hash: str = ""
    encoder: str = ""
    guidance_scale: float = 7.5
    steps: int = 50
    scheduler: str = "dpmpp_2m_karras"
    width: int = 64
    height: int = 64
    seed: int = 0
    adapters: tuple[AdapterUse, ...] = field(default_factory=tuple)
    # What the networks ran in (histolab.precision): bfloat16 pixels differ from float32's
    # by rounding, so a re-run loads the model in this dtype. "" in recipes made before it was kept.
    dtype: str = ""
    # Which kernels ran the U-Net: "" ATen's (eager or traced: the same bits), "inductor-aot" the
    # compiled U-Net (histolab.compiled_unet), whose pixels differ from ATen's by rounding.
    kernels: str = ""
    version: int = RECIPE_VERSION

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["adapters"] = [asdict(a) for a in self.adapters]
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Recipe:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise InvalidRequest(f"recipe has unknown fields: {sorted(unknown)}")
        d = dict(d)
        d["adapters"] = tuple(AdapterUse(**a) for a in d.get("adapters", ()))
        return cls(**d)

    def to_parameters(self) -> str:
        """The SD-webui ``parameters`` text: prompt, negative prompt, then key: value pairs."""
        lines = [self.prompt if self.mode == "prompt" else f"[reference patch {self.reference_hash[:10]}]"]
        if self.negative_prompt:
            lines.append(f"Negative prompt: {self.negative_prompt}")
        kv = [
            ("Steps", self.steps),
            ("Sampler", A1111_NAMES.get(self.scheduler, self.scheduler)),
            ("CFG scale", self.guidance_scale),
            ("Seed", self.seed),
            ("Size", f"{self.width}x{self.height}"),
            ("Model hash", self.base_hash[:10]),
            ("Model", self.base_model),
        ]
        if self.adapters:
            kv.append(("Adapters", '"' + ", ".join(f"{a.name}:{a.strength:g}" for a in self.adapters) + '"'))
            kv.append(("Adapter hashes", '"' + ", ".join(f"{a.name}: {a.hash[:10]}" for a in self.adapters) + '"'))
        if self.mode == "reference":
            kv.append(("Reference hash", self.reference_hash[:10]))
            kv.append(("Encoder", self.encoder))
        lines.append(", ".join(f"{k}: {v}" for k, v in kv))
        return "\n".join(lines)


def pnginfo(recipe: Recipe) -> PngImagePlugin.PngInfo:
    info = PngImagePlugin.PngInfo()
    info.add_itxt(PARAMETERS_KEY, recipe.to_parameters())
    info.add_itxt(JSON_KEY, recipe.to_json())
    return info


def save_png(image: Image.Image, recipe: Recipe, path: str | Path) -> Path:
    path = Path(path)
    image.save(path, format="PNG", pnginfo=pnginfo(recipe))
    return path


def png_bytes(image: Image.Image, recipe: Recipe) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=pnginfo(recipe))
    return buf.getvalue()


def read_recipe(source: str | Path | bytes | Image.Image) -> Recipe:
    """The recipe stored in a PNG (ours, or SD-webui's parameters text)."""
    if isinstance(source, Image.Image):
        text = dict(source.info)
    else:
        data = source if isinstance(source, bytes) else Path(source).read_bytes()
        try:
            with Image.open(io.BytesIO(data)) as im:
                if im.format != "PNG":
                    raise InvalidRequest(f"expected a PNG with a recipe, got a {im.format} image")
                text = dict(im.info)
        except (OSError, SyntaxError) as exc:
            raise InvalidRequest(f"not a readable image: {exc}") from exc
    if JSON_KEY in text:
        try:
            return Recipe.from_dict(json.loads(text[JSON_KEY]))
        except (json.JSONDecodeError, TypeError) as exc:
            raise InvalidRequest(f"the PNG's histolab recipe is damaged: {exc}") from exc
    if PARAMETERS_KEY in text:
        return parse_parameters(text[PARAMETERS_KEY])
    raise InvalidRequest("this PNG carries no recipe (no 'histolab' or 'parameters' text chunk)")


_KV = re.compile(r'\s*([\w ]+):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')


def parse_parameters(text: str) -> Recipe:
    """Read SD-webui's ``parameters`` text (prompt / Negative prompt / key: value line)."""
    lines = text.strip().split("\n")
    kv_line = lines[-1] if len(lines) > 1 and "Steps:" in lines[-1] else ""
    body = lines[:-1] if kv_line else lines
    prompt_lines, neg_lines, in_neg = [], [], False
    for ln in body:
        if ln.startswith("Negative prompt:"):
            in_neg = True
            ln = ln[len("Negative prompt:") :].strip()
        (neg_lines if in_neg else prompt_lines).append(ln)
    kv = {m.group(1).strip(): m.group(2).strip().strip('"') for m in _KV.finditer(kv_line)}
    try:
        w, h = (int(x) for x in kv.get("Size", "512x512").split("x"))
        return Recipe(
            base_model=kv.get("Model", ""),
            base_hash=kv.get("Model hash", ""),
            prompt="\n".join(prompt_lines).strip(),
            negative_prompt="\n".join(neg_lines).strip(),
            guidance_scale=float(kv.get("CFG scale", 7.0)),
            steps=int(kv.get("Steps", 20)),
            scheduler=FROM_A1111.get(kv.get("Sampler", ""), "dpmpp_2m_karras"),
            width=w,
            height=h,
            seed=int(kv.get("Seed", 0)),
        )
    except ValueError as exc:
        raise InvalidRequest(f"cannot read the PNG's parameters text: {exc}") from exc
