"""`mini-sd`: the embedded default model, a small but real Stable Diffusion trained offline.

Four parts trained on the procedural world of `harness.world` (`harness/train_mini.py`):
a word-level CLIP tokenizer, mini-CLIP (a contrastive `CLIPModel`; its text tower is the
pipeline's text encoder), mini-VAE (`AutoencoderKL`, 32x32 RGB -> 8x8x4 latents) and mini-UNet
(`UNet2DConditionModel` with SD's cross-attention block types). Together they load as a diffusers
`StableDiffusionPipeline` from `harness/assets/mini-sd/` (safetensors, offline); the whole
`CLIPModel` for scoring (CLIP score, Frechet features, zero-shot concepts) is in
`harness/assets/mini-clip/`.

The architecture configs live here so that training, the random-weights builder and loading
agree.
"""

from __future__ import annotations

import collections
import string
from pathlib import Path
from typing import Any

import torch

from harness.errors import DiffbenchError
from harness.models import register_model
from harness.world import RESOLUTION, words

ASSETS = Path(__file__).resolve().parent / "assets"
PIPELINE_DIR = ASSETS / "mini-sd"
DATASET_SEED_OFFSET = 7_000_000  # training-method data: world seeds apart from other uses
CLIP_DIR = ASSETS / "mini-clip"
MAX_TOKENS = 16  # "a large red circle on a blue background" is 10 with bos / eos
BUILD_SEED = 0
BOS, EOS = "<|startoftext|>", "<|endoftext|>"

# --- architectures --------------------------------------------------------------------------
TEXT_WIDTH = 64  # text tower width = UNet cross-attention dim
CLIP_TEXT = dict(hidden_size=TEXT_WIDTH, intermediate_size=256, num_hidden_layers=3,
                 num_attention_heads=4, max_position_embeddings=MAX_TOKENS, hidden_act="gelu",
                 bos_token_id=0, eos_token_id=1, pad_token_id=1)
CLIP_VISION = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=4,
                   num_attention_heads=4, image_size=RESOLUTION, patch_size=4, num_channels=3,
                   hidden_act="gelu")
CLIP_PROJECTION = 64
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


# --- tokenizer ------------------------------------------------------------------------------
def _bpe_merges(vocabulary: list[str]) -> list[tuple[str, str]]:
    """BPE merges learnt on the world's words until each word is one token (deterministic)."""
    segments = {w: (*w[:-1], w[-1] + "</w>") for w in vocabulary}
    merges = []
    while any(len(s) > 1 for s in segments.values()):
        counts: collections.Counter = collections.Counter()
        for s in segments.values():
            counts.update(zip(s, s[1:]))
        best = min(counts, key=lambda pair: (-counts[pair], pair))
        merges.append(best)
        for w, s in segments.items():
            out, i = [], 0
            while i < len(s):
                if i + 1 < len(s) and (s[i], s[i + 1]) == best:
                    out.append(s[i] + s[i + 1])
                    i += 2
                else:
                    out.append(s[i])
                    i += 1
            segments[w] = tuple(out)
    return merges


def build_tokenizer() -> Any:
    """Word-level CLIPTokenizer: every world word is one token; other words fall back to letters."""
    from transformers import CLIPTokenizer

    merges = _bpe_merges(words())
    vocab = {BOS: 0, EOS: 1}
    for ch in string.ascii_lowercase:
        vocab[ch] = len(vocab)
        vocab[ch + "</w>"] = len(vocab)
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=MAX_TOKENS,
                         bos_token=BOS, eos_token=EOS, pad_token=EOS, unk_token=EOS)


# --- builders (random weights) --------------------------------------------------------------
def clip_config(vocab_size: int) -> Any:
    from transformers import CLIPConfig

    return CLIPConfig(text_config={**CLIP_TEXT, "vocab_size": vocab_size},
                      vision_config=CLIP_VISION, projection_dim=CLIP_PROJECTION)


