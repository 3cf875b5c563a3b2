"""Live previews: cheap pictures of the latents part-way through denoising (SD-webui's live preview).

Two ways, chosen by size:

* small images (a latent side of at most ``VAE_MAX_LATENT``, e.g. the embedded
  default's 8 x 8 latents for 64 px): the model's own VAE decodes them; at that
  size it costs about as much as one U-Net step and shows what the end result
  will look like;
* larger images (SD 1.5's 64 x 64 latents): a per-pixel linear map from the
  latent channels to RGB (SD-webui's "Approx cheap"), shown at latent
  resolution. SD-webui hard-codes SD 1.5's coefficients; here they are fitted
  once per model by least squares on images the model's own VAE encodes, so
  they fit any VAE (the embedded default's included).
"""

from __future__ import annotations

import threading
import weakref

from PIL import Image

VAE_MAX_LATENT = 16  # latents up to 16 x 16 (128 px images) are decoded by the VAE itself
_FIT_IMAGES = 32  # smooth random colour fields: enough to pin 5 x 3 coefficients
_FIT_SIDE = 64  # pixels; the map is per pixel, so small images fit it as well as big ones
_MAPS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


def latent_rgb_map(model):
    """(5, 3) float32 tensor: RGB in [-1, 1] = [latent channels, 1] @ map, fitted to ``model``'s VAE."""
    import torch

    with _LOCK:
        hit = _MAPS.get(model.vae)  # keyed by the VAE: what the map is fitted to
    if hit is not None:
        return hit
    g = torch.Generator().manual_seed(0)
    coarse = torch.rand(_FIT_IMAGES, 3, 4, 4, generator=g) * 2 - 1
    images = torch.nn.functional.interpolate(coarse, size=(_FIT_SIDE, _FIT_SIDE), mode="bilinear")
    vae = model.vae
    with torch.inference_mode():
        dist = vae.encode(images.to(device=model.device, dtype=model.dtype)).latent_dist
        latents = (dist.mean * vae.config.scaling_factor).float().cpu()
    rgb = torch.nn.functional.adaptive_avg_pool2d(images, latents.shape[-2:])
    x = latents.permute(0, 2, 3, 1).reshape(-1, latents.shape[1])
    x = torch.cat([x, torch.ones(len(x), 1)], dim=1)
    y = rgb.permute(0, 2, 3, 1).reshape(-1, 3)
    fitted = torch.linalg.lstsq(x, y).solution
    with _LOCK:
        _MAPS[model.vae] = fitted
    return fitted


def preview_images(model, latents, show_side: int = 128) -> list[Image.Image]:
    """One picture per image of ``latents`` (B, C, h, w), the scaled latents of the denoising loop."""
    import torch

    with torch.inference_mode():
        if max(latents.shape[-2:]) <= VAE_MAX_LATENT:
            scale = model.vae.config.scaling_factor
            decoded = [
                model.vae.decode((latents[j : j + 1] / scale).to(model.dtype)).sample.float().cpu()
                for j in range(len(latents))
            ]
            rgb = torch.cat(decoded).permute(0, 2, 3, 1)
        else:
            m = latent_rgb_map(model)
            rgb = latents.float().cpu().permute(0, 2, 3, 1) @ m[:-1] + m[-1]
        arrays = ((rgb.clamp(-1, 1) + 1) * 127.5).round().byte().numpy()
    out = []
    for a in arrays:
        im = Image.fromarray(a)
        if max(im.size) < show_side:
            # Nearest neighbour: a preview is coarse and should look it, not blurred into false detail.
            k = max(1, show_side // max(im.size))
            im = im.resize((im.width * k, im.height * k), Image.Resampling.NEAREST)
        out.append(im)
    return out
