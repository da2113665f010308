"""Preparing quantised denoisers (ptq_minmax, lsq, tdq): calibration and LSQ distillation.

Calibration (TDQ's static baselines, So et al., arXiv 2306.02316, Sec. 5): the FP pipeline
samples the calibration prompts with classifier-free guidance while a pre-hook records the
`percentile` of |x| of every quantised layer's input at every step. LSQ distillation (Esser et
al., arXiv 1902.08153): a float32 copy of the denoiser with trainable LSQ step sizes (gradient
scale 1 / sqrt(N * Qp)) regresses the FP prediction, SGD with momentum 0.9. On a UNet the
sampling is run here (DDIM-style loop, the UNet's own signature) and distillation noises the FP
model's own final samples, x_t = q(x_t | x_0) at a random t; on a transformer both go through
the model's own pipeline call (methods/_common/calls.py): ranges recorded during it,
distillation on `batch_size` rows of its recorded denoiser calls. The config bases hold the fields
the three methods share (each registers its own subclass).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from harness.errors import DiffbenchError
from harness.params import param
from harness.prepare import PrepareData
from harness.steps import StepContext
from methods._common import sampling
from methods._common.calls import record_calls, replay_loss
from methods._common.quant import (
    ActSteps,
    Calibration,
    RangeRecorder,
    fake_quant,
    grad_scale,
    is_unet,
    lsq_grad_scale,
    quant_layers,
    quantized_forward,
    step_from_range,
)
from methods._common.training import (
    changed_parameters,
    latent_shape,
    noisy_latents,
    text_embeddings,
)

CALIB_BATCH = 8  # prompts per calibration trajectory
MIN_STEP = 1e-8


@dataclass(frozen=True)
class StaticQuantConfig:
    """Fields of every quantisation method: bit widths and the calibration budget."""

    w_bits: int = param(8, "weight bits (per-output-channel symmetric)", low=2, high=16)
    a_bits: int = param(8, "input bits of every quantised layer (per-tensor symmetric)",
                        low=2, high=16)
    calib_prompts: int = param(32, "calibration prompts: the first n of the cell's prompt set",
                               low=1, high=4096)
    calib_steps: int = param(20, "sampler steps of each calibration trajectory", low=1, high=1000)
    calib_guidance: float = param(5.0, "classifier-free guidance of the calibration trajectories",
                                  low=0.0, high=50.0)
    percentile: float = param(100.0, "percentile of |x| taken as an input's range (100 = max)",
                              low=50.0, high=100.0)


@dataclass(frozen=True)
class LSQTrainingConfig(StaticQuantConfig):
    """Fields of the methods that distil step sizes (lsq, tdq "qat"): the QAT budget."""

    steps: int = param(200, "distillation (QAT) steps", low=1, high=1_000_000)
    lr: float = param(1e-3, "learning rate of LSQ's SGD (momentum 0.9): step sizes, TDQ's "
                      "MLPs, weights", low=1e-8, high=1.0)
    batch_size: int = param(4, "latents per distillation step (x2: cond + uncond)",
                            low=1, high=1024)
    train_weights: bool = param(False, "also train the UNet's quantised weights (full QAT)",
                                choices=(False, True))


# --- calibration ---------------------------------------------------------------------------
def calibration_texts(prompts: tuple[str, ...], n: int) -> list[str]:
    """The first n prompts of the cell's set, cycled if it has fewer."""
    if not prompts:
        raise DiffbenchError("quantisation calibration needs at least one prompt")
    return [prompts[i % len(prompts)] for i in range(n)]


def sample(pipe: Any, unet: Any, cond: torch.Tensor, uncond: torch.Tensor, steps: int,
           guidance: float, generator: torch.Generator,
           on_step: Callable[[int], None]) -> tuple[torch.Tensor, torch.Tensor]:
    """Guided sampling with a copy of the pipeline's scheduler: (final latents, timesteps)."""
    sched = copy.deepcopy(pipe.scheduler)
    param0 = next(unet.parameters())
    sched.set_timesteps(steps, device=param0.device)
    shape = latent_shape(pipe, cond.shape[0])
    latents = torch.randn(shape, generator=generator).to(param0.device, param0.dtype)
    latents = latents * sched.init_noise_sigma
    latents = sampling.sample(sched, latents, sampling.batched_cfg(unet, cond, uncond), guidance,
                              on_step=on_step)
    return latents, sched.timesteps.detach().cpu()


