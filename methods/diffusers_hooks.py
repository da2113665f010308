"""diffusers' own cache hooks (diffusers/hooks/, 0.42.1) as methods, beside ours on a leaderboard.

- `diffusers-fbcache`: First Block Cache (ParaAttention, github.com/chengzeyi/ParaAttention;
  ours: methods/fbcache.py). SD3's last joint block returns no text stream (`context_pre_only`),
  which diffusers' tail hook subtracts from: it returns its text input instead (discarded by
  the transformer), so the library's hook runs unchanged.
- `diffusers-pab`: Pyramid Attention Broadcast (Zhao et al., arXiv 2408.12588).
- `diffusers-fastercache`: FasterCache (Lv et al., arXiv 2410.19355): attention extrapolation
  and the CFG-Cache, the unconditional half of the batch approximated from frequency deltas.
- `diffusers-taylorseer`: TaylorSeer (Liu et al., arXiv 2503.06923): attention outputs
  forecast by Taylor series between full steps.
- `diffusers-magcache`: MagCache (Ma et al., arXiv 2506.09045): whole steps skipped while the
  accumulated error of the magnitude ratios stays small.

Each config builds the library's config (`hook_config`) and installs it with its `apply_*`
(`install`; not `enable_cache`: in 0.42.1 only FLUX's transformer has CacheMixin); `remove()`
removes the hooks by name and restores each module's `forward` and `_diffusers_hook`, which
diffusers leaves behind. Cache context: FBCache, TaylorSeer and MagCache keep state per
`CacheContext` name. FluxPipeline enters `transformer.cache_context("cond"/"uncond")`; the SD3,
PixArt and DiT pipelines do not, so a transformer pre-hook enters "call<i>" (i: the call's index
within the step; these pipelines batch CFG into one call, "call0") around every call the
pipeline put in no context. Reset: the first denoiser call of each generation (StepContext;
on FLUX the pipeline's first `cache_context`, before it sets it) resets every stateful hook, as
`_reset_stateful_cache` does: a generation interrupted before the pipeline's own reset
(`maybe_free_model_hooks`) cannot leak into the next. Timesteps (PAB, FasterCache):
`current_timestep_callback` is `pipe.scheduler.timesteps[ctx.step]`, the step in progress in
training-timestep units 0..1000 (flow matching: 1000 sigma), the units of the skip ranges.
MagCache: diffusers' FLUX.1 ratios (28 steps) or the user's, resampled to each generation's
step count by diffusers' `nearest_interp`; `calibrate=true` never skips and prints the model's
own (diffusers' calibration mode). No `prepare` step: MethodSpec.prepares is per module, and
would make all five training methods.
"""

from __future__ import annotations

import math
import re
from contextlib import contextmanager
from dataclasses import dataclass, fields
from functools import partial
from typing import Any, ClassVar

import diffusers.hooks as H
import torch
from diffusers.hooks import faster_cache, first_block_cache, mag_cache, taylorseer_cache
from diffusers.hooks import pyramid_attention_broadcast as pab
from diffusers.hooks.hooks import HookRegistry
from diffusers.models.cache_utils import CacheMixin

from harness.errors import DiffbenchError
from harness.method import MethodHandle, register_method
from harness.params import param
from harness.steps import StepContext
from methods._common.attention_cache import schedule_timesteps
from methods._common.blocks import Block, denoiser_blocks
from methods._common.cache import GenerationCache

TOUCHES = ("transformer.blocks",)
SPAN = "lo,hi: steps with lo < timestep < hi (scheduler units, -1..1000) may"
_MISSING = object()


def _span(config: Any, *names: str) -> None:
    """(lo, hi) timestep range fields: two numbers with -1 <= lo <= hi <= 1000."""
    for name in names:
        value = getattr(config, name)
        try:
            lo, hi = (float(v) for v in value)
        except (TypeError, ValueError):
            lo = hi = math.nan
        if not -1 <= lo <= hi <= 1000:
            raise DiffbenchError(f"{config.method_name}.{name}={value!r}: needs lo,hi with "
                                 "-1 <= lo <= hi <= 1000")
        object.__setattr__(config, name, tuple(int(v) if v.is_integer() else v for v in (lo, hi)))


