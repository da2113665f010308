"""Static min-max PTQ (TDQ's baseline, So et al., arXiv 2306.02316): one input step per layer.

TDQ's static baseline (paper Sec. 5), at the same bit widths and on the same layers: the weights
of every Conv2d and Linear of the UNet (or of a transformer denoiser: SD3, FLUX, DiT, PixArt,
see methods/_common/quant.py) are fake-quantised per output channel, symmetric; the
input of each of these layers per tensor, symmetric, with ONE step size for all timesteps (zero
point 0, integer grid {-Qp..Qp}, Qp = 2^(b-1) - 1; see methods/_common/quant.py). Symmetric
activations waste about one level on post-SiLU inputs (>= -0.28); TDQ's released code has the
same symmetric quantiser as its default. Attention matmuls (QK^T, AV), norms and the text
encoder / VAE stay in floating point.

Calibration only: the FP pipeline samples `calib_prompts` prompts for `calib_steps` steps with
classifier-free guidance (a UNet by a DDIM-style loop, a transformer by its pipeline's own call at
the model's default resolution, _common/calls.py); a pre-hook records the `percentile` of |x|
(100 = max) of each layer's input at every step; the static step is the maximum over steps and
prompts divided by Qp. Weight steps: per-channel max |w| / Qp. Default budget: 32 calibration
prompts x 20 steps. Apply precomputes the quantised weights once, so inference pays only the input
fake-quantisation (simulated quantisation: no integer kernels, no speed-up). `lsq` (methods/lsq.py)
learns these step sizes; `tdq` makes the input step a function of the timestep.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from harness.method import MethodHandle, register_method
from harness.prepare import PrepareData
from harness.steps import StepContext
from methods._common import quant as Q
from methods._common import quant_train as QT


@register_method("ptq_minmax", touches=Q.TOUCHES)
@dataclass(frozen=True)
class PTQMinMaxConfig(QT.StaticQuantConfig):
    """Static min-max PTQ (TDQ's baseline): one input step per layer from calibration maxima."""


training_prompts = QT.calibration_prompts  # the first `calib_prompts` of the cell's set (cycled)


def prepare(pipe: Any, config: PTQMinMaxConfig, data: PrepareData) -> dict[str, torch.Tensor]:
    """Min-max PTQ: static input steps from calibration, per-channel weight steps."""
    denoiser = Q.require_quant_denoiser(pipe, "ptq_minmax")
    calib = QT.calibrate(pipe, denoiser, config, data, distils=False)
    return {"a_step": QT.static_act_steps(calib, config.a_bits),
            **Q.weight_steps(Q.quant_layers(denoiser), config.w_bits)}


def apply(pipe: Any, config: PTQMinMaxConfig, ctx: StepContext,
          artifact: dict[str, torch.Tensor]) -> MethodHandle:
    """Fake-quantise every Conv2d/Linear of the denoiser with the prepared static step sizes."""
    return Q.apply_static(pipe, config, artifact)
