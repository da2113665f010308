"""Tiny test builds: real diffusers pipelines (SD, DiT, PixArt-alpha, FLUX.1, SD3.5), tiny configs.

Seeded random weights (`build.seeded`): two builds are identical; each builds offline in well
under a second. `tiny-sd` exercises the UNet methods; `tiny-dit` and `tiny-pixart` the
transformer-denoiser methods (FORA, Delta-DiT, block dropping) with the same classes as
`dit-xl-2` and `pixart-alpha` (zoo.py): 4 blocks of width 2 x 16, 16x16x4 latents (patch 2:
64 tokens) and a KL-f2 VAE, so images are 32x32. `tiny-flux` and `tiny-sd3` do the same for the
flow-matching MMDiTs of flow_zoo.py (`flux-dev`, `sd3.5-medium`): FluxPipeline with 2 double + 2
single blocks and the guidance embedding, CLIP + T5 text; StableDiffusion3Pipeline with 3
MMDiT-X blocks (the first with SD3.5's dual attention), two projected CLIP towers and a T5, so
the three-encoder path runs. Both: width 2 x 16, the KL-f2 VAE with the latent shift, 64 image
tokens, the published flow-matching schedulers, T5 sequences of TINY_T5_TOKENS.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from harness.models.build import in_dtype, local_clip_tokenizer, local_t5_tokenizer, seeded
from harness.models.flow_zoo import (
    FLUX_DEV_SCHEDULE,
    FLUX_VAE,
    SD35_SCHEDULE,
    SD35_VAE,
    flow_kwargs,
    flow_scheduler,
)
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


# --- flow-matching transformers (flow_zoo.py): FLUX.1 and SD3.5 at toy size ------------------
# T5 sequence length of the tiny FLUX / SD3 calls: as tiny-pixart's, longer than the char-level
# tokens of the prompt sets' prompts (a truncated prompt makes the pipelines compare token ids
# with torch.equal, which fake-tensor FLOP counting cannot answer)
TINY_T5_TOKENS = 120
tiny_flow_kwargs = functools.partial(flow_kwargs, max_sequence_length=TINY_T5_TOKENS)


def _tiny_clip(tokenizer: Any, with_projection: bool = False) -> Any:
    """tiny-sd's 2-layer CLIP text tower (width 32); SD3's encoders also project (to 32)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return cls(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, projection_dim=32, bos_token_id=0,
        eos_token_id=1, pad_token_id=1)).eval()


def _tiny_t5(tokenizer: Any, width: int) -> Any:
    """tiny-pixart's 2-layer T5 encoder at `width`."""
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(
        vocab_size=len(tokenizer), d_model=width, d_kv=16, d_ff=2 * width, num_layers=2,
        num_heads=2, feed_forward_proj="gated-gelu", relative_attention_num_buckets=8,
        pad_token_id=0, eos_token_id=1)).eval()


def _tiny_flow_vae(scaling_factor: float, shift_factor: float) -> Any:
    """TINY_VAE with the latent shift FLUX / SD3 decode with (z / scaling + shift)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(**TINY_VAE, scaling_factor=scaling_factor,
                         shift_factor=shift_factor).eval()


@register_model("tiny-flux", pipeline_class="FluxPipeline", resolution=32, steps=4, guidance=3.5,
                default_weights="none", has_quality=False, resolution_multiple=4,
                call_kwargs=tiny_flow_kwargs)
def build_tiny_flux(dtype: torch.dtype = torch.float32) -> Any:
    """Tiny FLUX.1-dev pipeline (2 double + 2 single blocks, guidance embedding, CLIP + T5)."""
    from diffusers import FluxPipeline, FluxTransformer2DModel

    def build() -> Any:
        tokenizer, tokenizer_2 = local_clip_tokenizer(77), local_t5_tokenizer(TINY_T5_TOKENS)
        # 2 heads x 16 (rope axes 4 + 6 + 6); 4 latent channels x 2x2 packing = 16 in
        transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=16, num_layers=2, num_single_layers=2,
            attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
            pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(4, 6, 6)).eval()
        return FluxPipeline(
            scheduler=flow_scheduler(FLUX_DEV_SCHEDULE),
            vae=_tiny_flow_vae(FLUX_VAE["scaling_factor"], FLUX_VAE["shift_factor"]),
            text_encoder=_tiny_clip(tokenizer), tokenizer=tokenizer,
            text_encoder_2=_tiny_t5(tokenizer_2, 32), tokenizer_2=tokenizer_2,
            transformer=transformer)

    return in_dtype(seeded(build), dtype)


@register_model("tiny-sd3", pipeline_class="StableDiffusion3Pipeline", resolution=32, steps=4,
                guidance=4.5, default_weights="none", has_quality=False, resolution_multiple=4,
                call_kwargs=tiny_flow_kwargs)
def build_tiny_sd3(dtype: torch.dtype = torch.float32) -> Any:
    """Tiny SD3.5 pipeline (3 MMDiT-X blocks, one dual-attention; 2 CLIP + T5 text)."""
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

    def build() -> Any:
        tokenizer, tokenizer_3 = local_clip_tokenizer(77), local_t5_tokenizer(TINY_T5_TOKENS)
        # 2 heads x 16, patch 2 on 16x16x4 latents: 64 image tokens; CLIP 32 + 32 wide, T5 64
        transformer = SD3Transformer2DModel(
            sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=3,
            attention_head_dim=16, num_attention_heads=2, joint_attention_dim=64,
            caption_projection_dim=32, pooled_projection_dim=64, pos_embed_max_size=32,
            qk_norm="rms_norm", dual_attention_layers=(0,)).eval()
        return StableDiffusion3Pipeline(
            transformer=transformer, scheduler=flow_scheduler(SD35_SCHEDULE),
            vae=_tiny_flow_vae(SD35_VAE["scaling_factor"], SD35_VAE["shift_factor"]),
            text_encoder=_tiny_clip(tokenizer, with_projection=True), tokenizer=tokenizer,
            text_encoder_2=_tiny_clip(tokenizer, with_projection=True),
            tokenizer_2=local_clip_tokenizer(77), text_encoder_3=_tiny_t5(tokenizer_3, 64),
            tokenizer_3=tokenizer_3)

    return in_dtype(seeded(build), dtype)
