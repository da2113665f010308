"""Real published architectures (SD-1.5/2.1, SDXL, PixArt-alpha, DiT-XL/2) with random weights.

The configs below are the architecture values of each model's published diffusers/transformers
config files on the Hugging Face hub (the `hub_id` of each model: unet/, vae/, text_encoder*/,
transformer/, scheduler/ folders), written as literals; the published parameter counts are checked
in tests/harness/test_model_zoo.py. Builders need no files and no network: tokenizers are built in
memory, so token ids differ from the real vocabularies but sequence lengths and shapes are the
published ones. They also work under `accelerate.init_empty_weights()` (parameters on the meta
device), which makes parameter and FLOP counting of the big models free.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch

from harness.errors import DiffbenchError
from harness.models.build import local_clip_tokenizer, local_t5_tokenizer, seeded_module
from harness.models.registry import register_model

IMAGENET_CLASSES = 1000

# --- text encoders --------------------------------------------------------------------------
# CLIP text towers share vocabulary and context length (openai/clip-vit-large-patch14 config).
CLIP_COMMON = dict(vocab_size=49408, max_position_embeddings=77, layer_norm_eps=1e-5,
                   bos_token_id=0, eos_token_id=2, pad_token_id=1)
# SD-1.5 text_encoder/config.json = OpenAI CLIP ViT-L/14 text tower.
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12,
              num_hidden_layers=12, projection_dim=768, hidden_act="quick_gelu")
# SD-2.1 text_encoder/config.json = OpenCLIP ViT-H/14 text tower minus its last layer (23 of 24).
OPENCLIP_H = dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16,
                  num_hidden_layers=23, projection_dim=512, hidden_act="gelu")
# SDXL text_encoder_2/config.json = OpenCLIP ViT-bigG/14 text tower, with text projection.
OPENCLIP_BIGG = dict(hidden_size=1280, intermediate_size=5120, num_attention_heads=20,
                     num_hidden_layers=32, projection_dim=1280, hidden_act="gelu")
# PixArt-alpha text_encoder/config.json = google/t5-v1_1-xxl (encoder only).
T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
              feed_forward_proj="gated-gelu", relative_attention_num_buckets=32,
              relative_attention_max_distance=128, layer_norm_epsilon=1e-6,
              tie_word_embeddings=False, pad_token_id=0, eos_token_id=1)
PIXART_MAX_TOKENS = 120  # PixArtAlphaPipeline max_sequence_length

# --- VAE ------------------------------------------------------------------------------------
# SD vae/config.json (also sd-vae-ft-ema used by PixArt and DiT; SDXL differs in scaling only).
SD_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
              block_out_channels=(128, 256, 512, 512), norm_num_groups=32, act_fn="silu",
              down_block_types=("DownEncoderBlock2D",) * 4,
              up_block_types=("UpDecoderBlock2D",) * 4, scaling_factor=0.18215)
SDXL_VAE = {**SD_VAE, "scaling_factor": 0.13025, "force_upcast": True}

# --- denoisers ------------------------------------------------------------------------------
_CROSS_DOWN, _CROSS_UP = "CrossAttnDownBlock2D", "CrossAttnUpBlock2D"
# stable-diffusion-v1-5 unet/config.json.
SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280, 1280), attention_head_dim=8,
                 cross_attention_dim=768, norm_num_groups=32, flip_sin_to_cos=True, freq_shift=0,
                 down_block_types=(_CROSS_DOWN,) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + (_CROSS_UP,) * 3)
# stabilityai/stable-diffusion-2-1 unet/config.json: per-block heads, linear projections.
SD21_UNET = {**SD15_UNET, "sample_size": 96, "attention_head_dim": (5, 10, 20, 20),
             "cross_attention_dim": 1024, "use_linear_projection": True, "upcast_attention": True}
# stabilityai/stable-diffusion-xl-base-1.0 unet/config.json: 3 levels, 1/2/10 transformer layers.
SDXL_UNET = dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280), attention_head_dim=(5, 10, 20),
                 transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048,
                 use_linear_projection=True, addition_embed_type="text_time",
                 addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
                 down_block_types=("DownBlock2D", _CROSS_DOWN, _CROSS_DOWN),
                 up_block_types=(_CROSS_UP, _CROSS_UP, "UpBlock2D"))
# PixArt-alpha/PixArt-XL-2-512x512 transformer/config.json (28 blocks, width 16 x 72 = 1152).
PIXART_XL2_512 = dict(sample_size=64, num_layers=28, num_attention_heads=16, attention_head_dim=72,
                      in_channels=4, out_channels=8, patch_size=2, cross_attention_dim=1152,
                      caption_channels=4096, attention_bias=True, activation_fn="gelu-approximate",
                      num_embeds_ada_norm=1000, norm_type="ada_norm_single",
                      norm_elementwise_affine=False, norm_eps=1e-6,
                      use_additional_conditions=False)
# facebook/DiT-XL-2-256 transformer/config.json (28 blocks, width 1152, learned sigma: 8 out).
DIT_XL2_256 = dict(sample_size=32, num_layers=28, num_attention_heads=16, attention_head_dim=72,
                   in_channels=4, out_channels=8, patch_size=2, attention_bias=True,
                   activation_fn="gelu-approximate", num_embeds_ada_norm=1000,
                   norm_type="ada_norm_zero", norm_elementwise_affine=False)

# --- schedulers: the class named in each hub repo's model_index.json, with its betas ----------
# (SD: scaled-linear 0.00085..0.012; DiT and PixArt: DiT's linear 0.0001..0.02; 1000 steps).
SD_BETAS = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                beta_schedule="scaled_linear")
DIT_BETAS = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear")


def _scheduler(class_name: str, **config: Any) -> Any:
    """A diffusers scheduler from its class name and config values."""
    import diffusers

    return getattr(diffusers, class_name)(**config)


def _unet(config: dict, dtype: torch.dtype) -> torch.nn.Module:
    """UNet2DConditionModel from one of the *_UNET configs above."""
    from diffusers import UNet2DConditionModel

    return seeded_module(lambda: UNet2DConditionModel(**config), dtype)


def _vae(config: dict, sample_size: int, dtype: torch.dtype) -> torch.nn.Module:
    """AutoencoderKL (KL-f8) whose sample_size is the model's image resolution."""
    from diffusers import AutoencoderKL

    return seeded_module(lambda: AutoencoderKL(sample_size=sample_size, **config), dtype)


