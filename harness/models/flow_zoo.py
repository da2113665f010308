"""Flow-matching transformer models (FLUX.1-dev/schnell, SD3.5-medium) with their published configs.

As zoo.py: each config literal is the architecture of the named config file in the model's hub
repository (`hub_id`), random seeded weights, tokenizers built in memory (token ids differ from
the real vocabularies; sequence lengths and shapes are the published ones). Builders work under
`accelerate.init_empty_weights()` and inside torch's FakeTensorMode (benchmarks/arch_flops.py),
so the 12B FLUX transformer is counted without allocating it; tests build the big models only
there (tests/harness/models/test_flow_zoo.py checks the published parameter counts).

Both pipelines denoise with rectified flow (`FlowMatchEulerDiscreteScheduler`). FLUX.1 has no
classifier-free guidance: dev is guidance-distilled (`guidance` feeds the transformer's guidance
embedding, one denoiser pass per step), schnell is timestep-distilled (4 steps, no guidance
input). SD3.5 runs classic CFG (two passes per step, batched).
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from harness.models import zoo
from harness.models.build import local_clip_tokenizer, local_t5_tokenizer, seeded_module
from harness.models.registry import register_model, text_to_image_kwargs

# --- denoisers ------------------------------------------------------------------------------
# black-forest-labs/FLUX.1-dev transformer/config.json: 19 double-stream (MMDiT) blocks, 38
# single-stream blocks, 24 heads x 128 = 3072 wide; 16 latent channels x 2x2 packing = 64 in.
FLUX_DEV_TRANSFORMER = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38,
                            attention_head_dim=128, num_attention_heads=24,
                            joint_attention_dim=4096, pooled_projection_dim=768,
                            guidance_embeds=True, axes_dims_rope=(16, 56, 56))
# black-forest-labs/FLUX.1-schnell transformer/config.json: the same without guidance embedding.
FLUX_SCHNELL_TRANSFORMER = {**FLUX_DEV_TRANSFORMER, "guidance_embeds": False}
# stabilityai/stable-diffusion-3.5-medium transformer/config.json: MMDiT-X, 24 joint blocks of
# 24 heads x 64 = 1536, the first 13 with a second (image-only) attention, QK RMS-norm.
SD35_MEDIUM_TRANSFORMER = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16,
                               num_layers=24, attention_head_dim=64, num_attention_heads=24,
                               joint_attention_dim=4096, caption_projection_dim=1536,
                               pooled_projection_dim=2048, pos_embed_max_size=384,
                               qk_norm="rms_norm", dual_attention_layers=tuple(range(13)))

# --- VAEs: SD's KL-f8 layout with 16 latent channels and no quant convs ----------------------
FLOW_VAE = {**zoo.SD_VAE, "latent_channels": 16, "use_quant_conv": False,
            "use_post_quant_conv": False, "force_upcast": True}
FLUX_VAE = {**FLOW_VAE, "scaling_factor": 0.3611, "shift_factor": 0.1159}  # FLUX.1 vae/config
SD35_VAE = {**FLOW_VAE, "scaling_factor": 1.5305, "shift_factor": 0.0609}  # SD3.5 vae/config

# --- schedulers (scheduler/scheduler_config.json) --------------------------------------------
# FLUX.1-dev: the shift grows with the image's token count (mu from 256 to 4096 tokens).
FLUX_DEV_SCHEDULE = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                         base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                         max_image_seq_len=4096)
FLUX_SCHNELL_SCHEDULE = {**FLUX_DEV_SCHEDULE, "shift": 1.0, "use_dynamic_shifting": False}
SD35_SCHEDULE = dict(num_train_timesteps=1000, shift=3.0)

# T5 tokens: FluxPipeline's max_sequence_length (dev: 512, its default; schnell: 256, as its
# model card calls it); StableDiffusion3Pipeline's default 256.
FLUX_DEV_T5_TOKENS, FLUX_SCHNELL_T5_TOKENS, SD35_T5_TOKENS = 512, 256, 256
CLIP_TOKENS = 77


def flow_kwargs(prompts: list[str], steps: int, guidance: float, resolution: int,
                generators: list[torch.Generator], max_sequence_length: int) -> dict:
    """A FLUX / SD3 call: the text-to-image arguments and the T5 sequence length."""
    return {**text_to_image_kwargs(prompts, steps, guidance, resolution, generators),
            "max_sequence_length": max_sequence_length}


def flow_scheduler(config: dict) -> Any:
    """FlowMatchEulerDiscreteScheduler on real tensors, also inside a FakeTensorMode (its
    constructor reads its last sigma with .item(), which a fake tensor cannot answer)."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    with unset_fake_temporarily():
        return zoo._scheduler("FlowMatchEulerDiscreteScheduler", **config)


