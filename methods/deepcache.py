"""DeepCache (Ma et al., arXiv 2312.00858): reuse the UNet's high-level features across steps.

On a full ("key") step the whole UNet runs and the outputs of its deep part are cached. On the
other steps only the shallow skip branch runs (conv_in, down blocks 0..b, up blocks n-1-b..n-1,
output head); the deep part (down blocks b+1.., mid block, up blocks ..n-2-b) returns its cached
outputs, so the shallow up block receives the cached high-level feature (paper Sec. 3.2, Eq. 6).
Granularity is the UNet block (branch b = the down/up block pair kept live), coarser than the
paper's per-layer skip branches. Key steps are uniform (every N) or non-uniform, denser around
a centre step with a power law (paper Sec. 3.3, "non-uniform 1:N").
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

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
    """DeepCache cache interval, skip branch and key-step schedule."""

    interval: int = param(3, "N: full UNet every N steps on average (1 = never reuse)",
                          low=1, high=1000)
    branch: int = param(0, "skip branch kept live: UNet down/up block pair index (0 = shallowest)",
                        low=0, high=16)
    schedule: str = param("uniform", "key-step placement", choices=("uniform", "quadratic"))
    center: float = param(0.3, "quadratic schedule: densest point, as a fraction of the steps",
                          low=0.0, high=1.0)
    power: float = param(1.4, "quadratic schedule: power of the spacing (1 = uniform)",
                         low=1.0, high=4.0)


@lru_cache(maxsize=64)
def key_steps(num_steps: int, interval: int, schedule: str = "uniform", center: float = 0.3,
              power: float = 1.4) -> frozenset[int]:
    """Steps that run the full UNet; always includes step 0, ceil(T / N) steps in all."""
    if schedule == "uniform" or interval == 1:
        return frozenset(range(0, num_steps, interval))
    count, c = math.ceil(num_steps / interval), center * (num_steps - 1)
    while power > 1.0:
        lo, hi = -(c ** (1 / power)), (num_steps - 1 - c) ** (1 / power)
        us = [lo + (hi - lo) * i / max(count - 1, 1) for i in range(count)]
        steps = {0} | {min(num_steps - 1, max(0, round(c + math.copysign(abs(u) ** power, u))))
                       for u in us}
        if len(steps) >= count:
            return frozenset(steps)
        power -= 0.05  # too dense near the centre: relax the power (as the paper's code does)
    return key_steps(num_steps, interval)


def deep_modules(unet: Any, branch: int) -> list[tuple[str, torch.nn.Module]]:
    """The UNet modules skipped on non-key steps for skip branch `branch`."""
    n = len(unet.down_blocks)
    if not 0 <= branch <= n - 2:
        raise DiffbenchError(f"deepcache.branch={branch} is out of range for this UNet; "
                             f"allowed [0, {n - 2}]")
    mods = [(f"down_blocks.{i}", unet.down_blocks[i]) for i in range(branch + 1, n)]
    if unet.mid_block is not None:
        mods.append(("mid_block", unet.mid_block))
    mods += [(f"up_blocks.{i}", unet.up_blocks[i]) for i in range(0, n - 1 - branch)]
    return mods


def apply(pipe: Any, config: DeepCacheConfig, ctx: StepContext) -> MethodHandle:
    """Wrap the deep UNet modules' forward with the cache and count UNet calls per step."""
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
