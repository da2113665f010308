"""CLIP score as torchmetrics computes it: max(mean over pairs of 100 * cos(image, text), 0).

(torchmetrics documents max(100 * cos, 0) per pair; its code clamps the mean, which equals the
per-pair form whenever no pair has a negative cosine. We follow the code, so numbers match.)

Embeddings are computed here through transformers (torchmetrics 1.9's CLIPScore breaks on
transformers 5, whose get_*_features return output objects: torchmetrics issue 3407, fixed after
1.9.0): the projected image / text embeddings
(`get_image_features` / `get_text_features`). The embedded model (mini-sd) is scored with its
own mini-CLIP; other models with a transformers CLIP by name or local path
(default openai/clip-vit-base-patch32, as MLPerf). The model is named in `clip_model`.
Options (`[metric_options.clip_score]`): `clip_model` (hub id, local folder or "mini-clip").
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from harness.metric import Metric, MetricContext, Observation, register_metric
from metrics.bootstrap import (
    ci_columns,
    images_as_numpy,
    is_embedded,
    metric_options,
    quality_skip_reason,
)

DEFAULT_CLIP = "openai/clip-vit-base-patch32"
MINI_CLIP = "mini-clip"
MIN_N = 100  # our choice: the CI half-width of a mean of ~N(., 5) pairs is below 1 point here
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


# --- pure math -------------------------------------------------------------------------------
def clip_cosines(image_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
    """Per pair 100 * cos(image, text) of matching rows (float64, not clamped)."""
    a, b = image_emb.double(), text_emb.double()
    a = a / a.norm(dim=-1, keepdim=True)
    b = b / b.norm(dim=-1, keepdim=True)
    return 100.0 * (a * b).sum(-1)


def clip_score_of(per_pair: Any) -> float:
    """torchmetrics' reduction: max(mean of 100 * cos, 0) (its code clamps the mean)."""
    return max(float(np.mean(np.asarray(per_pair, np.float64))), 0.0)


def clip_score(image_emb: torch.Tensor, text_emb: torch.Tensor) -> float:
    """CLIP score of the pairs: max(mean(100 * cos), 0), torchmetrics' value."""
    return clip_score_of(clip_cosines(image_emb, text_emb).numpy())


