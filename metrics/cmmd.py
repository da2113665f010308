"""CMMD (Jayasumana et al., arXiv 2401.09603): the maximum mean discrepancy between real and
generated CLIP image embeddings with a Gaussian RBF kernel, sigma = 10, times 1000 (Sec. 4).

The estimate is the reference code's (google-research/cmmd, distance.py): the means of
k(x, x'), k(y, y') and k(x, y) over all pairs, diagonals included, so it needs no subsets and
no kernel parameter besides sigma; a bootstrap interval over the generated images.

- `cmmd`: a user's CLIP (`clip_model`, the paper's openai/clip-vit-large-patch14-336 by
  default: a local folder or a hub id already in the HF cache, never downloaded), embedded as
  the reference code embeds (cmmd/embedding.py): the image bicubic-resized to the model's
  input size (aspect not kept; antialiased, skipped at that size), normalised with the model's
  mean / std, the projected image embedding (CLIPModel.get_image_features, as
  CLIPVisionModelWithProjection's image_embeds), L2-normalised. (The reference resizes with
  jax.image.resize, whose bicubic kernel is Keys' a = -0.5; torch's is a = -0.75.) Real
  images: a `reference` .npz of their embeddings (a `features` array, as kid's), or, for the
  embedded model, the procedural world's images embedded with that CLIP (cached).
- `cmmd_clip`: the same distance on the embedded mini-CLIP's (L2-normalised) image
  embeddings against the world's images, or any CLIP through its `clip_model` option.

A missing model or reference leaves the column None with a one-line note naming the option.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from harness.errors import DiffbenchError
from harness.metric import MetricContext, register_metric
from metrics import kid as kid_metrics
from metrics.bootstrap import is_embedded, metric_options, quality_skip_reason
from metrics.clip_score import ClipBackend, tensor_preprocess
from metrics.kid import KernelDistance, cached_features, clip_world_metric, load_features

SIGMA, SCALE = 10.0, 1000.0  # the paper's kernel bandwidth and reporting scale
DEFAULT_CLIP = "openai/clip-vit-large-patch14-336"  # the paper's CLIP


def rbf_mmd(x: Any, y: Any, sigma: float = SIGMA, scale: float = SCALE) -> float:
    """scale * (mean k(x, x') + mean k(y, y') - 2 mean k(x, y)), k = exp(-|a - b|^2 / 2 s^2),
    in float64 (diagonal terms included, as the reference code computes it)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)

    def mean_kernel(a: np.ndarray, b: np.ndarray) -> float:
        sq = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * a @ b.T
        return float(np.exp(-np.maximum(sq, 0) / (2 * sigma * sigma)).mean())

    return scale * (mean_kernel(x, x) + mean_kernel(y, y) - 2 * mean_kernel(x, y))


def load_cmmd_clip(name: str = DEFAULT_CLIP, device: str = "cpu",
                   metric: str = "cmmd") -> ClipBackend:
    """A transformers CLIP from a local folder or the HF cache (offline) with the reference
    code's preprocessing; a one-line DiffbenchError naming `clip_model` when it is missing."""
    from transformers import CLIPModel

    from metrics.reward import from_pretrained, image_processor_class, weights_name

    model = from_pretrained(CLIPModel, name, metric, "clip_model").eval().to(device)
    proc = from_pretrained(image_processor_class(), name, metric, "clip_model")
    crop = getattr(proc, "crop_size", None) or {}
    size = int(crop.get("height") or model.config.vision_config.image_size)
    pixels = tensor_preprocess(size, proc.image_mean, proc.image_std)
    return ClipBackend(weights_name(name, model), model, None, pixels, device)


class CMMDMetric(KernelDistance):
    column = "cmmd"
    spread = False

    def distance(self, real: np.ndarray, fake: np.ndarray, subsets: int,
                 seed: int) -> tuple[float, float | None]:
        return rbf_mmd(real, fake), None


@register_metric("cmmd")
class CMMD(CMMDMetric):
    """CMMD on a user's CLIP (the paper's ViT-L/14-336 by default) against real embeddings.

    Options (`[metric_options.cmmd]`): `clip_model` (local folder or cached hub id),
    `reference` (.npz with a `features` array of real images' embeddings from that CLIP; for
    the embedded model the world's images are the default).
    """

    option_names = ("clip_model", "reference")

    @classmethod
    def for_cell(cls, context: MetricContext) -> KernelDistance:
        if quality_skip_reason(context):
            return cls(skipped=True)
        opts = metric_options(context, "cmmd")
        name = str(opts.get("clip_model") or DEFAULT_CLIP)
        reference = opts.get("reference")
        try:
            backend = load_cmmd_clip(name, getattr(context.cell, "device", "cpu"))
        except DiffbenchError as exc:
            return cls(extractor_name=name, note=str(exc))
        extract = backend.image_features
        if reference:
            try:
                real = load_features(reference)
            except DiffbenchError as exc:
                return cls(extractor_name=backend.name, reference=Path(str(reference)).name,
                           note=f"cmmd not measured: [metric_options.cmmd] reference: {exc}")
            return cls(extract, real, backend.name, Path(str(reference)).name)
        if is_embedded(context):
            dataset, n = kid_metrics.WORLD_DATASET, kid_metrics.WORLD_REFERENCE_N
            real = cached_features(dataset, backend.name, n,
                                   lambda: extract(kid_metrics.world_images(n)))
            return cls(extract, real, backend.name, f"{dataset}:n{n}")
        return cls(extractor_name=backend.name, note="cmmd not measured: no reference "
                   "features: give [metric_options.cmmd] reference = 'features.npz' (a "
                   f"`features` array of real images' embeddings from {name})")


@register_metric("cmmd_clip")
class CMMDClip(CMMDMetric):
    """CMMD on the embedded mini-CLIP's image embeddings against real images of the procedural
    world; only for the embedded model.

    Options (`[metric_options.cmmd_clip]`): `clip_model` (as for clip_score; mini-CLIP default).
    """

    column = "cmmd_clip"
    option_names = ("clip_model",)

    @classmethod
    def for_cell(cls, context: MetricContext) -> KernelDistance:
        return clip_world_metric(cls, context, "cmmd_clip")
