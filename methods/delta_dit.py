"""Delta-DiT (Chen et al., arXiv 2406.01125): reuse the cached delta of a range of DiT blocks.

Delta-Cache (paper Sec. 3, "Delta-Cache"): on a key step, every N steps from step 0, all blocks
run and the deviation of a contiguous block range, Delta = F_range(x) - x (range output minus
range input), is stored; on the other steps that range is not run and its output is the current
input plus the cached Delta, so the current step's input still reaches the later blocks (the
paper's fix for the bias of caching plain features). Stage-adaptive placement (paper Sec. 3,
"Delta-DiT", boundary b): the front blocks shape the outline and the rear blocks the details,
so the early, noisy steps (step index < round(switch * T), i.e. timestep t > b) cache the REAR
`num_blocks` blocks and keep the outline-forming front blocks live; from that step on the FRONT
`num_blocks` blocks are cached and the detail-forming rear blocks stay live. switch = 1 caches
the rear range on every step, switch = 0 the front range. b is given as a fraction of the steps
(the paper gives it in steps of a fixed schedule). Deltas are kept per denoiser call within a
step and dropped when a generation ends. MMDiT blocks (SD3, FLUX: double then single blocks)
carry two token streams: the range's delta is kept for both (methods/_common/blocks.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from harness.errors import DiffbenchError
from harness.method import MethodHandle, register_method
from harness.params import param
from harness.steps import StepContext
from methods._common.blocks import Block, denoiser_blocks
from methods._common.cache import StepCache


@register_method("delta_dit", touches=("transformer.blocks",))
@dataclass(frozen=True)
class DeltaDiTConfig:
    """Delta-DiT cache interval, cached block count and the rear/front switch point."""

    interval: int = param(2, "N: the cached block range runs in full every N steps "
                             "(1 = never reuse)", low=1, high=1000)
    num_blocks: int = param(2, "N_c: contiguous blocks whose delta is cached (front or rear)",
                            low=1, high=1000)
    switch: float = param(0.5, "b as a fraction of the steps: steps before it cache the rear "
                               "blocks, steps from it on the front blocks", low=0.0, high=1.0)


def cached_range(step: int, num_steps: int, num_blocks: int, depth: int,
                 switch: float) -> tuple[int, int]:
    """Block range [lo, hi) whose delta is reused at `step`: rear before b, front from b on."""
    if step < round(switch * num_steps):
        return depth - num_blocks, depth
    return 0, num_blocks


class _DeltaCache(StepCache):
    """Range inputs and deltas of key steps; `ranges` are those the next non-key steps use."""

    def __init__(self, config: DeltaDiTConfig, ctx: StepContext, depth: int):
        super().__init__(ctx, lambda step, _: step % config.interval == 0)
        self.config, self.depth = config, depth
        self.now: tuple[int, int] = (0, 0)  # range reused by this call (when self.reuse)
        self.ranges: set[tuple[int, int]] = set()  # ranges whose delta this call must record
        self.inputs: dict[tuple[int, int], torch.Tensor] = {}

    def range_at(self, step: int) -> tuple[int, int]:
        c = self.config
        return cached_range(step, self.ctx.num_steps, c.num_blocks, self.depth, c.switch)

    def before_denoiser(self, module: Any, args: tuple, kwargs: dict) -> None:
        super().before_denoiser(module, args, kwargs)
        step, total = self.ctx.step, self.ctx.num_steps
        self.now = self.range_at(step)
        self.ranges = set()
        if self.keep:  # record the ranges reused until the next key step
            nxt = step + 1
            while nxt < total and not self.is_key(nxt, total):
                self.ranges.add(self.range_at(nxt))
                nxt += 1
        self.inputs.clear()

    def wrap(self, index: int, block: Block, forward: Callable[..., Any]) -> Callable[..., Any]:
        def delta_forward(*args: Any, **kwargs: Any) -> Any:
            hidden, encoder = block.inputs(args, kwargs)
            lo, hi = self.now
            if self.reuse and lo <= index < hi:
                delta = self.get(self.now)
                if delta is not None:  # Delta-Cache: range output = current input + Delta
                    if index != lo:
                        return block.result(hidden, encoder)
                    d_hidden, d_encoder = delta
                    return block.result(hidden + d_hidden, encoder if d_encoder is None
                                        or encoder is None else encoder + d_encoder)
            for rng in self.ranges:
                if rng[0] == index:
                    self.inputs[rng] = (hidden, encoder)
            out = forward(*args, **kwargs)
            for rng in self.ranges:
                if rng[1] == index + 1:
                    h_in, e_in = self.inputs.pop(rng)
                    h_out, e_out = block.outputs(out)
                    self.put(rng, (h_out - h_in,
                                   None if e_out is None or e_in is None else e_out - e_in))
            return out

        return delta_forward

    def clear(self) -> None:
        super().clear()
        self.inputs.clear()


def apply(pipe: Any, config: DeltaDiTConfig, ctx: StepContext) -> MethodHandle:
    """Wrap every block's forward: record range deltas on key steps, add them on the others."""
    blocks = denoiser_blocks(pipe, "delta_dit")
    if config.num_blocks > len(blocks):
        raise DiffbenchError(f"delta_dit.num_blocks={config.num_blocks} is out of range for this "
                             f"transformer; allowed [1, {len(blocks)}]")
    handle = MethodHandle(pipe, "delta_dit", config)
    if config.interval == 1:
        return handle  # every step is a key step: the unchanged pipeline
    cache = _DeltaCache(config, ctx, len(blocks))
    handle.add_hook(pipe.transformer.register_forward_pre_hook(cache.before_denoiser,
                                                               with_kwargs=True))
    for index, block in enumerate(blocks):
        handle.swap_attr(block.module, "forward", cache.wrap(index, block, block.module.forward))
    handle.on_remove(cache.clear)
    return handle
