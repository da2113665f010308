"""The runner-owned step context: which denoising step of which generation is in progress."""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass
class StepContext:
    """Counts denoising steps of each pipeline call; methods read `step`, never timesteps.

    `generate()` is the one way a pipeline is called: it starts a new generation and counts
    `scheduler.step` calls (one per denoising step in every diffusers pipeline), so the count
    works for any pipeline and any scheduler a method swapped in.
    """

    step: int = 0  # index of the denoising step being computed (0-based)
    num_steps: int = 0  # denoising steps of the current generation
    generation: int = 0  # increments at every pipeline call
    guidance: bool = False  # classifier-free guidance: the UNet batch holds uncond + cond

    def begin(self, num_steps: int, guidance: bool) -> None:
        self.generation += 1
        self.step, self.num_steps, self.guidance = 0, num_steps, guidance

    def generate(self, pipe: Any, **kwargs: Any) -> Any:
        """Call `pipe(**kwargs)` with this context tracking its steps."""
        guidance = float(kwargs.get("guidance_scale", 0.0) or 0.0) > 1.0
        self.begin(int(kwargs.get("num_inference_steps", 0) or 0), guidance)
        scheduler = pipe.scheduler
        had_own = "step" in scheduler.__dict__
        original = scheduler.__dict__.get("step")
        bound = scheduler.step

        def counted_step(*args: Any, **kw: Any) -> Any:
            out = bound(*args, **kw)
            self.step += 1
            return out

        scheduler.step = counted_step
        try:
            return pipe(**kwargs)
        finally:
            if had_own:
                scheduler.step = original
            else:
                del scheduler.step
