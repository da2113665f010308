"""TaylorSeer (Liu et al., arXiv 2503.06923): forecast the blocks' features from their Taylor
expansion in the step instead of reusing them.

Every transformer block's attention and MLP branches (the layers methods/_common/blocks.py
names; `targets = "attention"` keeps the attention layers only, diffusers' default set) run in
full on the first `warmup` steps and then on every `interval`-th step. A full step stores the
branch output F and its finite differences up to `order` in the step index (Eq. 6):
D^0 = F(s), D^(j+1) = (D^j(s) - D^j(s')) / (s - s') against the previous full step s'. A
forecast step s + k returns the Taylor polynomial sum_j D^j k^j / j! (Eq. 7) without running
the layer; the rest of each block (norms, modulation, gates, residual adds) runs at every step.
The paper's FLUX setting is interval N = 5 with order 1 or 2; `interval = 1` never forecasts
(identity). State is kept per layer and denoiser call within a step, and starts afresh with
every generation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from harness.errors import DiffbenchError
from harness.method import MethodHandle, register_method
from harness.params import param
from harness.steps import StepContext
from methods._common.blocks import denoiser_blocks
from methods._common.cache import GenerationCache


@register_method("taylorseer", touches=("transformer.blocks",))
@dataclass(frozen=True)
class TaylorSeerConfig:
    """TaylorSeer refresh interval, Taylor order, warm-up and the forecast layers."""

    interval: int = param(5, "N: branches computed every N steps, forecast in between "
                          "(1 = never forecast)", low=1, high=1000)
    order: int = param(1, "highest order of the Taylor expansion (0 = reuse, as FORA)",
                       low=0, high=4)
    warmup: int = param(3, "the first steps, all computed in full", low=1, high=100000)
    targets: str = param("branches", "forecast layers: every attention and MLP branch "
                         "(paper) or the attention layers only (diffusers' default)",
                         choices=("branches", "attention"))


def is_full_step(step: int, interval: int, warmup: int) -> bool:
    """Full on the warm-up steps, then every interval-th step after the last of them."""
    return step < warmup or (step - warmup + 1) % interval == 0


def updated(factors: list[torch.Tensor] | None, feature: torch.Tensor, delta: int,
            order: int) -> list[torch.Tensor]:
    """[D^0, ..., D^m] at a full step: D^0 = F, D^(j+1) = (D^j - previous D^j) / delta (Eq. 6);
    the expansion restarts at order 0 where a previous factor is missing or of another shape."""
    new = [feature]
    for j in range(order):
        if factors is None or j >= len(factors) or factors[j].shape != feature.shape:
            break
        new.append((new[j] - factors[j]) / delta)
    return new


def forecast(factors: list[torch.Tensor], offset: int) -> torch.Tensor:
    """sum_j D^j offset^j / j! (Eq. 7)."""
    out = factors[0]
    for j in range(1, len(factors)):
        out = out + factors[j] * (offset ** j / math.factorial(j))
    return out


class TaylorCache(GenerationCache):
    """Per layer and call index: the Taylor factors of each output and the last full step."""

    def __init__(self, ctx: StepContext, config: TaylorSeerConfig):
        super().__init__(ctx)
        self.config = config
        self.full = True

    def before_denoiser(self, module: Any, args: tuple, kwargs: dict) -> None:
        """Count the call; decide whether this step computes the branches or forecasts them."""
        self.begin_call()
        step, total = self.ctx.step, self.ctx.num_steps
        self.full = (not 0 <= step < total  # a call outside StepContext.generate computes
                     or is_full_step(step, self.config.interval, self.config.warmup))

    def layer(self, key: str, forward: Any) -> Any:
        """The layer's forward: computed and expanded on full steps, forecast otherwise."""

        def run(*args: Any, **kwargs: Any) -> Any:
            entry = self.store.get((key, self.call))
            step = self.ctx.step
            if self.full or entry is None:
                out = forward(*args, **kwargs)
                if 0 <= step < self.ctx.num_steps:
                    self.expand(key, entry, out, step)
                return out
            last, factors, single = entry
            outs = [forecast(f, step - last) for f in factors]
            return outs[0] if single else tuple(outs)

        return run

    def expand(self, key: str, entry: Any, out: Any, step: int) -> None:
        single = isinstance(out, torch.Tensor)
        outs = (out,) if single else tuple(out)
        if any(not isinstance(o, torch.Tensor) for o in outs):
            raise DiffbenchError(f"taylorseer: {key} returned {type(out).__name__}, "
                                 "not tensors")
        last, previous = (entry[0], entry[1]) if entry is not None else (None, None)
        delta = step - last if last is not None else 0
        factors = [updated(previous[i] if previous and delta > 0 else None, o.detach(), delta,
                           self.config.order) for i, o in enumerate(outs)]
        self.store[(key, self.call)] = (step, factors, single)


def apply(pipe: Any, config: TaylorSeerConfig, ctx: StepContext) -> MethodHandle:
    """Wrap every block's branch layers with the forecast; count denoiser calls."""
    blocks = denoiser_blocks(pipe, "taylorseer")
    keep = (lambda n: n.startswith("attn")) if config.targets == "attention" else (lambda n: True)
    layers = [(f"{b.name}.{name}", getattr(b.module, name)) for b in blocks
              for name in b.streams.branches
              if keep(name) and getattr(b.module, name, None) is not None]
    if not layers:
        raise DiffbenchError(f"taylorseer finds no {config.targets} layers in the blocks of "
                             f"{type(pipe.transformer).__name__}")
    handle = MethodHandle(pipe, "taylorseer", config)
    if config.interval == 1:
        return handle  # every step is a full step: the unchanged pipeline
    cache = TaylorCache(ctx, config)
    handle.add_hook(pipe.transformer.register_forward_pre_hook(cache.before_denoiser,
                                                               with_kwargs=True))
    for key, layer in layers:
        handle.swap_attr(layer, "forward", cache.layer(key, layer.forward))
    handle.on_remove(cache.clear)
    return handle