def ddim_scheduler() -> Any:
    from diffusers import DDIMScheduler

    return DDIMScheduler(**SCHEDULE)


def build_parts(seed: int = BUILD_SEED) -> dict[str, Any]:
    """Tokenizer, CLIPModel, AutoencoderKL and UNet2DConditionModel with seeded random weights."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPModel

    tokenizer = build_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        clip = CLIPModel(clip_config(len(tokenizer)))
        vae = AutoencoderKL(**VAE)
        unet = UNet2DConditionModel(**UNET)
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
    from harness import world

    batch = world.sample(n, DATASET_SEED_OFFSET + int(seed), split="train")
    return batch.float_images(), batch.captions


@register_model("mini-sd", pipeline_class="StableDiffusionPipeline", resolution=RESOLUTION,
                steps=25, guidance=5.0, default_weights="pretrained", has_quality=True,
                embedded_weights=str(PIPELINE_DIR), dataset=world_dataset)
def build_mini_sd(dtype: torch.dtype = torch.float32) -> Any:
    """Mini Stable Diffusion trained offline on diffbench's shape world (32x32, ships in repo)."""
    parts = build_parts()
    pipe = assemble_pipeline(parts["tokenizer"], parts["clip"], parts["vae"], parts["unet"])
    return pipe if dtype == torch.float32 else pipe.to(dtype=dtype)


# --- mini-CLIP for scoring ------------------------------------------------------------------
def load_mini_clip(path: str | Path = CLIP_DIR, device: str = "cpu") -> tuple[Any, Any]:
    """The trained mini-CLIP (`CLIPModel`, eval mode) and its tokenizer, offline."""
    from transformers import CLIPModel, CLIPTokenizer

    path = Path(path)
    if not (path / "config.json").is_file():
        raise DiffbenchError(f"mini-CLIP weights not found in {path}; "
                             "train them with `python -m harness.train_mini --stage all`")
    model = CLIPModel.from_pretrained(str(path)).eval().to(device)
    tokenizer = CLIPTokenizer.from_pretrained(str(path))
    return model, tokenizer


def clip_pixels(images: torch.Tensor) -> torch.Tensor:
    """Float [0, 1] N x 3 x H x W images as mini-CLIP pixel values (32x32, [-1, 1])."""
    images = images.float()
    if images.shape[-2:] != (RESOLUTION, RESOLUTION):
        images = torch.nn.functional.interpolate(images, size=(RESOLUTION, RESOLUTION),
                                                 mode="bilinear", antialias=True,
                                                 align_corners=False)
    return images * 2 - 1


def tokenize(tokenizer: Any, texts: list[str]) -> torch.Tensor:
    """Token ids padded to the 16-token context, as the pipeline pads them."""
    return tokenizer(list(texts), padding="max_length", max_length=MAX_TOKENS, truncation=True,
                     return_tensors="pt").input_ids


def image_embeddings(model: Any, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """L2-normalised mini-CLIP image embeddings of float [0, 1] N x 3 x H x W images."""
    device = next(model.parameters()).device
    out = []
    with torch.no_grad():
        for chunk in images.split(batch_size):
            pixels = clip_pixels(chunk).to(device)
            feats = model.vision_model(pixel_values=pixels).pooler_output
            out.append(model.visual_projection(feats).float().cpu())
    return torch.nn.functional.normalize(torch.cat(out), dim=-1)


def text_embeddings(model: Any, tokenizer: Any, texts: list[str],
                    batch_size: int = 512) -> torch.Tensor:
    """L2-normalised mini-CLIP text embeddings."""
    device = next(model.parameters()).device
    out = []
    with torch.no_grad():
        for i in range(0, len(texts), batch_size):
            ids = tokenize(tokenizer, texts[i:i + batch_size]).to(device)
            feats = model.text_model(input_ids=ids).pooler_output
            out.append(model.text_projection(feats).float().cpu())
    return torch.nn.functional.normalize(torch.cat(out), dim=-1)
