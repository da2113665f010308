"""DeepCache (Ma et al., arXiv 2312.00858): reuse the UNet's high-level features across steps.

On a full ("key") step the whole UNet runs and the outputs of its deep part are cached. On the
other steps only the shallow skip branch runs and the deep part returns its cached outputs, so
the shallow up layers receive the cached high-level feature (paper Sec. 3.2, Eq. 6). Skip
branches are numbered as in the reference code (DeepCache 0.1.1, `DeepCacheSDHelper`,
`cache_branch_id`): branch = 3 x block + layer. On non-key steps the mid block and every down
block deeper than `block` are cached, and so is down block `block` itself when layer = 0, else
its resnet/attention layers j >= layer and its downsampler (whose output only cached modules
read); up blocks are counted from the output (block 0 = the last up block): deeper ones are
cached, and in up block `block` the layers whose index from the output exceeds `layer`. Branch
0 (the paper's SD-1.5 setting) keeps only conv_in, the last layer of the last up block and
conv_out live; 3b + 2 keeps the whole down/up block pair b (but the downsampler). Key steps are
uniform (every N from step 0) or the reference's non-uniform "quadratic" schedule: ceil(T / N)
key steps, step 0 and the integer parts of a power-law spacing around a centre step
(`sample_from_quad_center`: start power 1.4, lowered by 0.02 until the count is right; it
computes with complex roots left of the centre and keeps their real parts, as reproduced here).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import torch

from harness.errors import DiffbenchError
from harness.method import MethodHandle, register_method
from harness.params import param
from harness.steps import StepContext
from methods._common.cache import StepCache, cached_forward
from methods._common.unet import require_unet


@register_method("deepcache", touches=("unet.block_outputs",))
@dataclass(frozen=True)
class DeepCacheConfig:
    """DeepCache cache interval, skip branch (the reference's cache_branch_id) and schedule."""

    interval: int = param(3, "N: full UNet every N steps on average (1 = never reuse)",
                          low=1, high=1000)
    branch: int = param(0, "skip branch kept live, the reference's cache_branch_id: 3 x block + "
                        "layer (0 = shallowest: conv_in, last up layer, conv_out)", low=0,
                        high=47)
    schedule: str = param("uniform", "key-step placement: every N, or the reference's "
                          "non-uniform power law around `center`", choices=("uniform", "quadratic"))
    center: float = param(0.3, "quadratic schedule: centre step as a fraction of the steps "
                          "(rounded; the reference's `center` = 15 of 50)", low=0.0, high=1.0)
    power: float = param(1.4, "quadratic schedule: starting power of the spacing (the reference's "
                         "`pow`)", low=1.0, high=4.0)


POWER_STEP = 0.02  # the reference lowers the power by this until it finds ceil(T / N) key steps


def quadratic_keys(num_steps: int, count: int, center: int, power: float) -> list[int] | None:
    """The reference's `sample_from_quad_center`: `count` key steps, 0 and center + the integer
    parts of x^p for x on a grid from (-center)^(1/p) to (T - center)^(1/p) (complex roots left
    of the centre, real part kept); None when no power > 1 gives `count` distinct steps."""
    while power > 1.0:
        lo, hi = complex(-center) ** (1 / power), (num_steps - center) ** (1 / power)
        grid = np.linspace(lo, hi, count + 1) ** power  # numpy's arithmetic, as the reference
        values = np.unique(np.trunc(grid.real).astype(np.int64))
        keys = [0] + [int(v) + center for v in values[1:-1]]
        if len(keys) == count:
            return keys
        power -= POWER_STEP
    return None


@lru_cache(maxsize=64)
def key_steps(num_steps: int, interval: int, schedule: str = "uniform", center: float = 0.3,
              power: float = 1.4) -> frozenset[int]:
    """Steps that run the full UNet: every N-th from 0, or the reference's quadratic ones."""
    if schedule == "uniform" or interval == 1:
        return frozenset(range(0, num_steps, interval))
    count, centre = math.ceil(num_steps / interval), round(center * num_steps)
    keys = quadratic_keys(num_steps, count, centre, power)
    if keys is None:
        raise DiffbenchError(f"deepcache: no quadratic schedule of {count} key steps in "
                             f"{num_steps} around step {centre} (power {power} down to 1); "
                             "lower `center` or `interval`, or use schedule='uniform'")
    return frozenset(keys)


def _pairs(block: Any, keep: Any) -> list[tuple[str, torch.nn.Module]]:
    """A block's resnet j and attention j for every j with keep(j) false: cached layers."""
    attentions = list(getattr(block, "attentions", None) or [])
    out = []
    for j, resnet in enumerate(block.resnets):
        if not keep(j):
            out.append((f"resnets.{j}", resnet))
            if j < len(attentions):
                out.append((f"attentions.{j}", attentions[j]))
    return out


def deep_modules(unet: Any, branch: int) -> list[tuple[str, torch.nn.Module]]:
    """The UNet modules cached on non-key steps for skip branch `branch` (3 x block + layer)."""
    n = len(unet.down_blocks)
    if not 0 <= branch <= 3 * (n - 1) + 2:
        raise DiffbenchError(f"deepcache.branch={branch} is out of range for this UNet; "
                             f"allowed [0, {3 * (n - 1) + 2}]")
    block, layer = divmod(branch, 3)
    mods = []
    for i, down in enumerate(unet.down_blocks):
        if i > block or (i == block and layer == 0):
            mods.append((f"down_blocks.{i}", down))
        elif i == block:
            live = lambda j: j < layer  # noqa: E731
            mods += [(f"down_blocks.{i}.{name}", m) for name, m in _pairs(down, live)]
            mods += [(f"down_blocks.{i}.downsamplers.{k}", m)
                     for k, m in enumerate(down.downsamplers or [])]
    if unet.mid_block is not None:
        mods.append(("mid_block", unet.mid_block))
    for i, up in enumerate(unet.up_blocks):
        depth, last = n - 1 - i, len(up.resnets) - 1  # block index counted from the output
        if depth > block:
            mods.append((f"up_blocks.{i}", up))
        elif depth == block:
            mods += [(f"up_blocks.{i}.{name}", m)
                     for name, m in _pairs(up, lambda j, last=last: last - j <= layer)]
    return mods


def apply(pipe: Any, config: DeepCacheConfig, ctx: StepContext) -> MethodHandle:
    """Wrap the cached UNet modules' forward with the step cache."""
    unet = require_unet(pipe, "deepcache")
    modules = deep_modules(unet, config.branch)
    handle = MethodHandle(pipe, "deepcache", config)
    c = config
    cache = StepCache(ctx, lambda step, total: step in key_steps(total, c.interval, c.schedule,
                                                                 c.center, c.power), "sample")
    handle.add_hook(unet.register_forward_pre_hook(cache.before_denoiser, with_kwargs=True))
    for name, module in modules:
        handle.swap_attr(module, "forward", cached_forward(cache, name, module.forward))
    handle.on_remove(cache.clear)
    return handle
