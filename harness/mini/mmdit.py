"""`mini-sd3`: the embedded transformer model, a small SD3-style MMDiT trained offline on the world.

Stable Diffusion 3's design (Esser et al. 2024, arXiv 2403.03206) at toy size: an
`SD3Transformer2DModel` (joint text-image attention over both token streams, adaLN-Zero from
the timestep and pooled text, QK RMS-norm as in SD3.5), rectified-flow training (x_t = (1 - s) x0
+ s eps, velocity target eps - x0, logit-normal s), `FlowMatchEulerDiscreteScheduler` sampling.
It loads offline as a diffusers `StableDiffusion3Pipeline` from `harness/mini/assets/mini-sd3/`.

Text: the pipeline has two CLIP slots and an optional T5. Both CLIP slots hold mini-sd's frozen
phase-1 text tower (the one mini-sd's UNet reads, so the two embedded models see the same text),
as `CLIPTextModelWithProjection` with an identity projection (pooled = its end-of-text feature);
T5 is left out (SD3 allows it, the world's captions need no T5) and the pipeline is called with
`max_sequence_length=0`, so the context is the 16 CLIP tokens. Latents: mini-sd's VAE with
SD3's latent shift (`shift_factor`, the training latents' mean) besides its scaling.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from harness.mini.clip import TEXT_WIDTH, build_tokenizer, clip_config
from harness.mini.paths import MMDIT_DIR, PIPELINE_DIR
from harness.mini.pipeline import LATENT, VAE, world_dataset
from harness.mini.world import RESOLUTION
from harness.models import register_model, text_to_image_kwargs
from harness.models.build import in_dtype, seeded

# 6 joint blocks of width 96 (3 heads x 32), patch 1 on 8x8x4 latents: 64 image tokens.
TRANSFORMER = dict(sample_size=LATENT, patch_size=1, in_channels=4, out_channels=4, num_layers=6,
                   attention_head_dim=32, num_attention_heads=3,
                   joint_attention_dim=2 * TEXT_WIDTH, caption_projection_dim=96,
                   pooled_projection_dim=2 * TEXT_WIDTH, pos_embed_max_size=2 * LATENT,
                   qk_norm="rms_norm")
SCHEDULE = dict(num_train_timesteps=1000, shift=1.0)  # no resolution shift at 8x8 latents
LATENT_SHIFT = 0.4560  # mean of mini-sd's VAE latents (training.json: vae.latent_mean)
MAX_SEQUENCE_LENGTH = 0  # no T5 tokens: the context is the CLIP tokens only
NO_T5 = dict(text_encoder_3=None, tokenizer_3=None)  # from_pretrained without T5, as diffusers


def flow_scheduler() -> Any:
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(**SCHEDULE)


def with_projection(text_encoder: Any) -> Any:
    """A CLIPTextModelWithProjection holding `text_encoder`'s weights and an identity
    projection, so the pipeline's pooled embedding is the tower's end-of-text feature."""
    from transformers import CLIPTextModelWithProjection

    config = copy.deepcopy(text_encoder.config)
    config.projection_dim = config.hidden_size
    model = CLIPTextModelWithProjection(config)
    model.text_model.load_state_dict(text_encoder.state_dict())  # keys: embeddings.*, encoder.*
    with torch.no_grad():
        model.text_projection.weight.copy_(torch.eye(config.hidden_size))
    return model.eval().requires_grad_(False)


def shifted_vae(vae: Any) -> Any:
    """The VAE with SD3's latent shift in its config (decode: z / scaling + shift)."""
    vae = copy.deepcopy(vae)
    vae.register_to_config(shift_factor=LATENT_SHIFT)
    return vae.eval()


def assemble_sd3(tokenizer: Any, text_encoder: Any, vae: Any, transformer: Any) -> Any:
    """A StableDiffusion3Pipeline from mini-sd's text tower (both CLIP slots) and VAE."""
    from diffusers import StableDiffusion3Pipeline

    encoder = with_projection(text_encoder)
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=flow_scheduler(), vae=shifted_vae(vae),
        text_encoder=encoder, tokenizer=tokenizer, text_encoder_2=copy.deepcopy(encoder),
        tokenizer_2=copy.deepcopy(tokenizer), text_encoder_3=None, tokenizer_3=None)


def frozen_parts() -> tuple[Any, Any, Any]:
    """mini-sd's shipped tokenizer, text encoder and VAE (what the MMDiT is trained beside)."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(str(PIPELINE_DIR / "tokenizer"))
    text_encoder = CLIPTextModel.from_pretrained(str(PIPELINE_DIR / "text_encoder")).eval()
    vae = AutoencoderKL.from_pretrained(str(PIPELINE_DIR / "vae")).eval()
    return tokenizer, text_encoder, vae


def build_transformer(seed: int = 0) -> Any:
    from diffusers import SD3Transformer2DModel

    return seeded(lambda: SD3Transformer2DModel(**TRANSFORMER), seed)


def sd3_kwargs(prompts: list[str], steps: int, guidance: float, resolution: int,
               generators: list[torch.Generator]) -> dict:
    """The SD3 pipeline call without T5 tokens (what mini-sd3 was trained with)."""
    return {**text_to_image_kwargs(prompts, steps, guidance, resolution, generators),
            "max_sequence_length": MAX_SEQUENCE_LENGTH}


@register_model("mini-sd3", pipeline_class="StableDiffusion3Pipeline", resolution=RESOLUTION,
                steps=20, guidance=4.0, default_weights="pretrained", has_quality=True,
                embedded_weights=str(MMDIT_DIR), dataset=world_dataset, embedded=True,
                call_kwargs=sd3_kwargs, load_kwargs=NO_T5)
def build_mini_sd3(dtype: torch.dtype = torch.float32) -> Any:
    """Mini SD3-style MMDiT (joint attention, rectified flow) trained offline on the world."""
    from diffusers import AutoencoderKL
    from transformers import CLIPModel, CLIPTextModel

    tokenizer = build_tokenizer()
    clip, vae = seeded(lambda: (CLIPModel(clip_config(len(tokenizer))), AutoencoderKL(**VAE)))
    text_encoder = CLIPTextModel(clip.config.text_config)
    text_encoder.load_state_dict(clip.text_model.state_dict())  # as mini-sd's builder
    return in_dtype(assemble_sd3(tokenizer, text_encoder, vae, build_transformer()), dtype)
