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
dependent, so FLOPs and speed vary with the prompt and the model's weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from harness.method import MethodHandle, register_method
from harness.params import param
from harness.steps import StepContext
from methods._common.blocks import Block, denoiser_blocks, passthrough
from methods._common.cache import GenerationCache


@register_method("fbcache", touches=("transformer.blocks",))
@dataclass(frozen=True)
class FBCacheConfig:
    """First Block Cache: the relative residual change below which the other blocks are skipped."""

    threshold: float = param(0.08, "skip the other blocks when mean|r - r'| / mean|r'| of the "
                             "first block's residual is at most this (0 = never skip)",
                             low=0.0, high=100.0)


@dataclass
class _CallState:
    """What the last full call of this call index left: first-block residual and output, and
    the remaining blocks' residual per stream."""

    head_residual: torch.Tensor | None = None
    head_out: tuple[Any, Any] = (None, None)
    tail_residual: tuple[Any, Any] | None = None
    skip: bool = False


def relative_change(residual: torch.Tensor, previous: torch.Tensor) -> float:
    """mean|r - r'| / mean|r'|: the decision statistic (ParaAttention, diffusers' FBCache)."""
    return ((residual - previous).abs().mean() / previous.abs().mean()).item()


def _add(a: Any, b: Any) -> Any:
    return a if a is None or b is None else a + b


def _sub(a: Any, b: Any) -> Any:
    return None if a is None or b is None else a - b


class FirstBlockCache(GenerationCache):
    """The per-generation, per-call decision and what a skip returns."""

    def __init__(self, ctx: StepContext, threshold: float):
        super().__init__(ctx)
        self.threshold = threshold

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
            prev = st.head_residual
            st.skip = (self.threshold > 0 and prev is not None and st.tail_residual is not None
                       and prev.shape == residual.shape
                       and relative_change(residual, prev) <= self.threshold)
            if st.skip:
                return block.result(hidden + st.tail_residual[0],
                                    _add(encoder, st.tail_residual[1]))
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
                st.tail_residual = (hidden - st.head_out[0], _sub(encoder, st.head_out[1]))
            return out

        return run


def apply(pipe: Any, config: FBCacheConfig, ctx: StepContext) -> MethodHandle:
    """Wrap the first block (decision), the others (skip) and the last (tail residual)."""
    blocks = denoiser_blocks(pipe, "fbcache")
    handle = MethodHandle(pipe, "fbcache", config)
    if config.threshold == 0 or len(blocks) < 2:
        return handle
    cache = FirstBlockCache(ctx, config.threshold)
    handle.add_hook(pipe.transformer.register_forward_pre_hook(cache.before_denoiser,
                                                               with_kwargs=True))
    head, *others = blocks
    handle.swap_attr(head.module, "forward", cache.head(head, head.module.forward))
    for i, b in enumerate(others):
        handle.swap_attr(b.module, "forward",
                         cache.rest(b, b.module.forward, tail=i == len(others) - 1))
    handle.on_remove(cache.clear)
    return handle
