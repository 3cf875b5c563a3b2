"""Adapter switching and reference-patch generation, each against its reference in the same run.

1. Switching adapters: the time to load an adapter file (cold: parsed from disk;
   warm: already in the content-hash cache), apply it and remove it again,
   against reloading the whole base pipeline from its folder (what a tool
   without unloadable adapters does to change models).
2. Reference-patch generation: one image from a reference patch with a cold
   embedding cache (the encoder runs) and a warm one (the same patch again).

Random weights of a given architecture time the same as trained ones, so the
base model is the embedded architecture with seeded random weights, and the
encoder is UNI2-h's architecture (timm ViT-H/14, 1536-d, the published
arguments) with random weights unless --encoder names a registry encoder.

    python bench/adapters.py [--arch embedded] [--repeats 5] [--steps 20] [--encoder uni2-h-arch]
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time
from collections import OrderedDict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import histolab  # noqa: F401  (torchvision shim before timm/diffusers)


def timed(fn, repeats: int) -> float:
    """Median wall time of ``fn()`` in seconds."""
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return statistics.median(out)


class TimmEncoder:
    """An ImageEncoder over a timm ViT with random weights (timing only)."""

    def __init__(self, name: str, model, size: int, dim: int):
        import torch

        self.name, self.model, self.size, self.dim = name, model.eval(), size, dim
        self.weights_hash = "random-" + name
        self._torch = torch

    def transform(self, images):
        import numpy as np

        mean = np.array([0.485, 0.456, 0.406], dtype=np.float32)
        std = np.array([0.229, 0.224, 0.225], dtype=np.float32)
        arrs = [
            (np.asarray(im.convert("RGB").resize((self.size, self.size)), dtype=np.float32) / 255 - mean) / std
            for im in images
        ]
        return self._torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2)

    def encode(self, images):
        with self._torch.inference_mode():
            return self.model(self.transform(images)).float()


def uni2h_architecture():
    """UNI2-h's timm arguments (MahmoodLab/UNI2-h model card) with random weights."""
    from histolab.encoders.uni import UNI2_H

    model = UNI2_H.build()
    return TimmEncoder("uni2-h-arch", model, 224, 1536)


def make_encoder(name: str):
    if name == "uni2-h-arch":
        return uni2h_architecture()
    from histolab.encoders import get_encoder

    return get_encoder(name)


def build_adapters(model, folder: Path, encoder_dim: int, encoder_name: str) -> dict[str, Path]:
    """One adapter of each kind, at realistic sizes for the architecture."""
    import torch
    from safetensors.torch import save_file

    from histolab.adapters import projector as pj
    from histolab.adapters.kohya import kohya_name
    from histolab.adapters.manifest import Manifest, base_info, write_manifest

    g = torch.Generator().manual_seed(0)
    out = {}
    # LoRA, kohya layout, rank 16 on every attention/feed-forward/proj layer and the text encoder (a typical SD LoRA).
    sd = {}
    for root, prefix in ((model.unet, "lora_unet_"), (model.text_encoder, "lora_te_")):
        for name, mod in root.named_modules():
            if isinstance(mod, torch.nn.Linear) and ("attentions" in name or ".layers." in name):
                k = kohya_name(prefix, name)
                sd[f"{k}.lora_down.weight"] = torch.randn(16, mod.in_features, generator=g).half() * 0.01
                sd[f"{k}.lora_up.weight"] = torch.randn(mod.out_features, 16, generator=g).half() * 0.01
                sd[f"{k}.alpha"] = torch.tensor(8.0)
    save_file(sd, str(folder / "lora.safetensors"))
    out["LoRA (kohya, rank 16)"] = folder / "lora.safetensors"
    # Textual inversion, SD-webui .pt with 4 vectors.
    width = model.text_encoder.get_input_embeddings().embedding_dim
    torch.save({"string_to_param": {"*": torch.randn(4, width, generator=g)}, "name": "tiemb"}, folder / "tiemb.pt")
    out["textual inversion (SD-webui .pt)"] = folder / "tiemb.pt"
    # Hypernetwork, SD-webui .pt, [1, 2, 1] for every attention width of the base.
    widths = sorted(
        {
            int(model.unet.get_submodule(p.removesuffix(".processor")).cross_attention_dim)
            for p in model.unet.attn_processors
        }
    )
    hn = {"layer_structure": [1, 2, 1], "activation_func": "relu", "is_layer_norm": False, "activate_output": False}
    for w in widths:
        mk = lambda w=w: OrderedDict(  # noqa: E731
            [
                ("linear.0.weight", torch.randn(2 * w, w, generator=g) * 0.01),
                ("linear.0.bias", torch.zeros(2 * w)),
                ("linear.2.weight", torch.randn(w, 2 * w, generator=g) * 0.01),
                ("linear.2.bias", torch.zeros(w)),
            ]
        )
        hn[w] = (mk(), mk())
    torch.save(hn, folder / "hn.pt")
    out["hypernetwork (SD-webui .pt)"] = folder / "hn.pt"
    # DreamBooth: fine-tuned U-Net + text encoder folder (fp16, as the embedded base is stored).
    db = folder / "dreambooth"
    copy.deepcopy(model.unet).half().save_pretrained(db / "unet")
    copy.deepcopy(model.text_encoder).half().save_pretrained(db / "text_encoder")
    write_manifest(db, Manifest(kind="dreambooth", name="dreambooth", base=base_info(model)))
    out["DreamBooth (U-Net + text encoder)"] = db
    # Foundation-embedding adapter: 1536 -> 1024 -> 4 tokens, LoRA rank 8 on every attention projection.
    cfg = pj.ProjectorConfig(encoder_dim=encoder_dim, cross_attention_dim=model.cross_attention_dim, rank=8, alpha=8.0)
    layers = []
    for path in pj.attention_lora_modules(model.unet):
        mod = model.unet.get_submodule(path)
        layers.append((path, torch.randn(8, mod.in_features, generator=g) * 0.01, torch.zeros(mod.out_features, 8)))
    enc = {"name": encoder_name, "weights_hash": "", "dim": encoder_dim}
    pj.save(
        folder / "projector",
        pj.Projector(cfg),
        torch.randn(encoder_dim, generator=g),
        layers,
        enc,
        Manifest(kind="projector"),
    )
    out["projector (1536->4 tokens + LoRA r8)"] = folder / "projector"
    return out