def _fields(config: Any, drop: tuple[str, ...] = (), **changes: Any) -> dict[str, Any]:
    """The config's fields (named as diffusers names them) as keyword arguments, changed."""
    kept = (f.name for f in fields(config) if f.name not in drop)
    return {**{name: getattr(config, name) for name in kept}, **changes}


def scheduler_timestep(pipe: Any, ctx: StepContext) -> float:
    """The scheduler's timestep of the step in progress (0..1000 units; real under fake tensors)."""
    timesteps = schedule_timesteps(pipe)
    return timesteps[min(max(ctx.step, 0), len(timesteps) - 1)]


class DiffusersHook:
    """What `apply` asks each config: `install` (diffusers' apply_*) registers `hooks` (names);
    `check` refuses a pipeline before any change, `before_hooks` changes what the hooks need
    (through the handle), `on_generation` runs after each generation's reset."""

    install: ClassVar[Any]
    hooks: ClassVar[tuple[str, ...]]

    def check(self, pipe: Any) -> None: ...

    def before_hooks(self, pipe: Any, handle: MethodHandle) -> None: ...

    def on_generation(self, hook_cfg: Any, ctx: StepContext) -> None: ...


@register_method("diffusers-fbcache", touches=TOUCHES)
@dataclass(frozen=True)
class DiffusersFBCacheConfig(DiffusersHook):
    """diffusers' First Block Cache (ParaAttention): skip the other blocks on a small change."""

    install = staticmethod(H.apply_first_block_cache)
    hooks = (first_block_cache._FBC_LEADER_BLOCK_HOOK, first_block_cache._FBC_BLOCK_HOOK)
    threshold: float = param(0.05, "compute the other blocks when mean|r - r'| / mean|r'| of "
                             "the first block's residual exceeds this", low=0.0, high=100.0)

    def check(self, pipe: Any) -> None:
        if len(denoiser_blocks(pipe, self.method_name)) < 2:
            raise DiffbenchError(f"{self.method_name} needs at least 2 transformer blocks")

    def before_hooks(self, pipe: Any, handle: MethodHandle) -> None:
        """SD3's last block (context_pre_only) returns its text input where it returns None."""
        for b in denoiser_blocks(pipe, self.method_name):
            if getattr(b.module, "context_pre_only", False):
                handle.swap_attr(b.module, "forward", partial(_keep_text, b, b.module.forward))

    def hook_config(self, pipe: Any, ctx: StepContext) -> Any:
        return H.FirstBlockCacheConfig(**_fields(self))


def _keep_text(block: Block, forward: Any, *args: Any, **kwargs: Any) -> Any:
    encoder, hidden = forward(*args, **kwargs)
    return (block.inputs(args, kwargs)[1] if encoder is None else encoder), hidden


@register_method("diffusers-pab", touches=TOUCHES)
@dataclass(frozen=True)
class DiffusersPABConfig(DiffusersHook):
    """diffusers' Pyramid Attention Broadcast: reuse attention outputs, recomputed every N."""

    install = staticmethod(H.apply_pyramid_attention_broadcast)
    hooks = (pab._PYRAMID_ATTENTION_BROADCAST_HOOK,)
    spatial_attention_block_skip_range: int = param(
        2, "N: self-attention computed every N calls, reused between (1 = never reuse; "
        "diffusers' fallback 2)", low=1, high=1000)
    spatial_attention_timestep_skip_range: tuple = param((100, 800), f"{SPAN} reuse it")
    cross_attention_block_skip_range: int = param(
        0, "N for cross-attention (PixArt's attn2); 0 = computed always (diffusers' None)",
        low=0, high=1000)
    cross_attention_timestep_skip_range: tuple = param((100, 800), f"{SPAN} reuse it")

    def __post_init__(self) -> None:
        _span(self, "spatial_attention_timestep_skip_range", "cross_attention_timestep_skip_range")

    def hook_config(self, pipe: Any, ctx: StepContext) -> Any:
        return H.PyramidAttentionBroadcastConfig(**_fields(
            self, cross_attention_block_skip_range=self.cross_attention_block_skip_range or None,
            current_timestep_callback=lambda: scheduler_timestep(pipe, ctx)))


