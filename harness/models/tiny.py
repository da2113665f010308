"""Tiny test builds: real diffusers pipelines (SD, DiT, PixArt-alpha) with tiny configs.

Seeded random weights (`build.seeded`): two builds are identical; each builds offline in well
under a second. `tiny-sd` exercises the UNet methods; `tiny-dit` and `tiny-pixart` the
transformer-denoiser methods (FORA, Delta-DiT, block dropping) with the same classes as
`dit-xl-2` and `pixart-alpha` (zoo.py): 4 blocks of width 2 x 16, 16x16x4 latents (patch 2:
64 tokens) and a KL-f2 VAE, so images are 32x32.
"""

from __future__ import annotations

from typing import Any

import torch

from harness.models.build import in_dtype, local_clip_tokenizer, local_t5_tokenizer, seeded
from harness.models.registry import register_model
from harness.models.zoo import DIT_BETAS, dit_kwargs, pixart_kwargs

# KL-f2 VAE of every tiny build: 32x32x3 <-> 16x16x4.
TINY_VAE = dict(block_out_channels=(16, 32), in_channels=3, out_channels=3, latent_channels=4,
                down_block_types=("DownEncoderBlock2D",) * 2,
                up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8, sample_size=32)
# 4 transformer blocks, 2 heads x 16 = width 32, learned sigma (8 output channels) as DiT-XL/2.
TINY_BLOCKS = dict(num_layers=4, num_attention_heads=2, attention_head_dim=16, in_channels=4,
                   out_channels=8, patch_size=2, sample_size=16, attention_bias=True,
                   activation_fn="gelu-approximate", num_embeds_ada_norm=1000,
                   norm_elementwise_affine=False)


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

    def build() -> Any:
        unet = UNet2DConditionModel(
            block_out_channels=(32, 64), layers_per_block=1, sample_size=8,
            in_channels=4, out_channels=4, cross_attention_dim=32, attention_head_dim=8,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), norm_num_groups=8,
        )
        vae = AutoencoderKL(**TINY_VAE)
        tokenizer = local_clip_tokenizer(model_max_length=77)
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
            pad_token_id=1,
        ))
        scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012,
                                  beta_schedule="scaled_linear", clip_sample=False,
                                  set_alpha_to_one=False, steps_offset=1)
        return StableDiffusionPipeline(
            unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
            scheduler=scheduler, safety_checker=None, feature_extractor=None,
            requires_safety_checker=False,
        )

    return in_dtype(seeded(build), dtype)


@register_model("tiny-dit", pipeline_class="DiTPipeline", resolution=32, steps=10, guidance=4.0,
                default_weights="none", has_quality=False, conditioning="class",
                resolution_multiple=None,
                call_kwargs=dit_kwargs)
def build_tiny_dit(dtype: torch.dtype = torch.float32) -> Any:
    """Tiny DiT-architecture pipeline (4 adaLN-Zero blocks, class labels, KL-VAE, DDIM)."""
    from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    def build() -> Any:
        transformer = DiTTransformer2DModel(**TINY_BLOCKS, norm_type="ada_norm_zero").eval()
        vae = AutoencoderKL(**TINY_VAE).eval()
        scheduler = DDIMScheduler(**DIT_BETAS, clip_sample=False)
        return DiTPipeline(transformer=transformer, vae=vae, scheduler=scheduler)

    return in_dtype(seeded(build), dtype)


@register_model("tiny-pixart", pipeline_class="PixArtAlphaPipeline", resolution=32, steps=10,
                guidance=4.5, default_weights="none", has_quality=False,
                call_kwargs=pixart_kwargs)
def build_tiny_pixart(dtype: torch.dtype = torch.float32) -> Any:
    """Tiny PixArt-alpha pipeline (4 adaLN-single blocks with cross-attention, tiny T5, DPM++)."""
    from diffusers import (
        AutoencoderKL,
        DPMSolverMultistepScheduler,
        PixArtAlphaPipeline,
        PixArtTransformer2DModel,
    )
    from transformers import T5Config, T5EncoderModel

    def build() -> Any:
        tokenizer = local_t5_tokenizer()
        text_encoder = T5EncoderModel(T5Config(
            vocab_size=len(tokenizer), d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2,
            feed_forward_proj="gated-gelu", relative_attention_num_buckets=8, pad_token_id=0,
            eos_token_id=1)).eval()
        transformer = PixArtTransformer2DModel(
            **TINY_BLOCKS, norm_type="ada_norm_single", norm_eps=1e-6, cross_attention_dim=32,
            caption_channels=32, use_additional_conditions=False).eval()
        scheduler = DPMSolverMultistepScheduler(**DIT_BETAS, solver_order=2,
                                                algorithm_type="dpmsolver++",
                                                solver_type="midpoint", lower_order_final=True)
        return PixArtAlphaPipeline(tokenizer=tokenizer, text_encoder=text_encoder,
                                   vae=AutoencoderKL(**TINY_VAE).eval(), transformer=transformer,
                                   scheduler=scheduler)

    return in_dtype(seeded(build), dtype)
