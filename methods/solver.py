"""Solver swap: replace the pipeline's scheduler (DDIM, DPM-Solver++, UniPC, Euler) and step count.

DDIM: arXiv 2010.02502; DPM-Solver++: arXiv 2211.01095; UniPC: arXiv 2302.04867;
Euler (Karras et al.): arXiv 2206.00364.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from harness.method import MethodHandle, register_method
from harness.params import param
from harness.steps import StepContext

# name -> (diffusers scheduler class, config overrides)
SCHEDULERS: dict[str, tuple[str, dict]] = {
    "ddim": ("DDIMScheduler", {}),
    "dpmpp": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler-a": ("EulerAncestralDiscreteScheduler", {}),
}


@register_method("solver", touches=("scheduler",))
@dataclass(frozen=True)
class SolverConfig:
    """Which scheduler replaces the pipeline's, and how many denoising steps it takes."""

    scheduler: str = param("dpmpp", "diffusers scheduler family", choices=tuple(SCHEDULERS))
    steps: int = param(0, "denoising steps; 0 keeps the cell's step count", low=0, high=1000)


def make_scheduler(name: str, base_config: Any) -> Any:
    """Build scheduler `name` from the pipeline scheduler's config (betas, prediction type)."""
    import diffusers

    cls_name, overrides = SCHEDULERS[name]
    return getattr(diffusers, cls_name).from_config(base_config, **overrides)


def apply(pipe: Any, config: SolverConfig, ctx: StepContext) -> MethodHandle:
    """Swap `pipe.scheduler`; `remove()` puts the original scheduler object back."""
    handle = MethodHandle(pipe, "solver", config)
    handle.swap_attr(pipe, "scheduler", make_scheduler(config.scheduler, pipe.scheduler.config))
    if config.steps:
        handle.call_kwargs["num_inference_steps"] = config.steps
    return handle