# is_guidance_distilled per transformer: FLUX has no unconditional batch; SD3 and PixArt-alpha
# batch [uncond, cond] in keyword inputs, the layout FasterCache splits; others are refused.
FASTER_CACHE_LAYOUT = {"FluxTransformer2DModel": True, "SD3Transformer2DModel": False,
                       "PixArtTransformer2DModel": False}
FASTER_CACHE_REFUSED = {"DiTTransformer2DModel": "DiTPipeline batches [cond, uncond] with "
                        "class labels; FasterCache keeps the second half as the cond batch"}


@register_method("diffusers-fastercache", touches=TOUCHES)
@dataclass(frozen=True)
class DiffusersFasterCacheConfig(DiffusersHook):
    """diffusers' FasterCache: attention extrapolation and the CFG-Cache of the uncond batch."""

    install = staticmethod(H.apply_faster_cache)
    hooks = (faster_cache._FASTER_CACHE_DENOISER_HOOK, faster_cache._FASTER_CACHE_BLOCK_HOOK)
    spatial_attention_block_skip_range: int = param(
        2, "N: self-attention computed every N calls, extrapolated between", low=1, high=1000)
    spatial_attention_timestep_skip_range: tuple = param((-1, 681), f"{SPAN} extrapolate it")
    unconditional_batch_skip_range: int = param(
        5, "n: the unconditional batch computed every n calls, approximated between "
        "(1 = always computed)", low=1, high=1000)
    unconditional_batch_timestep_skip_range: tuple = param((-1, 641), f"{SPAN} approximate it")
    low_frequency_weight_update_timestep_range: tuple = param(
        (99, 901), f"{SPAN} scale the low-frequency delta by alpha_low_frequency")
    high_frequency_weight_update_timestep_range: tuple = param(
        (-1, 301), f"{SPAN} scale the high-frequency delta by alpha_high_frequency")
    alpha_low_frequency: float = param(1.1, "low-frequency delta weight (paper eq. 11)",
                                       low=0.0, high=10.0)
    alpha_high_frequency: float = param(1.1, "high-frequency delta weight (paper eq. 11)",
                                        low=0.0, high=10.0)
    attention_weight: float = param(0.5, "w of the extrapolation o_t + w (o_t - o_t-2) "
                                    "(diffusers' default callback)", low=0.0, high=10.0)

    def __post_init__(self) -> None:
        _span(self, "spatial_attention_timestep_skip_range",
              "unconditional_batch_timestep_skip_range",
              "low_frequency_weight_update_timestep_range",
              "high_frequency_weight_update_timestep_range")

    def check(self, pipe: Any) -> None:
        kind = type(pipe.transformer).__name__
        reason = FASTER_CACHE_REFUSED.get(kind, "its CFG batch layout is unknown")
        if getattr(pipe.transformer, "use_additional_conditions", False):
            reason = "its resolution/aspect-ratio conditions are not split"
        elif kind in FASTER_CACHE_LAYOUT:
            return
        raise DiffbenchError(f"{self.method_name} cannot run on {kind}: {reason} (supported: "
                             f"{', '.join(FASTER_CACHE_LAYOUT)})")

    def hook_config(self, pipe: Any, ctx: StepContext) -> Any:
        weight = self.attention_weight
        split = (*faster_cache._UNCOND_COND_INPUT_KWARGS_IDENTIFIERS, "pooled_projections")
        return H.FasterCacheConfig(**_fields(
            self, drop=("attention_weight",), attention_weight_callback=lambda _: weight,
            tensor_format="BCHW", current_timestep_callback=lambda: scheduler_timestep(pipe, ctx),
            is_guidance_distilled=FASTER_CACHE_LAYOUT[type(pipe.transformer).__name__],
            _unconditional_conditional_input_kwargs_identifiers=split))

    def on_generation(self, hook_cfg: Any, ctx: StepContext) -> None:
        if not hook_cfg.is_guidance_distilled and not ctx.guidance:
            raise DiffbenchError(f"{self.method_name} needs classifier-free guidance "
                                 "(guidance_scale > 1) on this model: it splits the CFG batch")


