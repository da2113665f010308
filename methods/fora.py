"""FORA (Selvaraju et al., arXiv 2407.01425): reuse every DiT block's attention and MLP outputs.

Fast-Forward Caching (paper Sec. 3, static caching): on key steps, every N steps from step 0,
each transformer block runs in full and the outputs of its attention and MLP layers are cached;
on the other steps those layers return their cached outputs, while the rest of the block (the
adaLN modulation and gates of the current step, the residual adds) still runs. Implemented on
diffusers' BasicTransformerBlock (DiT: adaLN-Zero; PixArt: adaLN-single, where the
cross-attention `attn2` is cached too) by overriding `attn1` / `attn2` / `ff` forward on the
instance. `start_step` keeps every step before it a full step (the paper caches from the
first step). Cached outputs are kept per denoiser call within a step (DiT's CFG batch is one
call) and dropped when a generation ends, so nothing leaks between pipeline calls.
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

CACHED_LAYERS = ("attn1", "attn2", "ff")  # BasicTransformerBlock's residual branches


@register_method("fora", touches=("transformer.blocks",))
@dataclass(frozen=True)
class ForaConfig:
    """FORA cache interval and the step caching starts from."""

    interval: int = param(3, "N: attention/MLP outputs recomputed every N steps (1 = never reuse)",
                          low=1, high=1000)
    start_step: int = param(0, "every step before this one runs in full; caching starts here",
                            low=0, high=100000)


def is_key_step(step: int, interval: int, start_step: int = 0) -> bool:
    """FORA's static schedule (Sec. 3): full compute before start_step, then every N steps."""
    return step < start_step or (step - start_step) % interval == 0


def transformer_blocks(pipe: Any, method: str) -> list[torch.nn.Module]:
    """The denoiser's transformer blocks, or a one-line error naming what the pipeline lacks."""
    transformer = getattr(pipe, "transformer", None)
    if transformer is None:
        raise DiffbenchError(f"{method} needs a transformer denoiser (pipe.transformer); "
                             f"{type(pipe).__name__} has none")
    blocks = getattr(transformer, "transformer_blocks", None)
    if not blocks:
        raise DiffbenchError(f"{method} needs transformer blocks (transformer.transformer_blocks);"
                             f" {type(transformer).__name__} has none")
    return list(blocks)


class StepCache:
    """Tensors kept from a key step for the next non-key steps, per denoiser call in the step.

    A pre-hook on the denoiser (`before_denoiser`) sets `reuse` (this call may read the cache)
    and `keep` (this call must fill it for the next step), as in DeepCache's `_Cache`.
    `is_key(step, num_steps)` is the method's schedule; step 0 is always a key step.
    """

    def __init__(self, ctx: StepContext, is_key: Callable[[int, int], bool]):
        self.ctx, self.is_key = ctx, is_key
        self.store: dict[tuple[Any, int], Any] = {}
        self.shape: dict[int, torch.Size] = {}
        self.call, self.last = 0, (-1, -1)  # call index within the step; (generation, step)
        self.reuse = self.keep = False

    def before_denoiser(self, module: Any, args: tuple, kwargs: dict) -> None:
        now = (self.ctx.generation, self.ctx.step)
        if now[0] != self.last[0]:
            self.clear()  # a new pipeline call: nothing carries over
        self.call = self.call + 1 if now == self.last else 0
        self.last = now
        sample = args[0] if args else kwargs["hidden_states"]
        step, total = self.ctx.step, self.ctx.num_steps
        driven = 0 <= step < total  # a call outside StepContext.generate: never reuse
        self.reuse = (driven and not self.is_key(step, total)
                      and self.shape.get(self.call) == sample.shape)
        self.keep = (driven and not self.reuse and step + 1 < total
                     and not self.is_key(step + 1, total))
        if not self.reuse:
            self.shape[self.call] = sample.shape

    def get(self, key: Any) -> Any:
        """The cached value of `key` for this call, or None (not a reuse step, or not stored)."""
        return self.store.get((key, self.call)) if self.reuse else None

    def put(self, key: Any, value: Any) -> None:
        """Keep `value` when the next step reuses it; otherwise drop any stale entry."""
        if self.keep:
            self.store[(key, self.call)] = value
        else:
            self.store.pop((key, self.call), None)

    def clear(self) -> None:
        self.store.clear()
        self.shape.clear()


def cached_forward(cache: StepCache, key: Any, forward: Callable[..., Any]) -> Callable[..., Any]:
    """A layer forward that returns its cached output on non-key steps (paper Sec. 3)."""

    def run(*args: Any, **kwargs: Any) -> Any:
        out = cache.get(key)
        if out is None:
            out = forward(*args, **kwargs)
            cache.put(key, out)
        return out

    return run


def apply(pipe: Any, config: ForaConfig, ctx: StepContext) -> MethodHandle:
    """Wrap every block's attention / MLP forward with the cache; count denoiser calls."""
    blocks = transformer_blocks(pipe, "fora")
    layers = [(f"{i}.{name}", getattr(block, name)) for i, block in enumerate(blocks)
              for name in CACHED_LAYERS if getattr(block, name, None) is not None]
    if not layers:
        raise DiffbenchError(f"fora needs attention/MLP layers ({', '.join(CACHED_LAYERS)}) in "
                             f"the transformer blocks; {type(blocks[0]).__name__} has none")
    handle = MethodHandle(pipe, "fora", config)
    if config.interval == 1:
        return handle  # every step is a key step: the unchanged pipeline
    cache = StepCache(ctx, lambda step, _: is_key_step(step, config.interval, config.start_step))
    handle.add_hook(pipe.transformer.register_forward_pre_hook(cache.before_denoiser,
                                                               with_kwargs=True))
    for key, layer in layers:
        handle.swap_attr(layer, "forward", cached_forward(cache, key, layer.forward))
    handle.on_remove(cache.clear)
    return handle
