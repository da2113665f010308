"""First Block Cache (ParaAttention; diffusers hooks/first_block_cache.py): skip the other blocks
when the first block's residual barely changed since the last computed step.

Every denoiser call runs the first transformer block; its image-stream residual r = out - in
is compared with the residual r' of the last call that computed everything:
diff = mean|r - r'| / mean|r'|. If diff <= `threshold`, the remaining blocks are skipped and the
model output is the first block's output plus the residual the remaining blocks added on that
last full call (per stream: image tokens, and text tokens on MMDiT blocks); otherwise every
block runs and r', that residual and the first block's output are stored. Decisions are per
denoiser call within a step (a pipeline that splits CFG into two calls keeps two states) and
start afresh with every generation (the first call always computes). `threshold = 0` never
skips (the identity setting). Blocks in forward order as methods/_common/blocks.py gives them
(FLUX: double, then single blocks; the last single block is the tail). ParaAttention's FLUX
recommendation is 0.08 ("rdt"), diffusers' default 0.05. Inference only; a skip is data
dependent, so FLOPs and speed vary with the prompt and the model's weights. `rate` > 0 replaces
the decision by a fixed schedule skipping that share of the steps (first and last computed),
for speed rows on random weights, whose residuals do not change like a trained model's; the
handle's stats count the calls and the skipped ones (`cache_calls`, `cache_skips` columns).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from harness.method import MethodHandle, register_method
from harness.params import param
from harness.steps import StepContext
from methods._common.blocks import Block, add_stream, denoiser_blocks, passthrough, sub_stream
from methods._common.cache import GenerationCache, fixed_rate_computes, relative_l1


@register_method("fbcache", touches=("transformer.blocks",))
@dataclass(frozen=True)
class FBCacheConfig:
    """First Block Cache: the relative residual change below which the other blocks are skipped."""

    threshold: float = param(0.08, "skip the other blocks when mean|r - r'| / mean|r'| of the "
                             "first block's residual is at most this (0 = never skip)",
                             low=0.0, high=100.0)
    rate: float = param(0.0, "0: decide by the threshold (the paper); in (0, 1): skip this share "
                        "of the steps on a fixed schedule instead (random-weight speed rows)",
                        low=0.0, high=0.99)


@dataclass
class _CallState:
    """What the last full call of this call index left: first-block residual and output, and
    the remaining blocks' residual per stream."""

    head_residual: torch.Tensor | None = None
    head_out: tuple[Any, Any] = (None, None)
    tail_residual: tuple[Any, Any] | None = None
    skip: bool = False


class FirstBlockCache(GenerationCache):
    """The per-generation, per-call decision and what a skip returns."""

    def __init__(self, ctx: StepContext, config: FBCacheConfig, stats: dict[str, int]):
        super().__init__(ctx)
        self.threshold, self.rate, self.stats = config.threshold, config.rate, stats

    def decide(self, residual: torch.Tensor, st: _CallState) -> bool:
        """Whether this call skips the other blocks (a full call must have come before)."""
        prev = st.head_residual
        if prev is None or st.tail_residual is None or prev.shape != residual.shape:
            return False
        if self.rate > 0:
            return not fixed_rate_computes(self.ctx.step, self.ctx.num_steps, self.rate)
        return self.threshold > 0 and relative_l1(residual, prev) <= self.threshold

    def before_denoiser(self, module: Any, args: tuple, kwargs: dict) -> None:
        """Denoiser pre-hook: a new generation clears the states; count calls within a step."""
        self.begin_call()

    def state(self) -> _CallState:
        return self.store.setdefault(self.call, _CallState())

    def head(self, block: Block, forward: Any) -> Any:
        """The first block: run it, decide, and on a skip add the cached tail residual."""

        def run(*args: Any, **kwargs: Any) -> Any:
            out = forward(*args, **kwargs)
            hidden_in, _ = block.inputs(args, kwargs)
            hidden, encoder = block.outputs(out)
            residual = hidden - hidden_in
            st = self.state()
            st.skip = self.decide(residual, st)
            self.stats["cache_calls"] = self.stats.get("cache_calls", 0) + 1
            if st.skip:
                self.stats["cache_skips"] = self.stats.get("cache_skips", 0) + 1
                return block.result(hidden + st.tail_residual[0],
                                    add_stream(encoder, st.tail_residual[1]))
            st.head_residual, st.head_out = residual, (hidden, encoder)
            return out

        return run

    def rest(self, block: Block, forward: Any, tail: bool) -> Any:
        """Any later block: its input streams on a skip; the tail stores the residual."""
        skipped = passthrough(block)

        def run(*args: Any, **kwargs: Any) -> Any:
            st = self.state()
            if st.skip:
                return skipped(args, kwargs)
            out = forward(*args, **kwargs)
            if tail:
                hidden, encoder = block.outputs(out)
                st.tail_residual = (hidden - st.head_out[0], sub_stream(encoder, st.head_out[1]))
            return out

        return run


def apply(pipe: Any, config: FBCacheConfig, ctx: StepContext) -> MethodHandle:
    """Wrap the first block (decision), the others (skip) and the last (tail residual)."""
    blocks = denoiser_blocks(pipe, "fbcache")
    handle = MethodHandle(pipe, "fbcache", config)
    if (config.threshold == 0 and config.rate == 0) or len(blocks) < 2:
        return handle
    cache = FirstBlockCache(ctx, config, handle.stats)
    handle.add_hook(pipe.transformer.register_forward_pre_hook(cache.before_denoiser,
                                                               with_kwargs=True))
    head, *others = blocks
    handle.swap_attr(head.module, "forward", cache.head(head, head.module.forward))
    for i, b in enumerate(others):
        handle.swap_attr(b.module, "forward",
                         cache.rest(b, b.module.forward, tail=i == len(others) - 1))
    handle.on_remove(cache.clear)
    return handle