@register_method("diffusers-taylorseer", touches=TOUCHES)
@dataclass(frozen=True)
class DiffusersTaylorSeerConfig(DiffusersHook):
    """diffusers' TaylorSeer: Taylor-series forecasts of attention outputs between full steps."""

    install = staticmethod(H.apply_taylorseer_cache)
    hooks = (taylorseer_cache._TAYLORSEER_CACHE_HOOK,)
    cache_interval: int = param(5, "after the warm-up, a full step every this many, forecasts "
                                "between (1 = never forecast)", low=1, high=1000)
    disable_cache_before_step: int = param(3, "warm-up: steps before this one always compute",
                                           low=0, high=100000)
    disable_cache_after_step: int = param(0, "steps from this one on always compute; 0 = none "
                                          "(diffusers' None)", low=0, high=100000)
    max_order: int = param(1, "highest Taylor order of the forecast", low=0, high=4)
    taylor_factors_dtype: str = param("bfloat16", "dtype the Taylor factors are stored in",
                                      choices=("bfloat16", "float16", "float32"))
    use_lite_mode: bool = param(False, "TaylorSeer-Lite: forecast only proj_out, blocks "
                                "return zeros on forecast steps")
    cache_identifiers: tuple = param((), "regexes (fullmatch) of the forecast modules; empty = "
                                     "diffusers' attention named attn (DiT/PixArt's are "
                                     r"attn1: e.g. transformer_blocks\.\d+\.attn1)")

    def __post_init__(self) -> None:
        try:
            [re.compile(str(pattern)) for pattern in self.cache_identifiers]
        except re.error as exc:
            raise DiffbenchError(f"{self.method_name}.cache_identifiers: {exc}") from None

    def check(self, pipe: Any) -> None:
        active = (taylorseer_cache._PROJ_OUT_IDENTIFIERS if self.use_lite_mode else
                  self.cache_identifiers or taylorseer_cache._TRANSFORMER_BLOCK_IDENTIFIERS)
        if not any(re.fullmatch(str(p), n) for n, _ in pipe.transformer.named_modules()
                   for p in active):
            raise DiffbenchError(f"{self.method_name}: no module of "
                                 f"{type(pipe.transformer).__name__} matches {list(active)}; "
                                 "set cache_identifiers")

    def hook_config(self, pipe: Any, ctx: StepContext) -> Any:
        return H.TaylorSeerCacheConfig(**_fields(
            self, disable_cache_after_step=self.disable_cache_after_step or None,
            taylor_factors_dtype=getattr(torch, self.taylor_factors_dtype),
            cache_identifiers=[str(p) for p in self.cache_identifiers] or None))


@register_method("diffusers-magcache", touches=TOUCHES)
@dataclass(frozen=True)
class DiffusersMagCacheConfig(DiffusersHook):
    """diffusers' MagCache: skip steps while the accumulated magnitude-ratio error is small."""

    install = staticmethod(H.apply_mag_cache)
    hooks = (mag_cache._MAG_CACHE_LEADER_BLOCK_HOOK, mag_cache._MAG_CACHE_BLOCK_HOOK)
    threshold: float = param(0.06, "skip while the accumulated error sum |1 - prod ratios| is "
                             "at most this", low=0.0, high=100.0)
    max_skip_steps: int = param(3, "K: most consecutive skipped steps (0 = never skip)",
                                low=0, high=1000)
    retention_ratio: float = param(0.2, "fraction of the first steps never skipped",
                                   low=0.0, high=1.0)
    mag_ratios: str = param("flux", "per-step magnitude ratios: 'flux' (diffusers' FLUX.1, 28 "
                            "steps) or a list of numbers; resampled to the step count")
    calibrate: bool = param(False, "never skip; print the model's ratios at the end of each "
                            "generation (diffusers' calibration mode)")

    def __post_init__(self) -> None:
        self.ratios()

    def ratios(self) -> torch.Tensor:
        """The configured ratios as a tensor; bad text is a one-line error."""
        if self.mag_ratios == "flux":
            return mag_cache.FLUX_MAG_RATIOS
        try:  # also the list calibrate prints: "[1.0, 1.21, ...]"
            values = [float(v) for v in re.split(r"[,\s]+", str(self.mag_ratios).strip("[] "))]
        except ValueError:
            values = []
        if not values or not all(math.isfinite(v) and v > 0 for v in values):
            raise DiffbenchError(f"{self.method_name}.mag_ratios={self.mag_ratios!r}: 'flux' or "
                                 "positive numbers separated by commas or spaces")
        return torch.tensor(values)

    def hook_config(self, pipe: Any, ctx: StepContext) -> Any:
        ratios = self.ratios()
        return H.MagCacheConfig(**_fields(self, mag_ratios=ratios,
                                          num_inference_steps=len(ratios)))

    def on_generation(self, hook_cfg: Any, ctx: StepContext) -> None:
        """The hooks read their config object: this generation's step count and ratios."""
        if ctx.num_steps > 0:
            hook_cfg.num_inference_steps = ctx.num_steps
            hook_cfg.mag_ratios = mag_cache.nearest_interp(self.ratios(), ctx.num_steps)


