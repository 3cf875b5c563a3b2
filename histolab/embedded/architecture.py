"""Component configurations: the embedded default, a tiny one for tests, and
Stable Diffusion 1.5's own shapes (for benchmarks with random weights).

All three use the same classes as SD 1.5 (AutoencoderKL, UNet2DConditionModel,
CLIPTextModel + CLIPTokenizer, a DDPM-family scheduler), so every adapter and
every code path is exercised the same way at every scale.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# SD 1.5's scheduler (v1-5 scheduler_config.json): a scaled-linear beta schedule
# over 1000 steps with epsilon prediction. Reused unchanged by the embedded model.
SD15_SCHEDULER: dict[str, Any] = {
    "_class_name": "PNDMScheduler",
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "clip_sample": False,
}


@dataclass(frozen=True)
class Architecture:
    name: str
    resolution: int
    vae: dict[str, Any]
    unet: dict[str, Any]
    text_encoder: dict[str, Any]
    scheduler: dict[str, Any] = field(default_factory=lambda: dict(SD15_SCHEDULER))


# The embedded default. 64 px images through an f4 VAE give 16x16x4 latents.
# Why these sizes: a training step of batch 32 takes about 0.8 s on 2 CPU cores,
# a guided 25-step batch of 4 about 2 s, and the weights in fp16 stay small
# enough (about 25 MB for all three networks) to commit. Attention sits at 8x8,
# 4x4 and the mid block only: class and stain are global properties, and
# attention at 16x16 cost 40% more per step for no visible gain.
EMBEDDED = Architecture(
    name="embedded",
    resolution=64,
    vae=dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(32, 64, 128),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=64,
    ),
    unet=dict(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=(64, 128, 160),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=256,
        attention_head_dim=8,
        norm_num_groups=32,
    ),
    text_encoder=dict(
        vocab_size=1280,
        hidden_size=256,
        intermediate_size=1024,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        bos_token_id=1278,
        eos_token_id=1279,
        pad_token_id=1279,
        projection_dim=256,
    ),
)

# For tests: the smallest shapes that still have every block type
# (diffusers' get_dummy_components does the same with block_out_channels=(4, 8)).
TINY = Architecture(
    name="tiny",
    resolution=32,
    vae=dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=32,
    ),
    unet=dict(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=4,
        norm_num_groups=8,
    ),
    text_encoder=dict(
        vocab_size=1280,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        bos_token_id=1278,
        eos_token_id=1279,
        pad_token_id=1279,
        projection_dim=32,
    ),
)

# Stable Diffusion 1.5's shapes (runwayml/stable-diffusion-v1-5 configs).
SD15 = Architecture(
    name="sd15",
    resolution=512,
    vae=dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=512,
        scaling_factor=0.18215,
    ),
    unet=dict(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=768,
        attention_head_dim=8,
        norm_num_groups=32,
    ),
    text_encoder=dict(
        vocab_size=49408,
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=1,
        projection_dim=768,
    ),
)

ARCHITECTURES = {a.name: a for a in (EMBEDDED, TINY, SD15)}


def build_components(arch: Architecture, seed: int = 0):
    """Randomly initialised (vae, unet, text_encoder) of ``arch``, seeded."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    vae = AutoencoderKL(**arch.vae)
    torch.manual_seed(seed + 1)
    unet = UNet2DConditionModel(**arch.unet)
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(CLIPTextConfig(**arch.text_encoder))
    return vae, unet, text_encoder
