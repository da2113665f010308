"""Fidelity to the baseline: PSNR and SSIM of a method's images against the baseline cell's
images for the same model, prompts and seeds (torchmetrics functional definitions).

Pinned: per-image values on the 0..255 scale (data_range 255), SSIM with torchmetrics'
defaults (Gaussian 11x11, sigma 1.5, k1 0.01, k2 0.03), means over images with bootstrap CIs.
A bit-identical image has infinite PSNR; it is counted as PSNR_CAP (100 dB) so means and
intervals stay finite, and `psnr_identical` says how many images were identical.
Baseline rows (no other images to compare with) get no fidelity columns.
"""

from __future__ import annotations

from typing import Any

import torch

from harness.metric import Metric, MetricContext, Observation, register_metric
from metrics.bootstrap import ci_columns, images_as_numpy, quality_skip_reason

PSNR_CAP = 100.0
MIN_N = 10  # our choice: per-image PSNR varies little between images of one prompt set


def _nchw(images: Any) -> torch.Tensor:
    return torch.from_numpy(images_as_numpy(images).copy()).permute(0, 3, 1, 2).double()


def psnr_per_image(images: Any, reference: Any, cap: float | None = PSNR_CAP) -> torch.Tensor:
    """Per-image PSNR (dB) of uint8 N x H x W x 3 images, data range 255; capped at `cap`."""
    from torchmetrics.functional.image import peak_signal_noise_ratio

    x, y = _nchw(images), _nchw(reference)
    psnr = peak_signal_noise_ratio(x, y, data_range=255.0, reduction="none", dim=(1, 2, 3))
    return psnr.clamp(max=cap) if cap is not None else psnr


def ssim_per_image(images: Any, reference: Any) -> torch.Tensor:
    """Per-image SSIM of uint8 N x H x W x 3 images (torchmetrics defaults, data range 255)."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    x, y = _nchw(images), _nchw(reference)
    return structural_similarity_index_measure(x, y, data_range=255.0, reduction="none")


@register_metric("fidelity")
class Fidelity(Metric):
    """PSNR / SSIM against the baseline's images; empty on the baseline itself."""

    higher_is_better = True

    def __init__(self, skipped: bool = False) -> None:
        super().__init__()
        self.skipped = skipped
        self.add_state("psnr", [], reduce="cat")
        self.add_state("ssim", [], reduce="cat")
        self.add_state("identical", 0, reduce="sum")

    @classmethod
    def for_cell(cls, context: MetricContext) -> Fidelity:
        cell = context.cell
        baseline = getattr(cell, "baseline_key", None) == getattr(cell, "key", None)
        return cls(skipped=bool(quality_skip_reason(context)) or baseline)

    def update(self, obs: Observation) -> None:
        if self.skipped or obs.images is None or obs.baseline_images is None:
            return
        if tuple(obs.images.shape) != tuple(obs.baseline_images.shape):
            raise ValueError(f"images {tuple(obs.images.shape)} and baseline images "
                             f"{tuple(obs.baseline_images.shape)} differ in shape")
        raw = psnr_per_image(obs.images, obs.baseline_images, cap=None)
        self.identical += int(torch.isinf(raw).sum())
        self.psnr.extend(float(v) for v in raw.clamp(max=PSNR_CAP))
        self.ssim.extend(float(v) for v in ssim_per_image(obs.images, obs.baseline_images))

    def compute(self) -> dict[str, Any]:
        if self.skipped or not self.psnr:
            return {}
        out = ci_columns("psnr", self.psnr, MIN_N, "wide interval")
        out.update(ci_columns("ssim", self.ssim, MIN_N, "wide interval"))
        out["psnr_identical"] = self.identical
        return out
