"""CMMD (Jayasumana et al., arXiv 2401.09603): the maximum mean discrepancy between real and
generated CLIP image embeddings with a Gaussian RBF kernel, sigma = 10, times 1000 (Sec. 4);
"cmmd_clip" on the embedded mini-CLIP's (L2-normalised) image embeddings.

The estimate is the reference code's (google-research/cmmd, distance.py): the means of
k(x, x'), k(y, y') and k(x, y) over all pairs, diagonals included, so it needs no subsets and
no kernel parameter besides sigma; a bootstrap interval over the generated images. A user's
CLIP (`cmmd`, ViT-L/14-336 by default in the paper) is not built yet: `cmmd_clip` takes any
CLIP through its `clip_model` option on the embedded model.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from harness.metric import MetricContext, register_metric
from metrics.kid import KernelDistance, clip_world_metric

SIGMA, SCALE = 10.0, 1000.0  # the paper's kernel bandwidth and reporting scale


def rbf_mmd(x: Any, y: Any, sigma: float = SIGMA, scale: float = SCALE) -> float:
    """scale * (mean k(x, x') + mean k(y, y') - 2 mean k(x, y)), k = exp(-|a - b|^2 / 2 s^2),
    in float64 (diagonal terms included, as the reference code computes it)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)

    def mean_kernel(a: np.ndarray, b: np.ndarray) -> float:
        sq = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * a @ b.T
        return float(np.exp(-np.maximum(sq, 0) / (2 * sigma * sigma)).mean())

    return scale * (mean_kernel(x, x) + mean_kernel(y, y) - 2 * mean_kernel(x, y))


@register_metric("cmmd_clip")
class CMMDClip(KernelDistance):
    """CMMD on the embedded mini-CLIP's image embeddings against real images of the procedural
    world; only for the embedded model.

    Options (`[metric_options.cmmd_clip]`): `clip_model` (as for clip_score; mini-CLIP default).
    """

    column = "cmmd_clip"
    option_names = ("clip_model",)
    spread = False

    def distance(self, real: np.ndarray, fake: np.ndarray, subsets: int,
                 seed: int) -> tuple[float, float | None]:
        return rbf_mmd(real, fake), None

    @classmethod
    def for_cell(cls, context: MetricContext) -> KernelDistance:
        return clip_world_metric(cls, context, "cmmd_clip")