# --- backends --------------------------------------------------------------------------------
def _as_tensor(out: Any) -> torch.Tensor:
    """transformers 5 returns an output object from get_*_features; older versions a tensor."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


@dataclasses.dataclass
class ClipBackend:
    """A CLIP model with its tokenizer and image preprocessing; `name` goes into the row."""

    name: str
    model: Any
    tokenizer: Any
    pixel_values: Callable[[np.ndarray], torch.Tensor]  # uint8 N x H x W x 3 -> model input
    device: str = "cpu"
    batch_size: int = 64
    text_inputs: Callable[[Sequence[str]], dict] | None = None  # texts -> model kwargs

    @torch.inference_mode()
    def image_embeds(self, images: np.ndarray) -> torch.Tensor:
        out = []
        for s in range(0, len(images), self.batch_size):
            px = self.pixel_values(images[s:s + self.batch_size]).to(self.device)
            out.append(_as_tensor(self.model.get_image_features(pixel_values=px)).float().cpu())
        return torch.cat(out)

    @torch.inference_mode()
    def text_embeds(self, texts: Sequence[str]) -> torch.Tensor:
        out = []
        for s in range(0, len(texts), self.batch_size):
            tok = (self.text_inputs or self._tokenize)(list(texts[s:s + self.batch_size]))
            tok = {k: v.to(self.device) for k, v in tok.items()
                   if k in ("input_ids", "attention_mask")}
            out.append(_as_tensor(self.model.get_text_features(**tok)).float().cpu())
        return torch.cat(out)

    def _tokenize(self, texts: list[str]) -> dict:
        max_len = getattr(self.tokenizer, "model_max_length", 77)
        max_len = max_len if isinstance(max_len, int) and max_len < 10_000 else 77
        return dict(self.tokenizer(texts, padding=True, truncation=True, max_length=max_len,
                                   return_tensors="pt"))

    def image_features(self, images: np.ndarray) -> np.ndarray:
        """L2-normalised image embeddings, float64 (the Frechet-distance features)."""
        e = self.image_embeds(images).double()
        return (e / e.norm(dim=-1, keepdim=True)).numpy()


def tensor_preprocess(size: int, mean: Sequence[float] = OPENAI_MEAN,
                      std: Sequence[float] = OPENAI_STD) -> Callable[[np.ndarray], torch.Tensor]:
    """uint8 images -> bicubic (antialiased) resize to size x size, [0, 1], normalised."""
    m = torch.tensor(mean).view(1, 3, 1, 1)
    s = torch.tensor(std).view(1, 3, 1, 1)

    def fn(images: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0
        if x.shape[-2:] != (size, size):
            x = torch.nn.functional.interpolate(x, size=(size, size), mode="bicubic",
                                                align_corners=False, antialias=True)
        return (x - m) / s

    return fn


def mini_clip_backend(device: str = "cpu") -> ClipBackend:
    """The embedded mini-CLIP, with the pixel and token layout it was trained on
    (harness.mini.clip: clip_pixels, tokenize); named with its weight file's hash."""
    from harness.mini import clip as mini_clip

    model, tokenizer = mini_clip.load_mini_clip(device=device)

    def pixel_values(images: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0
        return mini_clip.clip_pixels(x)

    def text_inputs(texts: Sequence[str]) -> dict:
        return {"input_ids": mini_clip.tokenize(tokenizer, list(texts))}

    weights = Path(mini_clip.CLIP_DIR) / "model.safetensors"
    name = MINI_CLIP
    if weights.is_file():
        name += "@" + hashlib.sha256(weights.read_bytes()).hexdigest()[:12]
    return ClipBackend(name, model, tokenizer, pixel_values, device, text_inputs=text_inputs)


def hf_clip_backend(name_or_path: str = DEFAULT_CLIP, device: str = "cpu") -> ClipBackend:
    """A transformers CLIP from a local folder or the hub, with its own image processor."""
    from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

    from harness.errors import DiffbenchError

    try:
        model = CLIPModel.from_pretrained(name_or_path).eval().to(device)
        tokenizer = CLIPTokenizer.from_pretrained(name_or_path)
        processor = CLIPImageProcessor.from_pretrained(name_or_path)
    except OSError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DiffbenchError(f"cannot load CLIP model '{name_or_path}' (local folder or hub): "
                             f"{first}") from None

    def pixel_values(images: np.ndarray) -> torch.Tensor:
        return processor(images=list(images), return_tensors="pt")["pixel_values"]

    return ClipBackend(name_or_path, model, tokenizer, pixel_values, device)


def load_backend(context: MetricContext, metric: str) -> ClipBackend:
    """mini-CLIP for the embedded model; else `[metric_options.<metric>] clip_model` or the
    default."""
    opts = metric_options(context, metric)
    device = getattr(context.cell, "device", "cpu")
    name = opts.get("clip_model")
    if name in (None, "", MINI_CLIP) and is_embedded(context):
        return mini_clip_backend(device)
    if name == MINI_CLIP:
        return mini_clip_backend(device)
    return hf_clip_backend(name or DEFAULT_CLIP, device)


def try_backend(context: MetricContext, metric: str) -> tuple[ClipBackend | None, str]:
    """(backend, "") or (None, why not): a missing CLIP model leaves a note, not a failed cell."""
    from harness.errors import DiffbenchError

    try:
        return load_backend(context, metric), ""
    except DiffbenchError as exc:
        return None, str(exc)


# --- metric ----------------------------------------------------------------------------------
@register_metric("clip_score")
class CLIPScore(Metric):
    """Mean CLIP score of images against their prompts, bootstrap CI, CLIP model named."""

    higher_is_better = True
    option_names = ("clip_model",)

    def __init__(self, backend: ClipBackend | None = None, note: str = "") -> None:
        super().__init__()
        self.backend, self.note = backend, note
        self.add_state("scores", [], reduce="cat")

    @classmethod
    def for_cell(cls, context: MetricContext) -> CLIPScore:
        if quality_skip_reason(context):
            return cls(None)
        backend, note = try_backend(context, "clip_score")
        return cls(backend, note)

    def update(self, obs: Observation) -> None:
        if self.backend is None or obs.images is None or not obs.prompts:
            return
        images = images_as_numpy(obs.images)
        if len(images) != len(obs.prompts):
            raise ValueError(f"{len(images)} images but {len(obs.prompts)} prompts")
        cos = clip_cosines(self.backend.image_embeds(images),
                           self.backend.text_embeds(obs.prompts))
        self.scores.extend(float(s) for s in cos)

    def compute(self) -> dict[str, Any]:
        if self.backend is None:
            return {"clip_score": None, "clip_score_note": self.note} if self.note else {}
        point = clip_score_of(self.scores) if self.scores else None
        out = ci_columns("clip_score", self.scores, MIN_N, "wide interval", point=point,
                         statistic=clip_score_of)
        out["clip_model"] = self.backend.name
        return out
