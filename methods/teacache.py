"""TeaCache (Liu et al., arXiv 2411.19108): skip every block while the timestep-modulated input
has not changed enough since the last computed step.

Each denoiser call computes the first block's timestep-embedding-modulated input (its adaLN:
norm1 of the image tokens scaled and shifted by the timestep embedding; Sec. 3.3) and its
relative L1 change x = mean|m - m'| / mean|m'| against the previous call's (Eq. 4). The change
is rescaled by a polynomial fitted on the model, y = P(x), which estimates the relative change
of the model's output (Sec. 3.4), and accumulated over the steps since the last computed one.
While the accumulated estimate stays below `threshold` the call skips all blocks and adds to
their input the residual the blocks added on the last computed call (image tokens; text tokens
on MMDiT blocks); once it reaches `threshold` the call computes and the sum restarts at 0. The
first and the last step always compute (the reference implementation's rule). State is kept per
denoiser call within a step and starts afresh with every generation.

`prepare` fits P (degree 4, least squares; Sec. 3.4) on the model: full-compute trajectories of
`calib_prompts` prompts through the pipeline's own call, pairs (input change, output change) of
consecutive steps per call and image row; P(x) is clamped at 0. Fit at the step count the cells
run (`calib_steps`): the changes between steps scale with it. `coefficients = "flux-dev"` uses
the published FLUX.1-dev polynomial instead. The paper's FLUX settings: threshold 0.25 (1.5x)
and 0.4 (1.8x). `threshold = 0` never skips (identity). `rate` > 0 replaces the decision by a
fixed schedule skipping that share of the steps (random-weight speed rows). The handle's stats
count calls and skips (`cache_calls`, `cache_skips` columns).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from harness.errors import DiffbenchError
from harness.method import MethodHandle, register_method
from harness.params import param
from harness.prepare import PrepareData
from harness.steps import StepContext
from methods._common.block_skip import BlockSkip, SkipState, rate_param
from methods._common.blocks import Block, add_stream, denoiser_blocks
from methods._common.cache import GenerationCache, relative_l1
from methods._common.calls import first_output, record_calls
from methods._common.quant_train import calibration_texts

POLY = "teacache.polynomial"  # artifact key: P's coefficients, highest degree first
DEGREE = 4
# TeaCache's published rescaling polynomial for FLUX.1-dev (the reference's TeaCache4FLUX)
FLUX_DEV = (4.98651651e02, -2.83781631e02, 5.58554382e01, -3.82021401e00, 2.64230861e-01)


@register_method("teacache", touches=("transformer.blocks",))
@dataclass(frozen=True)
class TeaCacheConfig:
    """TeaCache: accumulated rescaled input change below which every block is skipped."""

    threshold: float = param(0.25, "skip the blocks while the accumulated P(input change) stays "
                             "below this (0 = never skip; paper FLUX: 0.25, 0.4, 0.6, 0.8)",
                             low=0.0, high=100.0)
    coefficients: str = param("fit", "rescaling polynomial: 'fit' on this model in prepare, or "
                              "'flux-dev' (the published FLUX.1-dev one)",
                              choices=("fit", "flux-dev"))
    calib_prompts: int = param(8, "prompts of the fitting trajectories: the first n of the cell's "
                               "set", low=1, high=4096)
    calib_steps: int = param(20, "sampler steps of each fitting trajectory", low=3, high=1000)
    calib_guidance: float = param(5.0, "guidance of the fitting trajectories", low=0.0, high=50.0)
    rate: float = rate_param()


def _joint(block: Any, call: dict) -> torch.Tensor:
    """SD3 / FLUX double blocks: AdaLayerNormZero(hidden, emb=temb)'s modulated tokens."""
    return block.norm1(call["hidden_states"], emb=call["temb"])[0]


def _ada_norm_zero(block: Any, call: dict) -> torch.Tensor:
    """DiT's adaLN-Zero: norm1(hidden, timestep, class_labels)'s modulated tokens."""
    hidden = call["hidden_states"]
    return block.norm1(hidden, call["timestep"], call.get("class_labels"),
                       hidden_dtype=hidden.dtype)[0]


