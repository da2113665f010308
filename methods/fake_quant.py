"""Fake quantisation math (Esser et al., LSQ, arXiv 1902.08153): shared by tdq and ptq_static.

Pure functions, no pipeline: uniform symmetric fake quantisation q(v; s) = round(clip(v / s,
-Qp, Qp)) * s with a straight-through estimator for the rounding (LSQ eq. 1-3), the LSQ gradient
scale g = 1 / sqrt(N * Qp) (LSQ Sec. 2.2), min-max / percentile calibration of step sizes and the
storage size of quantised weights. The integer grid is the narrow symmetric one,
{-Qp, ..., Qp} with Qp = 2^(b-1) - 1 (zero point 0, as TDQ's released symmetric quantiser), so
b = 8 gives 255 levels; -2^(b-1) is unused. Not a registered method: it has no config.
"""

from __future__ import annotations

import math

import torch

STEP_BYTES = 4  # each step size is stored as one fp32 number


def qmax(bits: int) -> int:
    """Qp = 2^(b-1) - 1: the largest integer level of the symmetric b-bit grid (LSQ eq. 1)."""
    return 2 ** (bits - 1) - 1


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round to nearest (ties to even) forward, identity backward: straight-through estimator."""
    return x + (torch.round(x) - x).detach()


def grad_scale(x: torch.Tensor, scale: float) -> torch.Tensor:
    """x forward, gradient times `scale` backward (LSQ Sec. 2.2, the `gradscale` function)."""
    scaled = x * scale
    return (x - scaled).detach() + scaled


def lsq_grad_scale(n: int, bits: int) -> float:
    """LSQ step-size gradient scale g = 1 / sqrt(N * Qp), N = values sharing the step."""
    return 1.0 / math.sqrt(n * qmax(bits))


def fake_quant(x: torch.Tensor, step: torch.Tensor, bits: int) -> torch.Tensor:
    """round(clip(x / s, -Qp, Qp)) * s (LSQ eq. 1-2); d/dx is 1 inside the range and 0 outside,
    d/ds is round(x/s) - x/s inside and +-Qp outside (LSQ eq. 3). `step` broadcasts against x."""
    q = qmax(bits)
    return round_ste(torch.clamp(x / step, -q, q)) * step


def abs_percentile(x: torch.Tensor, percentile: float) -> torch.Tensor:
    """The `percentile`-th percentile of |x| over all its elements; 100 is max |x| (min-max)."""
    flat = x.detach().abs().flatten().float()
    if percentile >= 100.0:
        return flat.max()
    k = max(1, min(flat.numel(), math.ceil(flat.numel() * percentile / 100.0)))
    return flat.kthvalue(k).values


def step_from_range(max_abs: torch.Tensor, bits: int, eps: float = 1e-8) -> torch.Tensor:
    """Min-max calibration: s = max|x| / Qp, so the range [-max|x|, max|x|] maps onto the grid."""
    return torch.clamp(max_abs.float(), min=eps) / qmax(bits)


def channel_steps(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """Per-output-channel min-max step of a weight, shaped (C_out, 1, ...) to broadcast."""
    max_abs = weight.detach().abs().reshape(weight.shape[0], -1).amax(dim=1)
    return step_from_range(max_abs, bits).reshape(-1, *([1] * (weight.dim() - 1)))


def quantized_weight_bytes(numel: int, bits: int, n_steps: int) -> int:
    """Bytes of a packed b-bit weight tensor plus its fp32 step sizes: ceil(b * n / 8) + 4 * k."""
    return math.ceil(bits * numel / 8) + STEP_BYTES * n_steps
