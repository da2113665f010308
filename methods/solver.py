"""Solver swap: replace the pipeline's scheduler (DDIM, DPM-Solver++, UniPC, Euler) and step count.

DDIM: arXiv 2010.02502; DPM-Solver++: arXiv 2211.01095; UniPC: arXiv 2302.04867;
Euler (Karras et al.): arXiv 2206.00364. On flow-matching pipelines (SD3, FLUX) DPM-Solver++ and
UniPC run in their flow form (velocity prediction on the rectified-flow sigmas).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from harness.errors import DiffbenchError
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


# Flow-matching pipelines (SD3, FLUX: FlowMatchEulerDiscreteScheduler): the multistep solvers in
# their flow form (velocity prediction on the rectified-flow sigmas, the pipeline's shift).
FLOW_SOLVERS = ("dpmpp", "unipc")


def make_scheduler(name: str, base: Any) -> Any:
    """Scheduler `name` from the pipeline's scheduler `base` (betas, prediction type); on
    a flow-matching pipeline the solver's flow form (`use_flow_sigmas`, `flow_prediction`)."""
    import diffusers

    cls_name, overrides = SCHEDULERS[name]
    cls, base_config = getattr(diffusers, cls_name), base.config
    if not type(base).__name__.startswith("FlowMatch"):
        return cls.from_config(base_config, **overrides)
    if name not in FLOW_SOLVERS:
        raise DiffbenchError(f"solver.scheduler={name!r} has no flow-matching form; this "
                             f"pipeline's {type(base).__name__} needs one of "
                             f"{', '.join(FLOW_SOLVERS)}")
    if base_config.get("use_dynamic_shifting"):
        raise DiffbenchError("solver: the pipeline's scheduler shifts its sigmas per resolution "
                             "(use_dynamic_shifting, FLUX.1-dev), which the multistep solvers "
                             "do not; keep its scheduler")
    return cls(num_train_timesteps=base_config.get("num_train_timesteps", 1000),
               use_flow_sigmas=True, prediction_type="flow_prediction",
               flow_shift=float(base_config.get("shift", 1.0)), **overrides)


def apply(pipe: Any, config: SolverConfig, ctx: StepContext) -> MethodHandle:
    """Swap `pipe.scheduler`; `remove()` puts the original scheduler object back."""
    handle = MethodHandle(pipe, "solver", config)
    handle.swap_attr(pipe, "scheduler", make_scheduler(config.scheduler, pipe.scheduler))
    if config.steps:
        handle.call_kwargs["num_inference_steps"] = config.steps
    return handle