def _ada_norm_single(block: Any, call: dict) -> torch.Tensor:
    """PixArt's adaLN-single: LayerNorm(hidden) * (1 + scale_msa) + shift_msa."""
    hidden = call["hidden_states"]
    table = block.scale_shift_table[None] + call["timestep"].reshape(hidden.shape[0], 6, -1)
    shift, scale = table.chunk(6, dim=1)[:2]
    return block.norm1(hidden) * (1 + scale) + shift


MODULATED: dict[str, Callable[[Any, dict], torch.Tensor]] = {  # first block's kind -> m(t)
    "JointTransformerBlock": _joint,
    "FluxTransformerBlock": _joint,
    "BasicTransformerBlock/ada_norm_zero": _ada_norm_zero,
    "BasicTransformerBlock/ada_norm_single": _ada_norm_single,
}


def block_kind(module: Any) -> str:
    norm = getattr(module, "norm_type", None)
    return type(module).__name__ + (f"/{norm}" if isinstance(norm, str) else "")


class ModulatedInput:
    """The first block's timestep-modulated input of one of its calls."""

    def __init__(self, block: Block):
        kind = block_kind(block.module)
        if kind not in MODULATED:
            raise DiffbenchError(f"teacache does not know the modulated input of {kind} "
                                 f"(known: {', '.join(MODULATED)})")
        self.block, self.fn = block, MODULATED[kind]
        self.signature = inspect.signature(type(block.module).forward)

    def __call__(self, args: tuple, kwargs: dict) -> torch.Tensor:
        call = self.signature.bind(self.block.module, *args, **kwargs).arguments
        with torch.no_grad():
            return self.fn(self.block.module, call)


def rescale(coefficients: torch.Tensor, x: float) -> float:
    """P(x), coefficients highest degree first (numpy.polyval), clamped at 0: a change never
    lowers the accumulated estimate (a fitted polynomial can dip below 0 off its data)."""
    return max(0.0, float(np.polyval(coefficients.double().numpy(), x)))


def row_changes(now: torch.Tensor, previous: torch.Tensor) -> list[float]:
    """relative_l1 of each image row of a batch (the fitting pairs; the reference fits on
    batch-1 trajectories)."""
    num = (now - previous).abs().flatten(1).mean(1)
    return (num / previous.abs().flatten(1).mean(1)).double().tolist()


@dataclass
class _CallState(SkipState):
    """Per call index, besides the skip state (`base`: the first block's input streams on the
    last full call): the previous call's modulated input and the accumulated estimate."""

    previous: torch.Tensor | None = None
    accumulated: float = 0.0


class TeaCache(BlockSkip):
    """The per-generation, per-call decision and what a skip returns."""

    state_cls = _CallState

    def __init__(self, ctx: StepContext, config: TeaCacheConfig, poly: torch.Tensor | None,
                 modulated: ModulatedInput, stats: dict[str, int]):
        super().__init__(ctx, stats, config.rate)
        self.config, self.poly, self.modulated = config, poly, modulated

    def decide(self, st: _CallState, now: torch.Tensor) -> bool:
        """Accumulate P(change); skip while below the threshold (first / last step compute)."""
        step, total = self.ctx.step, self.ctx.num_steps
        previous, st.previous = st.previous, now
        if (not 0 < step < total - 1 or previous is None or st.residual is None
                or previous.shape != now.shape):
            st.accumulated = 0.0
            return False
        if self.rate > 0:
            return self.scheduled_skip()
        st.accumulated += rescale(self.poly, relative_l1(now, previous))
        if st.accumulated < self.config.threshold:
            return True
        st.accumulated = 0.0
        return False

    def head(self, block: Block, forward: Any) -> Any:
        """The first block: decide; on a skip return its input plus the cached residual."""

        def run(*args: Any, **kwargs: Any) -> Any:
            st = self.state()
            st.skip = self.decide(st, self.modulated(args, kwargs))
            self.count(st.skip)
            hidden, encoder = block.inputs(args, kwargs)
            if st.skip:
                return block.result(hidden + st.residual[0], add_stream(encoder, st.residual[1]))
            st.base = (hidden, encoder)
            return forward(*args, **kwargs)

        return run


