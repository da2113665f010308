"""Pyramid Attention Broadcast (Zhao et al., arXiv 2408.12588): reuse attention outputs across
the stable middle steps, broadcasting cross-attention further than self-attention.

The paper observes (Sec. 3.1) that attention outputs change little between adjacent steps in
the middle of sampling (a U-shaped difference curve: large in the first and last ~15 % of the
steps, small in the ~70 % between) and that, within that segment, cross-attention varies least,
temporal attention more and spatial (self-) attention most. PAB (Sec. 3.2) therefore broadcasts
an attention layer's output to the steps after it, with a broadcast range that grows as the
variation shrinks (the "pyramid"): while the timestep t lies inside a range low < t < high the
layer is computed only at every k-th step and its last output is returned in between; outside
the range it is always computed. Counting follows the reference code (VideoSys
`pab_mgr.if_broadcast_spatial/cross`) and diffusers' hook (hooks/pyramid_attention_broadcast.py,
0.42.1): step s of the generation (0-based, counted from its first step, not from where the
range starts) broadcasts when low < t < high and s % k != 0, and every computed output, inside
the range or not, is the one reused. Both count a layer's calls, which is the step index when
the denoiser runs once per step (the CFG batch is one call); ours counts steps and keeps
outputs per denoiser call within the step. t is the scheduler's timestep of the step
(methods/_common/attention_cache.py). Roles: self-attention
(DiT and PixArt attn1, SD3's joint attention `attn` and SD3.5's second self-attention `attn2`,
FLUX's double- and single-block `attn`) takes the "spatial" range, a layer with
`is_cross_attention` (PixArt's attn2) the "cross" range; video models' temporal attention has
no counterpart here, and PAB's optional MLP broadcast is not implemented (nor is it in
diffusers). Defaults: spatial k = 2 inside (100, 800) (diffusers' defaults, VideoSys docs'
example); cross k = 5 inside (100, 900) (VideoSys docs' example; diffusers leaves
cross-attention off). Outputs are dropped with every new generation; a call outside the
runner's StepContext computes everything. k = 1 everywhere is the unchanged pipeline.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from harness.errors import DiffbenchError
from harness.method import MethodHandle, register_method
from harness.params import param
from harness.steps import StepContext
from methods._common.attention_cache import (
    TimestepCache,
    attention_layers,
    check_ranges,
    first_input,
    within,
)
from methods._common.blocks import denoiser_blocks

_T = "(scheduler timesteps, 0..1000)"


@register_method("pab", touches=("transformer.blocks",))
@dataclass(frozen=True)
class PABConfig:
    """PAB's broadcast per attention type: every how many steps, inside which timesteps."""

    spatial_skip_range: int = param(2, "k: self-attention is computed at the steps s with "
                                    "s % k == 0 inside the spatial range and its last output "
                                    "reused at the others (1 = always compute)", low=1, high=1000)
    spatial_low: int = param(100, f"spatial range: broadcast only at timesteps t > this {_T}",
                             low=-1, high=1001)
    spatial_high: int = param(800, f"spatial range: broadcast only at timesteps t < this {_T}",
                              low=-1, high=1001)
    cross_skip_range: int = param(5, "k for cross-attention (PixArt's attn2), the paper's widest "
                                  "broadcast (0 or 1 = always compute)", low=0, high=1000)
    cross_low: int = param(100, f"cross range: broadcast only at timesteps t > this {_T}",
                           low=-1, high=1001)
    cross_high: int = param(900, f"cross range: broadcast only at timesteps t < this {_T}",
                            low=-1, high=1001)

    def __post_init__(self) -> None:
        check_ranges(self, "pab", ("spatial", "cross"))


@dataclass(frozen=True)
class Broadcast:
    """One attention type's broadcast: every `every` steps, inside low < t < high."""

    every: int
    low: int
    high: int

    def reuses(self, step: int, t: float | None) -> bool:
        """PAB's decision (VideoSys `if_broadcast_*`): reuse at step s when s % k != 0 inside."""
        return self.every > 1 and step % self.every != 0 and within(t, self.low, self.high)


def broadcasts(config: PABConfig) -> dict[str, Broadcast]:
    """The broadcast of each role ("self" takes the spatial range)."""
    return {"self": Broadcast(config.spatial_skip_range, config.spatial_low, config.spatial_high),
            "cross": Broadcast(config.cross_skip_range, config.cross_low, config.cross_high)}


class PyramidBroadcast(TimestepCache):
    """The last computed output of each attention layer, per denoiser call within the step."""

    def wrap(self, key: str, broadcast: Broadcast, forward: Any) -> Any:
        """The layer's forward: its last output on broadcast steps, else computed and kept."""

        def run(*args: Any, **kwargs: Any) -> Any:
            slot = (key, self.call)
            batch = first_input(args, kwargs).shape[0]
            hit = self.store.get(slot)
            if (hit is not None and hit[0] == batch and self.driven
                    and broadcast.reuses(self.ctx.step, self.t)):
                return hit[1]
            out = forward(*args, **kwargs)
            if self.driven:
                self.store[slot] = (batch, out)
            return out

        return run


def apply(pipe: Any, config: PABConfig, ctx: StepContext) -> MethodHandle:
    """Wrap every attention layer that broadcasts; a denoiser pre-hook reads step and timestep."""
    layers = attention_layers(denoiser_blocks(pipe, "pab"))
    if not layers:
        raise DiffbenchError(f"pab needs attention layers in the transformer blocks; "
                             f"{type(pipe.transformer).__name__} has none")
    handle = MethodHandle(pipe, "pab", config)
    ranges = broadcasts(config)
    active = [(key, ranges[role], layer) for key, role, layer in layers if ranges[role].every > 1]
    if not active:
        return handle  # every layer computes at every step: the unchanged pipeline
    cache = PyramidBroadcast(ctx, pipe)
    handle.add_hook(pipe.transformer.register_forward_pre_hook(cache.before_denoiser,
                                                               with_kwargs=True))
    for key, broadcast, layer in active:
        handle.swap_attr(layer, "forward", cache.wrap(key, broadcast, layer.forward))
    handle.on_remove(cache.clear)
    return handle
