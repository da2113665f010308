"""Per-step feature caches of the caching methods (DeepCache, FRDiff, FORA, Delta-DiT, T-GATE).

One piece of bookkeeping: a cache emptied when the runner starts a new generation
(StepContext.generation), the index of the denoiser call within the step (classifier-free
guidance may split a step into several calls), and, from the method's key-step schedule,
whether this call may reuse what a key step stored (`reuse`) and whether it must store its
outputs for the next step (`keep`). A call outside StepContext.generate never reuses.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from harness.steps import StepContext


class GenerationCache:
    """A cache dict (`store`) emptied at the first call of every new generation."""

    def __init__(self, ctx: StepContext):
        self.ctx = ctx
        self.store: dict[Any, Any] = {}
        self.generation: int | None = None
        self.call, self.last = 0, (-1, -1)  # call index within the step; (generation, step)

    def new_generation(self) -> bool:
        """Clear the cache when this call starts a generation; whether it did."""
        if self.ctx.generation == self.generation:
            return False
        self.clear()
        self.generation = self.ctx.generation
        return True

    def begin_call(self) -> int:
        """Start one denoiser call: clear on a new generation; the call's index within its
        step (classifier-free guidance may split a step into several calls)."""
        self.new_generation()
        now = (self.ctx.generation, self.ctx.step)
        self.call = self.call + 1 if now == self.last else 0
        self.last = now
        return self.call

    def clear(self) -> None:
        self.store.clear()


class StepCache(GenerationCache):
    """Tensors kept from a key step for the next non-key steps, per denoiser call in the step.

    `begin(sample)` (or the denoiser pre-hook `before_denoiser`) sets `reuse` (this call may
    read the cache: a non-key step whose call saw the same input shape on the last key step)
    and `keep` (this call must fill it: the next step is a non-key step). `is_key(step,
    num_steps)` is the method's schedule; step 0 must be a key step. `input_name` is the
    denoiser's input keyword ("sample" for a UNet, "hidden_states" for a transformer).
    """

    def __init__(self, ctx: StepContext, is_key: Callable[[int, int], bool],
                 input_name: str = "hidden_states"):
        super().__init__(ctx)
        self.is_key, self.input_name = is_key, input_name
        self.shape: dict[int, torch.Size] = {}
        self.reuse = self.keep = False

    def begin(self, sample: torch.Tensor) -> None:
        """Bookkeeping of one denoiser call on input `sample`."""
        self.begin_call()
        step, total = self.ctx.step, self.ctx.num_steps
        driven = 0 <= step < total  # a call outside StepContext.generate: never reuse
        self.reuse = (driven and not self.is_key(step, total)
                      and self.shape.get(self.call) == sample.shape)
        self.keep = (driven and not self.reuse and step + 1 < total
                     and not self.is_key(step + 1, total))
        if not self.reuse:
            self.shape[self.call] = sample.shape

    def before_denoiser(self, module: Any, args: tuple, kwargs: dict) -> None:
        """Forward pre-hook (with_kwargs) on the denoiser: `begin` on its input."""
        self.begin(args[0] if args else kwargs[self.input_name])

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
        super().clear()
        self.shape.clear()


def relative_l1(now: torch.Tensor, previous: torch.Tensor) -> float:
    """mean|x - x'| / mean|x'|: the change statistic of First Block Cache (ParaAttention) and
    TeaCache (arXiv 2411.19108, Eq. 4)."""
    return ((now - previous).abs().mean() / previous.abs().mean()).item()


def fixed_rate_computes(step: int, num_steps: int, rate: float) -> bool:
    """Whether step `step` computes when a share `rate` of the steps is skipped, evenly spread
    (the first and the last step always compute): a fixed schedule for an adaptive cache on
    random weights, whose features do not change like a trained model's."""
    if step <= 0 or step >= num_steps - 1:
        return True
    keep = 1.0 - rate
    return int(step * keep) > int((step - 1) * keep)


def cached_forward(cache: StepCache, key: Any, forward: Callable[..., Any]) -> Callable[..., Any]:
    """A module forward that returns its cached output on reuse steps and stores it for them."""

    def run(*args: Any, **kwargs: Any) -> Any:
        out = cache.get(key)
        if out is None:
            out = forward(*args, **kwargs)
            cache.put(key, out)
        return out

    return run
