"""Skip-Tuning (Ma et al., arXiv 2402.15170): scale the UNet's encoder-to-decoder skip features.

Every skip connection of the UNet (the tensors the down path hands to the up blocks as
`res_hidden_states_tuple`: conv_in's output, each down resnet's and each downsampler's output)
is multiplied by rho_k before the up block concatenates it, training-free (paper, "Skip-Tuning").
As in the paper, rho_k is interpolated linearly over skip depth, from rho_top at the shallowest skip
(full resolution, k = 0) to rho_bottom at the deepest (k = K - 1). The scaling is applied by a
forward pre-hook on each up block, so whatever it receives (ControlNet residuals included) is
scaled; the middle block and the decoder's own path are untouched. The paper's time-dependent
variants and its searched per-model rho values are not reproduced (fixed, user-given rho pair).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from harness.errors import DiffbenchError
from harness.method import MethodHandle, register_method
from harness.params import param
from harness.steps import StepContext
from methods._common.unet import require_unet


@register_method("skip_tuning", touches=("unet.skips",))
@dataclass(frozen=True)
class SkipTuningConfig:
    """Skip-Tuning: skip-connection scale at the shallowest and the deepest UNet skip."""

    rho_top: float = param(1.0, "rho of the shallowest skip (conv_in output, full resolution)",
                           low=0.0, high=2.0)
    rho_bottom: float = param(0.8, "rho of the deepest skip (linear in depth in between)",
                              low=0.0, high=2.0)


def skip_scales(num_skips: int, rho_top: float, rho_bottom: float) -> list[float]:
    """rho_k for skips k = 0 (shallowest) .. K - 1 (deepest), linear in k (paper, "Skip-Tuning")."""
    if num_skips == 1:
        return [rho_top]
    fractions = [k / (num_skips - 1) for k in range(num_skips)]
    return [rho_top * (1.0 - f) + rho_bottom * f for f in fractions]  # exact at both ends


def up_block_scales(unet: Any, config: SkipTuningConfig) -> list[tuple[float, ...]]:
    """Per up block, the rho of each tensor of its `res_hidden_states_tuple`, in tuple order.

    The UNet hands up block i the last len(resnets) of the remaining skips (deepest first), so
    up block 0 gets the deepest ones; a tuple is ordered shallow to deep, as the skips were made.
    """
    sizes = [len(block.resnets) for block in unet.up_blocks]
    scales = skip_scales(sum(sizes), config.rho_top, config.rho_bottom)
    out, end = [], len(scales)
    for size in sizes:
        out.append(tuple(scales[end - size:end]))
        end -= size
    return out


def _scale(skips: tuple, rhos: tuple[float, ...]) -> tuple:
    if len(skips) != len(rhos):
        raise DiffbenchError(f"skip_tuning: an up block received {len(skips)} skip tensors, "
                             f"expected {len(rhos)}; unsupported UNet layout")
    return tuple(s if rho == 1.0 else s * rho for s, rho in zip(skips, rhos))


def scale_hook(rhos: tuple[float, ...]) -> Any:
    """Forward pre-hook of an up block: multiply its incoming skip tensors by their rho."""

    def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if "res_hidden_states_tuple" in kwargs:
            kwargs = {**kwargs, "res_hidden_states_tuple":
                      _scale(kwargs["res_hidden_states_tuple"], rhos)}
        elif len(args) > 1:  # forward(hidden_states, res_hidden_states_tuple, temb, ...)
            args = (args[0], _scale(args[1], rhos), *args[2:])
        return args, kwargs

    return hook


def apply(pipe: Any, config: SkipTuningConfig, ctx: StepContext) -> MethodHandle:
    """Register a skip-scaling pre-hook on every up block whose skips are not all at rho 1."""
    unet = require_unet(pipe, "skip_tuning", "pipe.unet with skip connections")
    handle = MethodHandle(pipe, "skip_tuning", config)
    for block, rhos in zip(unet.up_blocks, up_block_scales(unet, config)):
        if any(rho != 1.0 for rho in rhos):
            handle.add_hook(block.register_forward_pre_hook(scale_hook(rhos), with_kwargs=True))
    return handle
