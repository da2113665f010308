"""`tiny-sd`: a real StableDiffusionPipeline with tiny configs and seeded random weights."""

from __future__ import annotations

from typing import Any

import torch

from harness.models import local_clip_tokenizer, register_model

TINY_SEED = 0


@register_model("tiny-sd", pipeline_class="StableDiffusionPipeline", resolution=32, steps=10,
                guidance=5.0, default_weights="none", has_quality=False)
def build_tiny_sd(dtype: torch.dtype = torch.float32) -> Any:
    """Tiny SD-architecture pipeline (cross-attention UNet, KL-VAE, CLIP text), random weights."""
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        unet = UNet2DConditionModel(
            block_out_channels=(32, 64), layers_per_block=1, sample_size=8,
            in_channels=4, out_channels=4, cross_attention_dim=32, attention_head_dim=8,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), norm_num_groups=8,
        )
        vae = AutoencoderKL(
            block_out_channels=(16, 32), in_channels=3, out_channels=3, latent_channels=4,
            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
            norm_num_groups=8, sample_size=32,
        )
        tokenizer = local_clip_tokenizer(model_max_length=77)
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
            pad_token_id=1,
        ))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(
        unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    return pipe if dtype == torch.float32 else pipe.to(dtype=dtype)
