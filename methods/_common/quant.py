"""Fake quantisation (Esser et al., LSQ, arXiv 1902.08153) of a denoiser's Conv2d / Linear layers.

Shared by ptq_minmax, lsq and tdq (So et al., arXiv 2306.02316). The math is pure: uniform
symmetric fake quantisation q(v; s) = round(clip(v / s, -Qp, Qp)) * s with a straight-through
estimator for the rounding (LSQ eq. 1-3), the LSQ gradient scale g = 1 / sqrt(N * Qp) (LSQ Sec.
2.2), min-max / percentile calibration of step sizes and the storage size of quantised weights.
The integer grid is the narrow symmetric one, {-Qp, ..., Qp} with Qp = 2^(b-1) - 1 (zero point
0, as TDQ's released symmetric quantiser), so b = 8 gives 255 levels; -2^(b-1) is unused. The
layers TDQ quantises are every Conv2d and Linear of the UNet; on a transformer denoiser (SD3,
FLUX, DiT, PixArt) the same rule takes every Linear of its blocks, embedders, adaLN modulations
and output projection plus the patch-embedding Conv2d, as PTQ4DiT (Wu et al., arXiv 2405.16005)
quantises all of DiT's linear layers. `install` swaps each one's forward for one on its
fake-quantised input (step `ActSteps.current[layer]`) and precomputed weight.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from harness.errors import DiffbenchError
from harness.method import MethodHandle
from methods._common.unet import require_denoiser

# what every quantisation method changes, on either kind of denoiser
TOUCHES = ("unet.weights", "unet.activations", "transformer.weights", "transformer.activations")
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


# --- quantised layers -----------------------------------------------------------------------
def require_quant_denoiser(pipe: Any, method: str) -> torch.nn.Module:
    """The pipeline's denoiser (a UNet, or a transformer with blocks), or a one-line error."""
    return require_denoiser(pipe, method)[1]


def is_unet(pipe: Any, denoiser: torch.nn.Module) -> bool:
    """The denoiser is the pipeline's UNet (calibrated by hand-run sampling, not the call)."""
    return getattr(pipe, "unet", None) is denoiser


class ActSteps:
    """Input step size of every quantised layer for the denoiser call in progress, shape (L,)."""

    def __init__(self, current: torch.Tensor | None = None):
        self.current = current


def quant_layers(denoiser: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """Every Conv2d and Linear of the denoiser in module order: the layers TDQ quantises."""
    return [(n, m) for n, m in denoiser.named_modules()
            if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]


# --- calibration ---------------------------------------------------------------------------
class Calibration(NamedTuple):
    """What a calibration pass over the FP sampler leaves: ranges and distillation data."""

    ranges: torch.Tensor  # (L, T) percentile |x| of each layer's input at each sampler step
    timesteps: torch.Tensor  # (T,) the sampler's timesteps
    features: torch.Tensor  # (L,) input values per sample of each layer (LSQ's N)
    x0: torch.Tensor | None = None  # UNet: (N, C, H, W) the FP model's final latents
    cond: torch.Tensor | None = None  # UNet: (N, tokens, dim) their prompts' text embeddings
    uncond: torch.Tensor | None = None  # UNet: (1, tokens, dim) the empty prompt's
    calls: list | None = None  # transformer: the recorded denoiser calls (calls.Call)


class RangeRecorder:
    """Forward pre-hooks: the largest percentile |x| of each layer's input at each step."""

    def __init__(self, n_layers: int, n_steps: int, percentile: float):
        self.ranges = torch.zeros(n_layers, n_steps)
        self.features = torch.zeros(n_layers, dtype=torch.long)
        self.percentile, self.step = percentile, 0

    def hook(self, index: int) -> Callable:
        def record(module: torch.nn.Module, args: tuple) -> None:
            x = args[0]
            value = abs_percentile(x, self.percentile).cpu()
            self.ranges[index, self.step] = torch.maximum(self.ranges[index, self.step], value)
            self.features[index] = x[0].numel()

        return record


def _kernel(module: torch.nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    if isinstance(module, torch.nn.Conv2d):
        return module._conv_forward(x, weight, module.bias)
    return F.linear(x, weight, module.bias)


def quantized_forward(module: torch.nn.Module, index: int, acts: ActSteps, a_bits: int,
                      weight: Callable[[], torch.Tensor]) -> Callable[[torch.Tensor], Any]:
    """Layer forward on the fake-quantised input (step acts.current[index]) and weight()."""

    def forward(x: torch.Tensor) -> torch.Tensor:
        return _kernel(module, fake_quant(x, acts.current[index], a_bits), weight())

    return forward


def weight_steps(layers: list[tuple[str, torch.nn.Module]], bits: int) -> dict[str, torch.Tensor]:
    """Per-output-channel min-max weight steps, artifact keys `w_step.<layer>`."""
    return {f"w_step.{name}": channel_steps(m.weight, bits) for name, m in layers}


def weight_report(layers: list[tuple[str, torch.nn.Module]], w_bits: int, a_bits: int) -> dict:
    """Leaderboard columns: bit widths and the quantised layers' weight bytes, packed vs FP."""
    fp = sum(m.weight.numel() * m.weight.element_size() for _, m in layers)
    packed = sum(quantized_weight_bytes(m.weight.numel(), w_bits, m.weight.shape[0])
                 for _, m in layers)
    return {"weight_bits": w_bits, "act_bits": a_bits, "weight_bytes_quantized": packed,
            "weight_bytes_fp": fp, "quantized_layers": len(layers)}


def install(handle: MethodHandle, layers: list[tuple[str, torch.nn.Module]], acts: ActSteps,
            config: Any, artifact: dict[str, torch.Tensor]) -> None:
    """Swap each layer's forward for one on its fake-quantised input and precomputed weight."""
    for i, (name, m) in enumerate(layers):
        if f"w_step.{name}" not in artifact:
            raise DiffbenchError(f"{handle.name}: prepared weights lack layer '{name}' "
                                 "(prepared for another architecture?)")
        weight = artifact.get(f"weight.{name}.weight", m.weight).detach()
        step = artifact[f"w_step.{name}"].to(m.weight.device, torch.float32)
        with torch.no_grad():
            wq = fake_quant(weight.to(m.weight.device, torch.float32), step, config.w_bits)
        handle.swap_attr(m, "forward", quantized_forward(
            m, i, acts, config.a_bits, lambda wq=wq.to(m.weight.dtype): wq))
    handle.report.update(weight_report(layers, config.w_bits, config.a_bits))


def check_layer_count(method: str, n_layers: int, n_prepared: int) -> None:
    """Refuse an artifact made for a denoiser with a different number of quantised layers."""
    if n_layers != n_prepared:
        raise DiffbenchError(f"{method}: prepared for {n_prepared} quantised layers, this denoiser "
                             f"has {n_layers} (prepared for another architecture?)")


def apply_static(pipe: Any, config: Any, artifact: dict[str, torch.Tensor]) -> MethodHandle:
    """Fake-quantise every Conv2d/Linear of the denoiser with the prepared static step sizes."""
    denoiser = require_quant_denoiser(pipe, config.method_name)
    layers = quant_layers(denoiser)
    check_layer_count(config.method_name, len(layers), artifact["a_step"].numel())
    handle = MethodHandle(pipe, config.method_name, config)
    acts = ActSteps(artifact["a_step"].to(next(denoiser.parameters()).device, torch.float32))
    install(handle, layers, acts, config, artifact)
    return handle