def calibration_prompts(config: StaticQuantConfig, data: PrepareData) -> tuple[str, ...]:
    """The calibration prompts: the first `calib_prompts` of the cell's set (cycled)."""
    return tuple(calibration_texts(data.prompts, config.calib_prompts))


def calibrate_by_call(pipe: Any, denoiser: Any, config: StaticQuantConfig, data: PrepareData,
                      texts: list[str], method: str, keep_calls: bool = True) -> Calibration:
    """Calibration through the model's own pipeline call: input ranges per step recorded while
    it runs, and its denoiser calls kept for distillation (`keep_calls`)."""
    layers = quant_layers(denoiser)
    ctx = StepContext()
    ranges = RangeRecorder(len(layers), config.calib_steps, config.percentile)
    hooks = [m.register_forward_pre_hook(ranges.hook(i)) for i, (_, m) in enumerate(layers)]
    hooks.append(denoiser.register_forward_pre_hook(
        lambda *_: setattr(ranges, "step", min(ctx.step, config.calib_steps - 1))))
    try:
        calls, timesteps = record_calls(pipe, denoiser, data, texts, config.calib_steps,
                                        config.calib_guidance, method, ctx, keep_calls)
    finally:
        for h in hooks:
            h.remove()
    return Calibration(ranges.ranges, timesteps, ranges.features, calls=calls)


def calibrate(pipe: Any, denoiser: Any, config: StaticQuantConfig, data: PrepareData,
              distils: bool = True) -> Calibration:
    """Sample the calibration prompts with the FP denoiser, recording every layer's input range
    per step (and, if it `distils` after, the distillation data): by hand on a UNet, by the
    pipeline's call otherwise."""
    texts = list(calibration_prompts(config, data))
    if not is_unet(pipe, denoiser):
        return calibrate_by_call(pipe, denoiser, config, data, texts, config.method_name,
                                 keep_calls=distils)
    unet, param0 = denoiser, next(denoiser.parameters())
    cond = text_embeddings(pipe, texts).to(param0.device, param0.dtype)
    uncond = text_embeddings(pipe, [""]).to(param0.device, param0.dtype)
    layers = quant_layers(unet)
    recorder = RangeRecorder(len(layers), config.calib_steps, config.percentile)
    hooks = [m.register_forward_pre_hook(recorder.hook(i)) for i, (_, m) in enumerate(layers)]
    generator = torch.Generator().manual_seed(data.seed)
    finals, timesteps = [], None
    try:
        for start in range(0, len(texts), CALIB_BATCH):
            data.log(f"[calibrate] prompts {start + 1}-{min(start + CALIB_BATCH, len(texts))} "
                     f"of {len(texts)}, {config.calib_steps} steps")
            latents, timesteps = sample(pipe, unet, cond[start:start + CALIB_BATCH], uncond,
                                        config.calib_steps, config.calib_guidance, generator,
                                        lambda i: setattr(recorder, "step", i))
            finals.append(latents)
    finally:
        for h in hooks:
            h.remove()
    return Calibration(recorder.ranges, timesteps, recorder.features, torch.cat(finals),
                       cond, uncond)