def main(argv=None) -> int:
    import torch

    from histolab.adapters.runtime import AdapterRuntime, default_runtime
    from histolab.data.bundled import crops, load_crop
    from histolab.embedded.random_init import random_base
    from histolab.generation import AdapterSpec, GenerationRequest, generate
    from histolab.pipeline import load_base

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="embedded", help="base architecture with random weights (embedded, tiny, sd15)")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats per figure (the median is printed)")
    p.add_argument("--steps", type=int, default=20, help="denoising steps for reference-patch generation")
    p.add_argument("--encoder", default="uni2-h-arch", help="uni2-h-arch (random UNI2-h weights) or a registry name")
    args = p.parse_args(argv)
    import diffusers
    import huggingface_hub
    import transformers

    for lib in (diffusers, transformers):
        lib.utils.logging.disable_progress_bar()
    huggingface_hub.utils.disable_progress_bars()

    torch.manual_seed(0)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; base: random {args.arch}; encoder: {args.encoder}"
    )
    load = os.getloadavg()[0]
    print(f"load average at start: {load:.1f} on {os.cpu_count()} CPUs (other work on the machine slows both sides)")
    model = random_base(args.arch, seed=0)
    encoder = make_encoder(args.encoder)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # the reference: the whole pipeline saved as a diffusers folder (fp16 weights, as the embedded base ships)
        pipe = tmp / "pipeline"
        for name in ("unet", "vae", "text_encoder"):
            copy.deepcopy(getattr(model, name)).half().save_pretrained(pipe / name)
        model.tokenizer.save_pretrained(pipe / "tokenizer")
        (pipe / "model_index.json").write_text("{}")
        load_base(pipe)  # once, so that file hashes are cached and the OS has the files in memory
        reload_s = timed(lambda: load_base(pipe), args.repeats)
        print(f"\n1. Switching adapters vs reloading the pipeline ({args.repeats} repeats, median)")
        print(f"   reload the whole pipeline (load_base of a diffusers folder): {reload_s * 1e3:9.1f} ms   (reference)")
        print(
            f"   {'adapter':38s} {'cold: load+apply+unload':>24s} {'ratio':>8s}   {'warm: apply+unload':>19s} {'ratio':>8s}"
        )
        adapters = build_adapters(model, tmp, encoder.dim, encoder.name)
        for label, path in adapters.items():
            spec = [AdapterSpec(str(path), 1.0)]

            def cold(spec=spec):
                with AdapterRuntime().applied(model, spec):
                    pass

            rt = AdapterRuntime()
            with rt.applied(model, spec):
                pass

            def warm(spec=spec, rt=rt):
                with rt.applied(model, spec):
                    pass

            c, w = timed(cold, args.repeats), timed(warm, args.repeats)
            print(f"   {label:38s} {c * 1e3:21.1f} ms {reload_s / c:7.1f}x   {w * 1e3:16.2f} ms {reload_s / w:7.0f}x")

        print(
            f"\n2. Reference-patch generation, {args.steps} steps, guidance 1.3, {model.default_size} px ({max(1, args.repeats // 2)} repeats, median)"
        )
        rt = default_runtime()  # the one the engine uses
        rt.register_encoder(encoder, device=str(model.device))
        patches = [load_crop(c) for c in crops("test")[: max(1, args.repeats // 2) * 2]]
        spec = (AdapterSpec(str(adapters["projector (1536->4 tokens + LoRA r8)"]), 1.0),)
        req = dict(mode="reference", steps=args.steps, guidance_scale=1.3, seed=0, adapters=spec)

        def gen(patch):
            generate(model, GenerationRequest(reference=patch, **req))

        gen(patches[-1])  # warm up the projector load and the U-Net
        it = iter(patches)
        cold_s = timed(lambda: gen(next(it)), max(1, args.repeats // 2))  # a new patch each time: the encoder runs
        warm_s = timed(lambda: gen(patches[0]), max(1, args.repeats // 2))  # patches[0] was encoded above
        t_enc = timed(lambda: encoder.encode([patches[0]]), max(1, args.repeats // 2))
        print(f"   cold embedding cache (encode + generate): {cold_s * 1e3:9.1f} ms   (reference)")
        print(f"   warm embedding cache (generate only):     {warm_s * 1e3:9.1f} ms   {cold_s / warm_s:5.2f}x faster")
        print(f"   the encoder alone, one patch:             {t_enc * 1e3:9.1f} ms")
        print(f"   encoder calls: {rt.embeddings.misses} misses, {rt.embeddings.hits} hits")
    print(f"\nload average at end: {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
