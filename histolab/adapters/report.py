"""What loading an adapter file did to the model: the contract every adapter kind reports in.

A file from another tool may name modules this base lacks or carry keys no
kind understands; the user must see that, never have it dropped silently.
Each payload class (``lora.LoraWeights``, ``textual_inversion.*``,
``hypernetwork.*``, ``dreambooth.DreamBooth``) offers
``load_report(model) -> LoadReport`` computed against the model it is applied
to; the runtime collects one per file.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class LoadReport:
    name: str  # the adapter's display name
    format: str  # detected format, e.g. "kohya LoRA (LDM block names)", "SD-webui embedding (.pt)"
    unet_modules: int = 0  # U-Net modules patched (layers with a delta, hooked attentions, replaced weights)
    text_encoder_modules: int = 0  # text-encoder modules patched
    tokens: tuple[str, ...] = ()  # tokens added to the tokenizer (textual inversion)
    ignored: list[str] = field(default_factory=list)  # keys read but not applied, each listed
    notes: list[str] = field(default_factory=list)  # anything else worth saying (e.g. "EMA weights used")

    def summary(self) -> str:
        parts = [f"{self.name}: {self.format}"]
        if self.unet_modules or self.text_encoder_modules:
            parts.append(f"U-Net {self.unet_modules} modules, text encoder {self.text_encoder_modules}")
        if self.tokens:
            parts.append("tokens " + ", ".join(self.tokens))
        if self.ignored:
            shown = ", ".join(self.ignored[:5]) + (
                f" and {len(self.ignored) - 5} more" if len(self.ignored) > 5 else ""
            )
            parts.append(f"ignored {len(self.ignored)} keys: {shown}")
        parts.extend(self.notes)
        return "; ".join(parts)
