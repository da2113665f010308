"""Recorded denoiser calls: training data for transformer denoisers from the pipeline's own call.

A transformer pipeline (SD3, FLUX, DiT, PixArt) builds its denoiser's inputs itself (joint text
tokens, RoPE ids, pooled projections, the guidance embedding), so instead of rebuilding them by
hand as the UNet methods do, a method runs the model's real call (PrepareData.call_kwargs: its
default resolution, latents out) under a StepContext while a hook records every denoiser call's
arguments and FP output. Replaying `batch_size` image rows of one recorded call through a
trained copy and regressing the recorded output distils the FP model on its own trajectory
inputs across all timesteps, the data PTQ4DM / Q-Diffusion calibrate on (Shang et al., arXiv
2211.15736; Li et al., arXiv 2302.04304). Used by the quantisers (LSQ, TDQ) and ASE.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from harness.errors import DiffbenchError
from harness.prepare import PrepareData
from harness.steps import StepContext

CALL_BATCH = 8  # prompts per recorded pipeline call
# denoiser arguments whose first dimension is the image batch (diffusers' transformer models);
# every other argument (RoPE ids, attention kwargs) is shared by all rows of a call
BATCHED = ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep",
           "guidance", "class_labels", "encoder_attention_mask")
# what a call's timestep is multiplied by to be a scheduler timestep (0..1000), by denoiser
# class: FLUX pipelines pass t / 1000
CALL_TIMESTEP_UNIT = {"FluxTransformer2DModel": 1000.0}


def call_unit(denoiser: Any) -> float:
    """What a call's timestep is multiplied by to be a scheduler timestep (FLUX: 1000)."""
    return CALL_TIMESTEP_UNIT.get(type(denoiser).__name__, 1.0)


class Call(NamedTuple):
    """One recorded denoiser call: its sampler step, arguments (CPU) and FP output (CPU)."""

    step: int
    kwargs: dict[str, Any]
    output: torch.Tensor

    @property
    def rows(self) -> int:
        return self.output.shape[0]


def first_output(out: Any) -> torch.Tensor:
    """The prediction of a diffusers model output (`.sample`, or a tuple's first entry)."""
    if isinstance(out, torch.Tensor):
        return out
    return out.sample if hasattr(out, "sample") else out[0]


def _to(value: Any, device: Any, float_dtype: torch.dtype | None = None) -> Any:
    if not isinstance(value, torch.Tensor):
        return value
    dtype = float_dtype if float_dtype is not None and value.is_floating_point() else None
    return value.detach().to(device=device, dtype=dtype)


class CallRecorder:
    """A forward hook on the denoiser: each call's arguments by name and its output, on CPU."""

    def __init__(self, denoiser: torch.nn.Module, ctx: StepContext, n_steps: int):
        self.signature = inspect.signature(denoiser.forward)
        self.ctx, self.n_steps, self.calls = ctx, n_steps, []

    def step(self) -> int:
        """The sampler step in progress (a call after the last step counts as the last)."""
        return min(self.ctx.step, self.n_steps - 1)

    def hook(self, module: torch.nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
        bound = self.signature.bind_partial(*args, **kwargs).arguments
        bound = {k: _to(v, "cpu").clone() if isinstance(v, torch.Tensor) else v
                 for k, v in bound.items() if k != "return_dict"}
        self.calls.append(Call(self.step(), bound, first_output(out).detach().cpu().clone()))


def record_calls(pipe: Any, denoiser: torch.nn.Module, data: PrepareData, texts: list[str],
                 steps: int, guidance: float, method: str, ctx: StepContext | None = None,
                 keep: bool = True) -> tuple[list[Call], torch.Tensor]:
    """Run the model's pipeline call on `texts` (CALL_BATCH at a time, seeds data.seed + i) for
    `steps` steps; (every denoiser call, or none unless `keep`, the scheduler's timesteps).
    `ctx` counts the steps (hooks of the caller read it)."""
    if data.call_kwargs is None:
        raise DiffbenchError(f"{method}: training on {type(denoiser).__name__} runs the model's "
                             "pipeline call, and this preparation was given none "
                             "(PrepareData.call_kwargs)")
    ctx = ctx or StepContext()
    recorder = CallRecorder(denoiser, ctx, steps)
    hook = denoiser.register_forward_hook(recorder.hook if keep else lambda *_: None,
                                          with_kwargs=True)
    timesteps = torch.zeros(0)
    try:
        for start in range(0, len(texts), CALL_BATCH):
            batch = texts[start:start + CALL_BATCH]
            data.log(f"[{method}] pipeline calls: prompts {start + 1}-{start + len(batch)} of "
                     f"{len(texts)}, {steps} steps")
            generators = [torch.Generator().manual_seed(data.seed + start + i)
                          for i in range(len(batch))]
            kwargs = data.call_kwargs(batch, steps, guidance, generators)
            kwargs["output_type"] = "latent"
            with torch.no_grad():
                ctx.generate(pipe, **kwargs)
            timesteps = pipe.scheduler.timesteps.detach().float().cpu().clone()
    finally:
        hook.remove()
    if len(timesteps) != steps:
        raise DiffbenchError(f"{method}: the pipeline call ran {len(timesteps)} steps, "
                             f"{steps} were asked for")
    return recorder.calls, timesteps


def rows_of(call: Call, index: torch.Tensor, device: Any, dtype: torch.dtype) -> dict[str, Any]:
    """The call's arguments for the image rows `index` (batched arguments sliced, the rest
    shared), floating tensors cast to `dtype`, on `device`."""
    out = {}
    for name, value in call.kwargs.items():
        if name in BATCHED and isinstance(value, torch.Tensor) and value.dim() > 0:
            value = value[index]
        out[name] = _to(value, device, dtype)
    return out


def replay_loss(denoiser: torch.nn.Module, calls: list[Call], batch_size: int,
                generator: torch.Generator,
                before: Callable[[Call], None] = lambda call: None) -> torch.Tensor:
    """MSE between `denoiser`'s and the recorded FP prediction on `batch_size` rows of one
    recorded call (drawn at random, rows without replacement); `before(call)` runs first."""
    call = calls[int(torch.randint(0, len(calls), (1,), generator=generator))]
    index = torch.randperm(call.rows, generator=generator)[:batch_size]
    param0 = next(denoiser.parameters())
    before(call)
    out = first_output(denoiser(**rows_of(call, index, param0.device, param0.dtype),
                                return_dict=False))
    return F.mse_loss(out.float(), call.output[index].to(param0.device).float())
