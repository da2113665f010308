"""`mini-sd`: the embedded default model, a small but real Stable Diffusion trained offline.

Four parts trained on the procedural world (`harness.mini.world`, training in
`harness.mini.train`): a word-level CLIP tokenizer and mini-CLIP (`harness.mini.clip`; its text
tower is the pipeline's text encoder), mini-VAE (`AutoencoderKL`, 32x32 RGB -> 8x8x4 latents) and
mini-UNet (`UNet2DConditionModel` with SD's cross-attention block types). Together they load as a
diffusers `StableDiffusionPipeline` from `harness/mini/assets/mini-sd/` (safetensors, offline).

The architecture configs live here so that training, the random-weights builder and loading
agree.
"""

from __future__ import annotations

from typing import Any

import torch

from harness.mini import world
from harness.mini.clip import TEXT_WIDTH, build_tokenizer, clip_config
from harness.mini.paths import PIPELINE_DIR
from harness.mini.world import RESOLUTION
from harness.models import register_model
from harness.models.build import in_dtype, seeded

DATASET_SEED_OFFSET = 7_000_000  # training-method data: world seeds apart from other uses

# --- architectures --------------------------------------------------------------------------
VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
           block_out_channels=(16, 32, 64), norm_num_groups=8, sample_size=RESOLUTION,
           down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3)
LATENT = RESOLUTION // 4  # 8x8x4 latents
UNET = dict(sample_size=LATENT, in_channels=4, out_channels=4, layers_per_block=1,
            block_out_channels=(32, 64, 64), attention_head_dim=4, norm_num_groups=8,
            cross_attention_dim=TEXT_WIDTH,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))
# Stable Diffusion's noise schedule (scheduler/scheduler_config.json of SD-1.5).
SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
                steps_offset=1, prediction_type="epsilon")


# --- builders (random weights) --------------------------------------------------------------
def ddim_scheduler() -> Any:
    from diffusers import DDIMScheduler

    return DDIMScheduler(**SCHEDULE)


def build_parts(seed: int = 0) -> dict[str, Any]:
    """Tokenizer, CLIPModel, AutoencoderKL and UNet2DConditionModel with seeded random weights."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPModel

    tokenizer = build_tokenizer()
    clip, vae, unet = seeded(lambda: (CLIPModel(clip_config(len(tokenizer))),
                                      AutoencoderKL(**VAE), UNet2DConditionModel(**UNET)), seed)
    return dict(tokenizer=tokenizer, clip=clip, vae=vae, unet=unet)


def assemble_pipeline(tokenizer: Any, clip: Any, vae: Any, unet: Any) -> Any:
    """A StableDiffusionPipeline whose text encoder is the text tower of `clip`."""
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTextModel

    text_encoder = CLIPTextModel(clip.config.text_config)
    text_encoder.load_state_dict(clip.text_model.state_dict())  # text_model: a CLIPTextModel
    text_encoder.eval()
    return StableDiffusionPipeline(
        unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
        scheduler=ddim_scheduler(), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )


def world_dataset(n: int, seed: int) -> tuple[torch.Tensor, list[str]]:
    """Real training images of mini-sd: n world images (training split) and their captions.
    Seeds are offset so they never coincide with the Frechet reference's images."""
    batch = world.sample(n, DATASET_SEED_OFFSET + int(seed), split="train")
    return batch.float_images(), batch.captions


@register_model("mini-sd", pipeline_class="StableDiffusionPipeline", resolution=RESOLUTION,
                steps=25, guidance=5.0, default_weights="pretrained", has_quality=True,
                embedded_weights=str(PIPELINE_DIR), dataset=world_dataset, embedded=True)
def build_mini_sd(dtype: torch.dtype = torch.float32) -> Any:
    """Mini Stable Diffusion trained offline on diffbench's shape world (32x32, ships in repo)."""
    parts = build_parts()
    pipe = assemble_pipeline(parts["tokenizer"], parts["clip"], parts["vae"], parts["unet"])
    return in_dtype(pipe, dtype)