def fits(config: TeaCacheConfig) -> bool:
    """Whether prepare fits P: not for the published one, nor on a fixed schedule (no P)."""
    return config.coefficients == "fit" and config.rate == 0


def training_prompts(config: TeaCacheConfig, data: PrepareData) -> tuple[str, ...]:
    """The fitting prompts (none for the published polynomial or a fixed schedule)."""
    if not fits(config):
        return ()
    return tuple(calibration_texts(data.prompts, config.calib_prompts))


def fit_pairs(pipe: Any, config: TeaCacheConfig, data: PrepareData) -> tuple[list, list]:
    """(input changes, output changes) of consecutive steps of every call index, from the
    full-compute trajectories of the fitting prompts."""
    blocks = denoiser_blocks(pipe, "teacache")
    modulated, ctx = ModulatedInput(blocks[0]), StepContext()
    calls = GenerationCache(ctx)  # store: call index -> (modulated input, output) of its last
    xs: list[float] = []
    ys: list[float] = []
    pending: list[torch.Tensor] = []

    def before(module: Any, args: tuple, kwargs: dict) -> None:
        calls.begin_call()

    def first_block(module: Any, args: tuple, kwargs: dict) -> None:
        pending.append(modulated(args, kwargs))

    def after(module: Any, args: tuple, kwargs: dict, out: Any) -> None:
        now = (pending.pop(), first_output(out).detach())
        prev = calls.store.get(calls.call)
        if prev is not None and prev[0].shape == now[0].shape:
            xs.extend(row_changes(now[0], prev[0]))
            ys.extend(row_changes(now[1], prev[1]))
        calls.store[calls.call] = now

    hooks = [pipe.transformer.register_forward_pre_hook(before, with_kwargs=True),
             blocks[0].module.register_forward_pre_hook(first_block, with_kwargs=True),
             pipe.transformer.register_forward_hook(after, with_kwargs=True)]
    try:
        record_calls(pipe, pipe.transformer, data, list(training_prompts(config, data)),
                     config.calib_steps, config.calib_guidance, "teacache", ctx, keep=False)
    finally:
        for h in hooks:
            h.remove()
    return xs, ys


def prepare(pipe: Any, config: TeaCacheConfig, data: PrepareData) -> dict[str, torch.Tensor]:
    """P's coefficients: fitted on the model's own trajectories, or FLUX.1-dev's (also stored,
    unused, on a fixed schedule)."""
    if not fits(config):
        return {POLY: torch.tensor(FLUX_DEV, dtype=torch.float64)}
    xs, ys = fit_pairs(pipe, config, data)
    if len(xs) <= DEGREE:
        raise DiffbenchError(f"teacache: {len(xs)} step pairs cannot fit a degree-{DEGREE} "
                             "polynomial; raise calib_steps or calib_prompts")
    data.log(f"[teacache] fitted P on {len(xs)} step pairs")
    return {POLY: torch.tensor(np.polyfit(xs, ys, DEGREE), dtype=torch.float64)}


def apply(pipe: Any, config: TeaCacheConfig, ctx: StepContext,
          artifact: dict[str, torch.Tensor]) -> MethodHandle:
    """Wrap the first block (decision, skip), the others (skip) and the last (residual)."""
    blocks = denoiser_blocks(pipe, "teacache")
    modulated = ModulatedInput(blocks[0])
    handle = MethodHandle(pipe, "teacache", config)
    if (config.threshold == 0 and config.rate == 0) or len(blocks) < 2:
        return handle
    if config.rate == 0 and POLY not in artifact:
        raise DiffbenchError("teacache needs its rescaling polynomial (prepare's artifact)")
    TeaCache(ctx, config, artifact.get(POLY), modulated, handle.stats).install(handle, pipe,
                                                                               blocks)
    return handle
