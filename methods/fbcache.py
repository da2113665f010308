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
from methods._common.block_skip import BlockSkip, SkipState, rate_param
from methods._common.blocks import Block, add_stream, denoiser_blocks
from methods._common.cache import relative_l1


@register_method("fbcache", touches=("transformer.blocks",))
@dataclass(frozen=True)
class FBCacheConfig:
    """First Block Cache: the relative residual change below which the other blocks are skipped."""

    threshold: float = param(0.08, "skip the other blocks when mean|r - r'| / mean|r'| of the "
                             "first block's residual is at most this (0 = never skip)",
                             low=0.0, high=100.0)
    rate: float = rate_param()


@dataclass
class _CallState(SkipState):
    """Per call index, besides the skip state (`base`: the first block's output streams on the
    last full call): that call's first-block residual."""

    head_residual: torch.Tensor | None = None


class FirstBlockCache(BlockSkip):
    """The per-generation, per-call decision and what a skip returns."""

    state_cls = _CallState

    def __init__(self, ctx: StepContext, config: FBCacheConfig, stats: dict[str, int]):
        super().__init__(ctx, stats, config.rate)
        self.threshold = config.threshold

    def decide(self, residual: torch.Tensor, st: _CallState) -> bool:
        """Whether this call skips the other blocks (a full call must have come before)."""
        prev = st.head_residual
        if prev is None or st.residual is None or prev.shape != residual.shape:
            return False
        if self.rate > 0:
            return self.scheduled_skip()
        return self.threshold > 0 and relative_l1(residual, prev) <= self.threshold

    def head(self, block: Block, forward: Any) -> Any:
        """The first block: run it, decide, and on a skip add the cached residual."""

        def run(*args: Any, **kwargs: Any) -> Any:
            out = forward(*args, **kwargs)
            hidden_in, _ = block.inputs(args, kwargs)
            hidden, encoder = block.outputs(out)
            residual = hidden - hidden_in
            st = self.state()
            st.skip = self.decide(residual, st)
            self.count(st.skip)
            if st.skip:
                return block.result(hidden + st.residual[0], add_stream(encoder, st.residual[1]))
            st.head_residual, st.base = residual, (hidden, encoder)
            return out

        return run


def apply(pipe: Any, config: FBCacheConfig, ctx: StepContext) -> MethodHandle:
    """Wrap the first block (decision), the others (skip) and the last (tail residual)."""
    blocks = denoiser_blocks(pipe, "fbcache")
    handle = MethodHandle(pipe, "fbcache", config)
    if (config.threshold == 0 and config.rate == 0) or len(blocks) < 2:
        return handle
    FirstBlockCache(ctx, config, handle.stats).install(handle, pipe, blocks)
    return handle