def _clip_text(config: dict, dtype: torch.dtype, with_projection: bool = False) -> torch.nn.Module:
    """CLIP text tower; SDXL's second encoder also returns the projected pooled embedding."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return seeded_module(lambda: cls(CLIPTextConfig(**CLIP_COMMON, **config)), dtype)


def _t5_encoder(dtype: torch.dtype) -> torch.nn.Module:
    """T5 encoder whose input embedding is the shared one, as in the checkpoint (4.76B params)."""
    from transformers import T5Config, T5EncoderModel

    def build() -> torch.nn.Module:
        model = T5EncoderModel(T5Config(**T5_XXL))
        # transformers 5 ties encoder.embed_tokens to `shared` only if tie_word_embeddings is
        # true, which the published config (about the decoder's lm_head) sets false.
        model.encoder.embed_tokens = model.shared
        return model

    return seeded_module(build, dtype)


def _stable_diffusion(unet: dict, text: dict, scheduler: Any, vae_size: int,
                      dtype: torch.dtype) -> Any:
    """A StableDiffusionPipeline without safety checker (the checker is not part of the model)."""
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(
        vae=_vae(SD_VAE, vae_size, dtype), text_encoder=_clip_text(text, dtype),
        tokenizer=local_clip_tokenizer(77), unet=_unet(unet, dtype), scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)


# Raw generator outputs are scored: SD's safety checker would black out flagged images (and
# distort the NSFW ratio), so pretrained SD-1.x/2.x pipelines load without it.
NO_SAFETY_CHECKER = {"safety_checker": None, "requires_safety_checker": False}


@register_model("sd15", pipeline_class="StableDiffusionPipeline", load_kwargs=NO_SAFETY_CHECKER,
                hub_id="stable-diffusion-v1-5/stable-diffusion-v1-5",
                resolution=512, steps=50, guidance=7.5)
def build_sd15(dtype: torch.dtype = torch.float32) -> Any:
    """Stable Diffusion 1.5: 860M UNet, CLIP ViT-L/14 text, KL-f8 VAE, PNDM (hub configs)."""
    scheduler = _scheduler("PNDMScheduler", **SD_BETAS, skip_prk_steps=True, steps_offset=1,
                           set_alpha_to_one=False)
    return _stable_diffusion(SD15_UNET, CLIP_L, scheduler, 512, dtype)


@register_model("sd21", pipeline_class="StableDiffusionPipeline", load_kwargs=NO_SAFETY_CHECKER,
                hub_id="stabilityai/stable-diffusion-2-1", resolution=768, steps=50, guidance=7.5)
def build_sd21(dtype: torch.dtype = torch.float32) -> Any:
    """Stable Diffusion 2.1 (768-v): 866M UNet, OpenCLIP ViT-H text, DDIM v-prediction."""
    scheduler = _scheduler("DDIMScheduler", **SD_BETAS, prediction_type="v_prediction",
                           clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    return _stable_diffusion(SD21_UNET, OPENCLIP_H, scheduler, 768, dtype)


@register_model("sdxl", pipeline_class="StableDiffusionXLPipeline",
                hub_id="stabilityai/stable-diffusion-xl-base-1.0",
                resolution=1024, steps=50, guidance=5.0)
def build_sdxl(dtype: torch.dtype = torch.float32) -> Any:
    """SDXL base 1.0: 2.6B UNet, CLIP ViT-L + OpenCLIP bigG text, Euler (hub configs)."""
    from diffusers import StableDiffusionXLPipeline

    scheduler = _scheduler("EulerDiscreteScheduler", **SD_BETAS, steps_offset=1,
                           timestep_spacing="leading", interpolation_type="linear")
    return StableDiffusionXLPipeline(
        vae=_vae(SDXL_VAE, 1024, dtype), text_encoder=_clip_text(CLIP_L, dtype),
        text_encoder_2=_clip_text(OPENCLIP_BIGG, dtype, with_projection=True),
        tokenizer=local_clip_tokenizer(77), tokenizer_2=local_clip_tokenizer(77),
        unet=_unet(SDXL_UNET, dtype), scheduler=scheduler, force_zeros_for_empty_prompt=True)


def pixart_kwargs(prompts: list[str], steps: int, guidance: float, resolution: int,
                  generators: list[torch.Generator]) -> dict:
    """PixArt call: no aspect-ratio binning, no caption cleaning (needs bs4/ftfy); float [0, 1]."""
    return dict(prompt=list(prompts), num_inference_steps=steps, guidance_scale=guidance,
                height=resolution, width=resolution, generator=generators, output_type="pt",
                use_resolution_binning=False, clean_caption=False)


@register_model("pixart-alpha", pipeline_class="PixArtAlphaPipeline",
                hub_id="PixArt-alpha/PixArt-XL-2-512x512", resolution=512, steps=20, guidance=4.5,
                resolution_multiple=16,
                call_kwargs=pixart_kwargs)
def build_pixart_alpha(dtype: torch.dtype = torch.float32) -> Any:
    """PixArt-alpha XL/2 512px: 611M DiT with cross-attention, T5-v1.1-XXL text, DPM-Solver++."""
    from diffusers import PixArtAlphaPipeline, PixArtTransformer2DModel

    scheduler = _scheduler("DPMSolverMultistepScheduler", **DIT_BETAS, solver_order=2,
                           algorithm_type="dpmsolver++", solver_type="midpoint",
                           lower_order_final=True)
    transformer = seeded_module(lambda: PixArtTransformer2DModel(**PIXART_XL2_512), dtype)
    return PixArtAlphaPipeline(tokenizer=local_t5_tokenizer(PIXART_MAX_TOKENS),
                               text_encoder=_t5_encoder(dtype), vae=_vae(SD_VAE, 512, dtype),
                               transformer=transformer, scheduler=scheduler)


def class_label(prompt: str) -> int:
    """ImageNet class id of a prompt: an integer string is the id, other text a sha256 hash."""
    text = prompt.strip()
    if text.isdigit():
        label = int(text)
        if label >= IMAGENET_CLASSES:
            raise DiffbenchError(f"class id {label} is out of range for DiT (0..999)")
        return label
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big") % 1000


def dit_kwargs(prompts: list[str], steps: int, guidance: float, resolution: int,
               generators: list[torch.Generator]) -> dict:
    """DiT call: prompts become class labels; size is fixed by the weights; float [0, 1] NCHW."""
    return dict(class_labels=[class_label(p) for p in prompts], num_inference_steps=steps,
                guidance_scale=guidance, generator=generators, output_type="pt")


@register_model("dit-xl-2", pipeline_class="DiTPipeline", hub_id="facebook/DiT-XL-2-256",
                resolution=256, steps=250, guidance=4.0, conditioning="class",
                resolution_multiple=None,
                call_kwargs=dit_kwargs)
def build_dit_xl_2(dtype: torch.dtype = torch.float32) -> Any:
    """DiT-XL/2 256px: 675M class-conditional transformer, sd-vae-ft-ema, DDIM (hub configs)."""
    from diffusers import DiTPipeline, DiTTransformer2DModel

    scheduler = _scheduler("DDIMScheduler", **DIT_BETAS, clip_sample=False)
    transformer = seeded_module(lambda: DiTTransformer2DModel(**DIT_XL2_256), dtype)
    return DiTPipeline(transformer=transformer, vae=_vae(SD_VAE, 256, dtype), scheduler=scheduler)
