"""FasterCache (Lv et al., arXiv 2410.19355): extrapolate skipped attention outputs and rebuild
the unconditional CFG branch from the conditional one in frequency space.

Two parts, as in the released code (Vchitect/FasterCache, e.g. scripts/latte) and diffusers'
hooks/faster_cache.py (0.42.1), on the transformer's self-attention layers (DiT and PixArt attn1,
SD3's joint attention and SD3.5's second self-attention, FLUX's double- and single-block
attention; cross-attention always runs, as in both):

Dynamic feature reuse (paper Eq. 5): while the timestep t lies in the attention range
low < t < high, a self-attention layer is computed only at the steps s with s % k == 0 and at
the others returns F = F_a + w (F_a - F_b), F_a and F_b its last two computed outputs (the
difference keeps the trend that plainly reusing F_a loses; the paper lets w grow from 0 to 1
over sampling, the released code and diffusers use 0.5). Two choices follow the released code
where diffusers differs: only computed outputs become F_a and F_b (diffusers also stores its
extrapolations there, so with w > 0 the two part after a layer's first extrapolation; with w = 0
they agree), and a full CFG batch extrapolates too when F_a and F_b are full-batch outputs
(diffusers extrapolates only while the conditional half runs alone, so it computes such steps).

CFG-Cache (Eqs. 9-11): on a step where the unconditional branch is computed, the difference of
the denoiser's unconditional and conditional outputs is stored per frequency band, dLF and dHF
(centred 2-D FFT over the latent's height and width; low band = a disc of radius min(H, W) // 5
around the centre). While t lies in the unconditional range the unconditional half is computed
only at the steps s with s % n == 0; at the others the denoiser runs on the conditional half of
the batch alone (every input whose leading dim is the CFG batch is halved) and the
unconditional output is IFFT(LF(cond) + dLF + HF(cond) + dHF), dLF first multiplied by
alpha_low when t lies in the low-frequency range and dHF by alpha_high in the high-frequency
range (the stored differences are multiplied again at every such step, the weights compounding
as in both implementations: the low band is emphasised early, the high band late). Only on
pipelines whose denoiser gets the CFG batch in one call (`CFG_BATCH`: SD3, PixArt, DiT, with
the position of the unconditional half; the step's first call) and when the call guides; off on
guidance-distilled FLUX (attention reuse only). While the conditional half runs alone, attention
layers extrapolate from the conditional rows of their cached outputs. Defaults are diffusers':
k = 2 in (-1, 681), w = 0.5, n = 5 in (-1, 641), alpha 1.1 and 1.1 in (99, 901) and (-1, 301).
Step s counts from the generation's first step; t is the scheduler's timestep of step s
(methods/_common/attention_cache.py). Caches are kept per denoiser call within a
step and dropped with every new generation; a call outside the runner's StepContext computes
everything. k = 1 and n = 1 is the unchanged pipeline.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

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
# pipelines whose denoiser gets the classifier-free-guidance batch in one call: which half of it
# is the unconditional one (SD3 and PixArt concatenate [negative, positive], DiT [labels, null])
CFG_BATCH = {"StableDiffusion3Pipeline": 0, "PixArtAlphaPipeline": 0, "PixArtSigmaPipeline": 0,
             "DiTPipeline": 1}


def _bound(default: int, what: str, sign: str) -> Any:
    """A documented bound of one of the timestep ranges (low < t < high)."""
    return param(default, f"{what} range: only at timesteps t {sign} this {_T}", low=-1, high=1001)


@register_method("fastercache", touches=("transformer.blocks", "guidance"))
@dataclass(frozen=True)
class FasterCacheConfig:
    """FasterCache: attention extrapolation and CFG-Cache schedules and weights."""

    attention_skip_range: int = param(2, "k: self-attention is computed at the steps s with "
                                      "s % k == 0 inside the attention range and extrapolated "
                                      "at the others (1 = always compute)", low=1, high=1000)
    attention_low: int = _bound(-1, "attention", ">")
    attention_high: int = _bound(681, "attention", "<")
    attention_weight: float = param(0.5, "w in F_a + w (F_a - F_b), the extrapolation from the "
                                    "last two computed outputs (0 = reuse F_a)", low=0.0, high=10.0)
    uncond_skip_range: int = param(5, "n: CFG-Cache computes the unconditional branch at the "
                                   "steps s with s % n == 0 inside the unconditional range and "
                                   "rebuilds it from the conditional one at the others "
                                   "(1 = always compute)", low=1, high=1000)
    uncond_low: int = _bound(-1, "unconditional", ">")
    uncond_high: int = _bound(641, "unconditional", "<")
    alpha_low: float = param(1.1, "factor on the stored low-frequency difference at every "
                             "rebuilt step in the low-frequency range", low=0.0, high=10.0)
    low_freq_low: int = _bound(99, "low-frequency weight", ">")
    low_freq_high: int = _bound(901, "low-frequency weight", "<")
    alpha_high: float = param(1.1, "factor on the stored high-frequency difference at every "
                              "rebuilt step in the high-frequency range", low=0.0, high=10.0)
    high_freq_low: int = _bound(-1, "high-frequency weight", ">")
    high_freq_high: int = _bound(301, "high-frequency weight", "<")

    def __post_init__(self) -> None:
        check_ranges(self, "fastercache", ("attention", "uncond", "low_freq", "high_freq"))


def split_frequencies(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(low, high) bands of the centred 2-D spectrum of x over its last two dims; the low band
    is the disc of radius min(H, W) // 5 around the centre (the released code's `fft`)."""
    spectrum = torch.fft.fftshift(torch.fft.fft2(x), dim=(-2, -1))
    h, w = x.shape[-2:]
    radius = min(h, w) // 5
    y, x_ = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    low = ((x_ - w // 2) ** 2 + (y - h // 2) ** 2 <= radius ** 2).to(x.device)
    return spectrum * low, spectrum * ~low


def join_frequencies(low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """The real signal whose centred spectrum is low + high."""
    return torch.fft.ifft2(torch.fft.ifftshift(low + high, dim=(-2, -1))).real


def extrapolate(older: Any, newer: Any, weight: float) -> Any:
    """newer + (newer - older) * w, per tensor of a layer's output (None stays None)."""
    if isinstance(newer, tuple):
        return tuple(extrapolate(a, b, weight) for a, b in zip(older, newer))
    return None if newer is None else newer + (newer - older) * weight


def _half(value: Any, batch: int, index: int) -> Any:
    """Half `index` (0 or 1) of the rows of every tensor whose leading dim is the CFG batch."""
    if torch.is_tensor(value) and value.ndim > 0 and value.shape[0] == batch:
        return value[index * batch // 2:(index + 1) * batch // 2]
    if isinstance(value, dict):
        return {k: _half(v, batch, index) for k, v in value.items()}
    return value


def _sample(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output.sample


def _with_sample(output: Any, sample: torch.Tensor) -> Any:
    if isinstance(output, tuple):
        return (sample, *output[1:])
    return type(output)(sample=sample)


class FasterCache(TimestepCache):
    """Per-call caches: each attention layer's last two computed outputs, the CFG differences."""

    def __init__(self, ctx: StepContext, pipe: Any, config: FasterCacheConfig,
                 uncond: int | None):
        super().__init__(ctx, pipe)
        self.config, self.uncond = config, uncond  # uncond: its half of the CFG batch, or None
        self.halved = False  # this call runs the conditional half alone
        self.batch = 0  # the batch the pipeline called the denoiser with

    def guided(self, batch: int) -> bool:
        """Whether this call holds the CFG batch that CFG-Cache works on."""
        return (self.uncond is not None and self.config.uncond_skip_range > 1 and self.driven
                and self.ctx.guidance and self.call == 0 and batch % 2 == 0)

    def before_denoiser(self, module: Any, args: tuple, kwargs: dict) -> tuple | None:
        """Pre-hook: bookkeeping; on a rebuilt step keep only the conditional half of the batch."""
        super().before_denoiser(module, args, kwargs)
        c, sample = self.config, first_input(args, kwargs)
        self.batch = sample.shape[0]
        stored = self.store.get(("cfg", self.call))
        self.halved = (self.guided(self.batch) and stored is not None
                       and stored[0] == sample.shape and self.ctx.step % c.uncond_skip_range != 0
                       and within(self.t, c.uncond_low, c.uncond_high))
        if not self.halved:
            return None
        cond = 1 - self.uncond
        return (tuple(_half(a, self.batch, cond) for a in args),
                {k: _half(v, self.batch, cond) for k, v in kwargs.items()})

    def after_denoiser(self, module: Any, args: tuple, kwargs: dict, output: Any) -> Any:
        """Forward hook: rebuild the unconditional half (Eqs. 9-11), or store the differences."""
        if not self.guided(self.batch):
            return None
        c, key, sample = self.config, ("cfg", self.call), _sample(output)
        if not self.halved:
            halves = sample.chunk(2)
            low_u, high_u = split_frequencies(halves[self.uncond].float())
            low_c, high_c = split_frequencies(halves[1 - self.uncond].float())
            self.store[key] = (first_input(args, kwargs).shape, low_u - low_c, high_u - high_c)
            return None
        self.halved = False
        shape, d_low, d_high = self.store[key]
        d_low = d_low * (c.alpha_low if within(self.t, c.low_freq_low, c.low_freq_high) else 1.0)
        d_high = d_high * (c.alpha_high if within(self.t, c.high_freq_low, c.high_freq_high)
                           else 1.0)
        self.store[key] = (shape, d_low, d_high)  # the weights compound over the rebuilt steps
        low_c, high_c = split_frequencies(sample.float())
        uncond = join_frequencies(d_low + low_c, d_high + high_c).to(sample.dtype)
        both = (uncond, sample) if self.uncond == 0 else (sample, uncond)
        return _with_sample(output, torch.cat(both))

    def rows(self, value: Any, batch: int) -> Any:
        """A cached output for a call of `batch` rows: itself, or its conditional half while the
        conditional branch runs alone; None when it does not fit."""
        if isinstance(value, tuple):
            parts = tuple(self.rows(v, batch) for v in value)
            fits = all(p is not None for p, v in zip(parts, value) if v is not None)
            return parts if fits else None
        if value is None or value.shape[0] == batch:
            return value
        if self.halved and value.shape[0] == 2 * batch:
            return value[batch:] if self.uncond == 0 else value[:batch]
        return None

    def wrap(self, key: str, forward: Any) -> Any:
        """A self-attention forward: extrapolated on skipped steps (Eq. 5), else computed and
        kept as the newest of the last two computed outputs."""
        c = self.config

        def run(*args: Any, **kwargs: Any) -> Any:
            slot = (key, self.call)
            past = self.store.get(slot)
            if (past is not None and self.driven and self.ctx.step % c.attention_skip_range != 0
                    and within(self.t, c.attention_low, c.attention_high)):
                batch = first_input(args, kwargs).shape[0]
                older, newer = self.rows(past[0], batch), self.rows(past[1], batch)
                if older is not None and newer is not None:
                    return extrapolate(older, newer, c.attention_weight)
            out = forward(*args, **kwargs)
            if self.driven:
                self.store[slot] = (out if past is None else past[1], out)
            return out

        return run

    def clear(self) -> None:
        super().clear()
        self.halved = False


def apply(pipe: Any, config: FasterCacheConfig, ctx: StepContext) -> MethodHandle:
    """Wrap the self-attention layers; denoiser hooks for the bookkeeping and CFG-Cache."""
    layers = [(key, layer) for key, role, layer in attention_layers(denoiser_blocks(
        pipe, "fastercache")) if role == "self"]
    if not layers:
        raise DiffbenchError(f"fastercache needs self-attention layers in the transformer "
                             f"blocks; {type(pipe.transformer).__name__} has none")
    handle = MethodHandle(pipe, "fastercache", config)
    uncond = CFG_BATCH.get(type(pipe).__name__)
    cfg = uncond is not None and config.uncond_skip_range > 1
    if config.attention_skip_range == 1 and not cfg:
        return handle  # nothing is ever skipped: the unchanged pipeline
    cache = FasterCache(ctx, pipe, config, uncond)
    # prepend: other methods' denoiser hooks see the halved batch and the rebuilt output
    handle.add_hook(pipe.transformer.register_forward_pre_hook(
        cache.before_denoiser, with_kwargs=True, prepend=True))
    if cfg:
        handle.add_hook(pipe.transformer.register_forward_hook(
            cache.after_denoiser, with_kwargs=True, prepend=True))
    if config.attention_skip_range > 1:
        for key, layer in layers:
            handle.swap_attr(layer, "forward", cache.wrap(key, layer.forward))
    handle.on_remove(cache.clear)
    return handle