class CacheDriver(GenerationCache):
    """Per denoiser call: the per-generation reset and, where the pipeline sets none, a context."""

    def __init__(self, pipe: Any, config: Any, hook_cfg: Any, ctx: StepContext):
        super().__init__(ctx)
        self.pipe, self.config, self.hook_cfg = pipe, config, hook_cfg
        self.pipeline_contexts = 0  # contexts the pipeline itself has open (FLUX)
        self.own: Any = None  # the context entered for the current call

    def start(self) -> None:
        """On a new generation, reset every stateful hook under the transformer."""
        if self.new_generation():
            HookRegistry.check_if_exists_or_initialize(self.pipe.transformer).reset_stateful_hooks()
            self.config.on_generation(self.hook_cfg, self.ctx)

    def wrap(self, original: Any) -> Any:
        """The transformer's `cache_context`, resetting first when it opens a new generation."""

        @contextmanager
        def cache_context(name: str, **kwargs: Any) -> Any:
            self.start()
            with original(name, **kwargs):
                self.pipeline_contexts += 1
                try:
                    yield
                finally:
                    self.pipeline_contexts -= 1

        return cache_context

    def before(self, module: Any, args: tuple, kwargs: dict) -> None:
        self.start()
        call = self.begin_call()
        if not self.pipeline_contexts:
            self.own = CacheMixin.cache_context(module, f"call{call}", step_index=self.ctx.step,
                                                num_inference_steps=self.ctx.num_steps)
            self.own.__enter__()

    def after(self, module: Any, args: tuple, output: Any) -> None:
        own, self.own = self.own, None
        if own is not None:
            own.__exit__(None, None, None)


def _install(transformer: torch.nn.Module, config: Any, hook_cfg: Any) -> Any:
    """Install the hooks; the undo: remove them by name, restore each module's attributes."""
    before = {m: (m.__dict__.get("forward", _MISSING), m.__dict__.get("_diffusers_hook", _MISSING))
              for m in transformer.modules()}
    config.install(transformer, hook_cfg)
    root = HookRegistry.check_if_exists_or_initialize(transformer)
    root.invalidate_child_registries_cache()  # as enable_cache does: contexts reach new hooks

    def undo() -> None:
        for name in config.hooks:
            root.remove_hook(name, recurse=True)
        root.invalidate_child_registries_cache()
        for module, (forward, registry) in before.items():
            left = module.__dict__.get("_diffusers_hook")
            if left is not None and left.hooks:
                continue  # someone else's hooks remain: theirs to undo
            if forward is _MISSING:
                module.__dict__.pop("forward", None)
            else:
                module.__dict__["forward"] = forward
            if registry is _MISSING:
                module.__dict__.pop("_diffusers_hook", None)

    return undo


def apply(pipe: Any, config: Any, ctx: StepContext) -> MethodHandle:
    """Install the config's diffusers hook on pipe.transformer, with context and reset driving."""
    denoiser_blocks(pipe, config.method_name)  # a transformer with known blocks, or one line
    config.check(pipe)
    handle = MethodHandle(pipe, config.method_name, config)
    transformer = pipe.transformer
    try:
        config.before_hooks(pipe, handle)
        hook_cfg = config.hook_config(pipe, ctx)
        handle.on_remove(_install(transformer, config, hook_cfg))
        driver = CacheDriver(pipe, config, hook_cfg, ctx)
        handle.add_hook(transformer.register_forward_pre_hook(driver.before, with_kwargs=True))
        handle.add_hook(transformer.register_forward_hook(driver.after, always_call=True))
        if callable(getattr(transformer, "cache_context", None)):
            handle.swap_attr(transformer, "cache_context", driver.wrap(transformer.cache_context))
    except BaseException:
        handle.remove()
        raise
    return handle