# --- LSQ distillation --------------------------------------------------------------------
class QuantStudent:
    """A float32 copy of the denoiser whose quantised layers fake-quantise weight and input with
    trainable LSQ step sizes; `acts.current` is set per call by the caller."""

    def __init__(self, denoiser: Any, config: LSQTrainingConfig,
                 w_steps: dict[str, torch.Tensor]):
        self.denoiser = copy.deepcopy(denoiser).float().train().requires_grad_(False)
        self.layers = quant_layers(self.denoiser)
        self.acts = ActSteps()
        self.w_steps = {name: torch.nn.Parameter(w_steps[f"w_step.{name}"].clone().float())
                        for name, _ in self.layers}
        for i, (name, m) in enumerate(self.layers):
            m.weight.requires_grad_(config.train_weights)
            g = lsq_grad_scale(m.weight[0].numel(), config.w_bits)
            m.forward = quantized_forward(m, i, self.acts, config.a_bits,
                                          self._weight(m, self.w_steps[name], g, config.w_bits))

    @staticmethod
    def _weight(m: torch.nn.Module, step: torch.Tensor, g: float, bits: int) -> Callable:
        return lambda: fake_quant(m.weight, grad_scale(step, g), bits)

    def parameters(self) -> list[torch.Tensor]:
        """Weight step sizes, plus the quantised weights when they are trained."""
        weights = [m.weight for _, m in self.layers if m.weight.requires_grad]
        return list(self.w_steps.values()) + weights

    def artifact(self, original: Any) -> dict[str, torch.Tensor]:
        """Trained weight steps (`w_step.*`) and changed weights (`weight.<param>`)."""
        out = {f"w_step.{k}": v.detach().clone() for k, v in self.w_steps.items()}
        names = {f"{name}.weight" for name, _ in self.layers}
        changed = changed_parameters(self.denoiser, original, lambda n: n in names)
        out.update({f"weight.{k}": v for k, v in changed.items()})
        return out

    @torch.no_grad()
    def clamp_steps(self) -> None:
        for step in self.w_steps.values():
            step.clamp_(min=MIN_STEP)


def distill_loss(pipe: Any, student: QuantStudent, calib: Calibration, batch_size: int,
                 act_steps_at: Callable[[float], torch.Tensor],
                 generator: torch.Generator) -> torch.Tensor:
    """MSE between the quantised student's and the FP prediction: on a UNet at one random t of
    q(x_t | x_0); on a transformer on rows of one recorded pipeline call (calls.py)."""
    if calib.calls is not None:
        def set_steps(call: Any) -> None:
            student.acts.current = act_steps_at(float(calib.timesteps[call.step]))

        return replay_loss(student.denoiser, calib.calls, batch_size, generator, set_steps)
    idx = torch.randint(0, calib.x0.shape[0], (batch_size,), generator=generator)
    t = int(torch.randint(0, pipe.scheduler.config.num_train_timesteps, (1,),
                          generator=generator))
    x_t, tt, _ = noisy_latents(pipe, calib.x0[idx], generator, (t, t + 1))
    model_in, tt = torch.cat([x_t, x_t]), torch.cat([tt, tt])
    text = torch.cat([calib.cond[idx], calib.uncond.expand(batch_size, -1, -1)])
    with torch.no_grad():
        target = pipe.unet(model_in, tt, encoder_hidden_states=text).sample.float()
    student.acts.current = act_steps_at(t)
    out = student.denoiser(model_in.float(), tt, encoder_hidden_states=text.float()).sample
    return F.mse_loss(out, target)


def lsq_optimizer(params: list[torch.Tensor], lr: float) -> torch.optim.Optimizer:
    """LSQ's optimiser: SGD with momentum 0.9 (the gradient scale assumes plain SGD)."""
    return torch.optim.SGD(params, lr=lr, momentum=0.9)


def distill(pipe: Any, student: QuantStudent, calib: Calibration, config: LSQTrainingConfig,
            data: PrepareData, optimizers: list[torch.optim.Optimizer],
            act_steps_at: Callable[[float], torch.Tensor],
            after_step: Callable[[], None] = lambda: None) -> list[float]:
    """QAT by distillation: `config.steps` steps of every optimiser; the loss per step."""
    generator = torch.Generator().manual_seed(data.seed + 1)
    every, losses = max(1, config.steps // 10), []
    for step in range(config.steps):
        loss = distill_loss(pipe, student, calib, config.batch_size, act_steps_at, generator)
        for optimizer in optimizers:
            optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for optimizer in optimizers:
            optimizer.step()
        student.clamp_steps()
        after_step()
        losses.append(loss.item())
        if (step + 1) % every == 0 or step + 1 == config.steps:
            data.log(f"[distill] step {step + 1}/{config.steps} loss {loss.item():.3e}")
    return losses


def static_act_steps(calib: Calibration, bits: int) -> torch.Tensor:
    """One input step per layer for all timesteps: max over steps of the range / Qp."""
    return step_from_range(calib.ranges.amax(dim=1), bits)


def act_grad_scales(calib: Calibration, bits: int) -> torch.Tensor:
    """LSQ gradient scale of each layer's input step: 1 / sqrt(N_features * Qp)."""
    return torch.tensor([lsq_grad_scale(int(n), bits) for n in calib.features])
