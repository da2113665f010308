"""One guided sampler (DDIM, Song et al. 2021, or any diffusers scheduler) for prepare steps.

Teacher pools, quantisation calibration and the erasure methods' x_t all run the same loop:
x_T -> scheduler steps with classifier-free guidance (Ho & Salimans 2022), optionally stopped
early, with a callback before each step. How the denoiser is asked for its conditional and
unconditional predictions (one batched call or two calls) is the caller's `Predict`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from methods._common.training import guided

# predict(x_in, t, with_uncond) -> (eps_uncond or None, eps_cond)
Predict = Callable[[torch.Tensor, Any, bool], tuple[torch.Tensor | None, torch.Tensor]]


@torch.no_grad()
def sample(sched: Any, x: torch.Tensor, predict: Predict, guidance: float | None,
           stop: int | None = None, on_step: Callable[[int], None] | None = None) -> torch.Tensor:
    """x_T (already scaled by init_noise_sigma) through `sched.timesteps[:stop]`: at step i
    `on_step(i)`, then eps = guided(eps_u, eps_c, guidance), or eps_c when guidance is None."""
    for i, t in enumerate(sched.timesteps[:stop]):
        if on_step is not None:
            on_step(i)
        x_in = sched.scale_model_input(x, t)
        eps_u, eps_c = predict(x_in, t, guidance is not None)
        eps = eps_c if guidance is None else guided(eps_u, eps_c, guidance)
        x = sched.step(eps, t, x).prev_sample
    return x


def batched_cfg(unet: Any, cond: torch.Tensor, uncond: torch.Tensor) -> Predict:
    """Both predictions from one UNet call on the 2N batch (uncond half first), as pipelines do."""
    text = torch.cat([uncond.expand(cond.shape[0], -1, -1), cond])

    def predict(x: torch.Tensor, t: Any, with_uncond: bool) -> tuple:
        if not with_uncond:
            return None, unet(x, t, encoder_hidden_states=cond).sample
        eps_u, eps_c = unet(torch.cat([x, x]), t, encoder_hidden_states=text).sample.chunk(2)
        return eps_u, eps_c

    return predict


def separate_cfg(eps: Callable[[torch.Tensor, Any, torch.Tensor], torch.Tensor],
                 cond: torch.Tensor, uncond: torch.Tensor) -> Predict:
    """Conditional, then (when guided) unconditional prediction, one `eps(x, t, emb)` call each."""

    def predict(x: torch.Tensor, t: Any, with_uncond: bool) -> tuple:
        eps_c = eps(x, t, cond)
        return (eps(x, t, uncond) if with_uncond else None), eps_c

    return predict
