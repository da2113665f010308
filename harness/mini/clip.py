"""mini-CLIP: the embedded model's word-level tokenizer and contrastive `CLIPModel`.

Its text tower is mini-sd's text encoder; the whole model (`harness/mini/assets/mini-clip/`)
scores images offline: CLIP score, Frechet features and the zero-shot judge
(`harness.mini.zeroshot`).
"""

from __future__ import annotations

import collections
import string
from pathlib import Path
from typing import Any

import torch

from harness.errors import DiffbenchError
from harness.mini.paths import CLIP_DIR
from harness.mini.world import RESOLUTION, words

MAX_TOKENS = 16  # "a large red circle on a blue background" is 10 with bos / eos
BOS, EOS = "<|startoftext|>", "<|endoftext|>"

# --- architecture ---------------------------------------------------------------------------
TEXT_WIDTH = 64  # text tower width = UNet cross-attention dim
CLIP_TEXT = dict(hidden_size=TEXT_WIDTH, intermediate_size=256, num_hidden_layers=3,
                 num_attention_heads=4, max_position_embeddings=MAX_TOKENS, hidden_act="gelu",
                 bos_token_id=0, eos_token_id=1, pad_token_id=1)
CLIP_VISION = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=4,
                   num_attention_heads=4, image_size=RESOLUTION, patch_size=4, num_channels=3,
                   hidden_act="gelu")
CLIP_PROJECTION = 64


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


def clip_config(vocab_size: int) -> Any:
    from transformers import CLIPConfig

    return CLIPConfig(text_config={**CLIP_TEXT, "vocab_size": vocab_size},
                      vision_config=CLIP_VISION, projection_dim=CLIP_PROJECTION)


# --- loading and embeddings ------------------------------------------------------------------
def load_mini_clip(path: str | Path = CLIP_DIR, device: str = "cpu") -> tuple[Any, Any]:
    """The trained mini-CLIP (`CLIPModel`, eval mode) and its tokenizer, offline."""
    from transformers import CLIPModel, CLIPTokenizer

    path = Path(path)
    if not (path / "config.json").is_file():
        raise DiffbenchError(f"mini-CLIP weights not found in {path}; "
                             "train them with `diffbench train-mini --stage all`")
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