def _flux(transformer: dict, schedule: dict, t5_tokens: int, dtype: torch.dtype) -> Any:
    """A FluxPipeline: CLIP-L (pooled) + T5-XXL text, FLUX VAE, flow-matching Euler."""
    from diffusers import AutoencoderKL, FluxPipeline, FluxTransformer2DModel

    return FluxPipeline(
        scheduler=flow_scheduler(schedule),
        vae=seeded_module(lambda: AutoencoderKL(sample_size=1024, **FLUX_VAE), dtype),
        text_encoder=zoo._clip_text(zoo.CLIP_L, dtype), tokenizer=local_clip_tokenizer(CLIP_TOKENS),
        text_encoder_2=zoo._t5_encoder(dtype), tokenizer_2=local_t5_tokenizer(t5_tokens),
        transformer=seeded_module(lambda: FluxTransformer2DModel(**transformer), dtype))


@register_model("flux-dev", pipeline_class="FluxPipeline", hub_id="black-forest-labs/FLUX.1-dev",
                resolution=1024, steps=28, guidance=3.5, resolution_multiple=16,
                call_kwargs=functools.partial(flow_kwargs, max_sequence_length=FLUX_DEV_T5_TOKENS))
def build_flux_dev(dtype: torch.dtype = torch.float32) -> Any:
    """FLUX.1-dev: 11.9B guidance-distilled MMDiT, CLIP-L + T5-XXL text, 16-channel VAE."""
    return _flux(FLUX_DEV_TRANSFORMER, FLUX_DEV_SCHEDULE, FLUX_DEV_T5_TOKENS, dtype)


@register_model("flux-schnell", pipeline_class="FluxPipeline",
                hub_id="black-forest-labs/FLUX.1-schnell", resolution=1024, steps=4,
                guidance=0.0, resolution_multiple=16,
                call_kwargs=functools.partial(flow_kwargs,
                                              max_sequence_length=FLUX_SCHNELL_T5_TOKENS))
def build_flux_schnell(dtype: torch.dtype = torch.float32) -> Any:
    """FLUX.1-schnell: 11.9B timestep-distilled MMDiT (4 steps, no guidance), CLIP-L + T5-XXL."""
    return _flux(FLUX_SCHNELL_TRANSFORMER, FLUX_SCHNELL_SCHEDULE, FLUX_SCHNELL_T5_TOKENS, dtype)


@register_model("sd3.5-medium", pipeline_class="StableDiffusion3Pipeline",
                hub_id="stabilityai/stable-diffusion-3.5-medium", resolution=1024, steps=40,
                guidance=4.5, resolution_multiple=16,
                call_kwargs=functools.partial(flow_kwargs, max_sequence_length=SD35_T5_TOKENS))
def build_sd35_medium(dtype: torch.dtype = torch.float32) -> Any:
    """SD3.5 medium: 2.5B MMDiT-X, CLIP-L + OpenCLIP bigG + T5-XXL text, 16-channel VAE."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel, StableDiffusion3Pipeline

    return StableDiffusion3Pipeline(
        transformer=seeded_module(lambda: SD3Transformer2DModel(**SD35_MEDIUM_TRANSFORMER), dtype),
        scheduler=flow_scheduler(SD35_SCHEDULE),
        vae=seeded_module(lambda: AutoencoderKL(sample_size=1024, **SD35_VAE), dtype),
        text_encoder=zoo._clip_text(zoo.CLIP_L, dtype, with_projection=True),
        tokenizer=local_clip_tokenizer(CLIP_TOKENS),
        text_encoder_2=zoo._clip_text(zoo.OPENCLIP_BIGG, dtype, with_projection=True),
        tokenizer_2=local_clip_tokenizer(CLIP_TOKENS),
        text_encoder_3=zoo._t5_encoder(dtype), tokenizer_3=local_t5_tokenizer(SD35_T5_TOKENS))
