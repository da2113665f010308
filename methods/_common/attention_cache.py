"""Attention-output caches scheduled over timesteps (PAB, FasterCache): which attention layers a
transformer's blocks have and in which role, the timestep of a denoiser call, and the
per-generation, per-call bookkeeping they share.

The timestep of a denoiser call is the scheduler's: `scheduler.timesteps[step]` at the
runner's step (0..1000 on every scheduler here, flow models' 1000 sigma included; FLUX pipelines
pass their transformer t / 1000, which this reading does not depend on), so the value exists
without reading a tensor the call got (under fake tensors, FLOP counting at real size, the
call's tensors have no values; the scheduler's timesteps are real, metrics/flops.py). A range
(low, high) holds t when low < t < high, strictly, as in PAB's reference code (VideoSys
`pab_mgr`) and diffusers' PAB and FasterCache hooks.
"""

from __future__ import annotations

from typing import Any

import torch

from harness.errors import DiffbenchError
from harness.steps import StepContext
from methods._common.blocks import Block
from methods._common.cache import GenerationCache


def schedule_timesteps(pipe: Any) -> list[float]:
    """The scheduler's timesteps as floats (`tolist`: real values even inside a fake mode)."""
    timesteps = getattr(pipe.scheduler, "timesteps", None)
    return [] if timesteps is None else [float(t) for t in timesteps.tolist()]


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

    def __init__(self, ctx: StepContext, pipe: Any):
        super().__init__(ctx)
        self.pipe = pipe
        self.t: float | None = None
        self.driven = False
        self.timesteps: list[float] = []  # the generation's schedule, read at its first call

    def before_denoiser(self, module: Any, args: tuple, kwargs: dict) -> None:
        """Denoiser forward pre-hook (with_kwargs): the call's bookkeeping."""
        if self.new_generation():
            self.timesteps = schedule_timesteps(self.pipe)
        self.begin_call()
        step = self.ctx.step
        self.driven = 0 <= step < self.ctx.num_steps
        self.t = self.timesteps[step] if self.driven and step < len(self.timesteps) else None
