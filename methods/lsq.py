"""Static LSQ (Esser et al., arXiv 1902.08153): min-max init, steps learned by distillation.

TDQ's LSQ baseline (So et al., arXiv 2306.02316, Sec. 5) on `ptq_minmax`'s layers and grids
(methods/ptq_static.py): its min-max steps as initialisation, then LSQ training of every step
size (weights per channel and inputs per layer; gradient scale 1 / sqrt(N * Qp), N = weights per
channel or input features per sample), optionally of the weights too, by distilling the FP
UNet's noise prediction: x_t = q(x_t | x_0) at one random t per batch from the FP model's own
calibration samples x_0, conditional and unconditional text, MSE to the FP output, SGD with
momentum 0.9 as in LSQ (on a transformer: the recorded FP outputs of its calibration calls,
_common/calls.py). LSQ's relative step update grows with the bit width (the gradient
scale offsets only sqrt(Qp) of the 1/Qp step): at 16 bits use a far smaller lr (1e-5).

Paper recipe (LSQ): fine-tuning of an FP ImageNet network for 90 epochs (SGD, momentum 0.9,
cosine lr from 0.01, weight decay), with step sizes initialised to 2<|v|>/sqrt(Qp); TDQ trains
its LSQ baseline on the diffusion models' training data (CIFAR-10, LSUN) with the models' own
training loss, for its full QAT schedule (paper Sec. 5). Our default budget: 32 calibration
prompts x 20 steps, 200 distillation steps of batch 4. Deviations: min-max initialisation
instead of 2<|v|>/sqrt(Qp) (the budget is too small to recover from a poor start), data-free
distillation from the FP model instead of the training set, no weight decay or lr schedule;
weights stay frozen unless `train_weights`. Apply precomputes the quantised weights once, so
inference pays only the input fake-quantisation (simulated quantisation: no speed-up).
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


@register_method("lsq", touches=Q.TOUCHES)
@dataclass(frozen=True)
class LSQConfig(QT.LSQTrainingConfig):
    """Static LSQ (Esser et al., arXiv 1902.08153): min-max init, steps learned by distillation."""


training_prompts = QT.calibration_prompts  # the first `calib_prompts` of the cell's set (cycled)


def prepare(pipe: Any, config: LSQConfig, data: PrepareData) -> dict[str, torch.Tensor]:
    """LSQ: min-max initialisation, then all step sizes trained by distillation."""
    denoiser = Q.require_quant_denoiser(pipe, "lsq")
    calib = QT.calibrate(pipe, denoiser, config, data)
    student = QT.QuantStudent(denoiser, config,
                              Q.weight_steps(Q.quant_layers(denoiser), config.w_bits))
    device = next(student.denoiser.parameters()).device
    a_step = torch.nn.Parameter(QT.static_act_steps(calib, config.a_bits).to(device))
    g = QT.act_grad_scales(calib, config.a_bits).to(device)

    def clamp() -> None:
        with torch.no_grad():
            a_step.clamp_(min=QT.MIN_STEP)

    optimizer = QT.lsq_optimizer([a_step, *student.parameters()], config.lr)
    QT.distill(pipe, student, calib, config, data, [optimizer],
               lambda t: Q.grad_scale(a_step, g), clamp)
    return {"a_step": a_step.detach().clone(), **student.artifact(denoiser)}


def apply(pipe: Any, config: LSQConfig, ctx: StepContext,
          artifact: dict[str, torch.Tensor]) -> MethodHandle:
    """Fake-quantise every Conv2d/Linear of the denoiser with the learned static step sizes."""
    return Q.apply_static(pipe, config, artifact)
