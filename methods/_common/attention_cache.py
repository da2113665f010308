"""Attention-output caches scheduled over timesteps (PAB, FasterCache): which attention layers a
transformer's blocks have and in which role, the timestep of a denoiser call, and the
per-generation, per-call bookkeeping they share.

Pipelines pass `timestep` to their transformer as a keyword (DiT, PixArt, SD3, FLUX) or as the
second positional argument, one value per batch row (all equal within a call). FLUX pipelines
pass t / 1000: `calls.call_unit` scales it back to the scheduler's 0..1000 (the value can
differ from the scheduler's t in the last float bits). A range (low, high) holds t when
low < t < high, strictly, as in PAB's reference code (VideoSys `pab_mgr`) and diffusers' PAB and
FasterCache hooks.
"""

from __future__ import annotations

from typing import Any

import torch

from harness.errors import DiffbenchError
from harness.steps import StepContext
from methods._common.blocks import Block
from methods._common.cache import GenerationCache
from methods._common.calls import call_unit


def call_timestep(denoiser: Any, args: tuple, kwargs: dict) -> float | None:
    """The timestep of this call of `denoiser` (its first batch row), or None when it has none."""
    t = kwargs["timestep"] if "timestep" in kwargs else (args[1] if len(args) > 1 else None)
    if t is None:
        return None
    value = float(torch.as_tensor(t).detach().reshape(-1)[0].item())
    return value * call_unit(denoiser)


def within(t: float | None, low: float, high: float) -> bool:
    """low < t < high (False for a call without a timestep)."""
    return t is not None and low < t < high


def check_ranges(config: Any, method: str, kinds: tuple[str, ...]) -> None:
    """One-line error when a `<kind>_low` is above its `<kind>_high`."""
    for kind in kinds:
        low, high = getattr(config, f"{kind}_low"), getattr(config, f"{kind}_high")
        if low is not None and high is not None and low > high:
            raise DiffbenchError(f"{method}.{kind}_low={low} is above {method}.{kind}_high={high}; "
                                 f"the range holds the timesteps t with low < t < high")


def attention_layers(blocks: list[Block]) -> list[tuple[str, str, torch.nn.Module]]:
    """(key, role, layer) of every attention branch of the blocks (methods/_common/blocks.py):
    role "cross" for a layer with `is_cross_attention` (PixArt's attn2), else "self" (DiT and
    PixArt attn1, SD3's joint attention and SD3.5's second self-attention, FLUX's attention)."""
    out = []
    for b in blocks:
        for name in b.streams.branches:
            layer = getattr(b.module, name, None)
            if name.startswith("attn") and layer is not None:
                role = "cross" if getattr(layer, "is_cross_attention", False) else "self"
                out.append((f"{b.name}.{name}", role, layer))
    return out


def first_input(args: tuple, kwargs: dict) -> torch.Tensor:
    """The hidden states a layer is called with (positional or keyword)."""
    return args[0] if args else kwargs["hidden_states"]


class TimestepCache(GenerationCache):
    """A generation cache that also knows, for the denoiser call in progress, its index within
    the step (`call`), its timestep (`t`) and whether the runner drives it (`driven`: a call
    outside StepContext.generate never reads or fills the cache)."""

    def __init__(self, ctx: StepContext, denoiser: Any):
        super().__init__(ctx)
        self.denoiser = denoiser
        self.t: float | None = None
        self.driven = False

    def before_denoiser(self, module: Any, args: tuple, kwargs: dict) -> None:
        """Denoiser forward pre-hook (with_kwargs): the call's bookkeeping."""
        self.begin_call()
        self.t = call_timestep(self.denoiser, args, kwargs)
        self.driven = 0 <= self.ctx.step < self.ctx.num_steps
