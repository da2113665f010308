"""One pipeline call on a batch of prompts, with per-image seeds that ignore batching."""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from harness.models import ModelSpec
from harness.steps import StepContext


def to_uint8(images: Any) -> torch.Tensor:
    """Pipeline output (torch NCHW or numpy NHWC, float in [0, 1]) as uint8 NHWC on the CPU."""
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images)
    else:
        images = images.detach().permute(0, 2, 3, 1)
    images = images.float().cpu()
    if not torch.isfinite(images).all():
        raise FloatingPointError("the pipeline produced NaN or infinite pixel values")
    images = images.clamp(0, 1)
    return (images * 255).round().to(torch.uint8)


def call_kwargs(spec: ModelSpec, prompts: Sequence[str], seeds: Sequence[int], steps: int,
                guidance: float, resolution: int, overrides: Mapping[str, Any]) -> dict:
    """Arguments of one pipeline call; a method's overrides (e.g. step count) win."""
    generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
    kwargs = spec.call_kwargs(list(prompts), steps, guidance, resolution, generators)
    kwargs.update(overrides)
    return kwargs


def model_call(spec: ModelSpec) -> Callable[[list[str], int, float, list[torch.Generator]], dict]:
    """The model's pipeline-call arguments at its default resolution: PrepareData.call_kwargs."""
    return functools.partial(_default_resolution_call, spec)


def _default_resolution_call(spec: ModelSpec, prompts: list[str], steps: int, guidance: float,
                             generators: list[torch.Generator]) -> dict:
    return spec.call_kwargs(list(prompts), steps, guidance, spec.resolution, generators)


def generate(pipe: Any, ctx: StepContext, kwargs: dict) -> torch.Tensor:
    """Run the pipeline under the step context; uint8 NHWC images."""
    with torch.inference_mode():
        out = ctx.generate(pipe, **kwargs)
    return to_uint8(out.images)
