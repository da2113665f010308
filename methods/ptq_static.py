"""Min-max PTQ and LSQ (Esser et al., arXiv 1902.08153): one static input step size per layer.

TDQ's baselines (So et al., arXiv 2306.02316, Sec. 5), at the same bit widths and on the same
layers: the weights of every Conv2d and Linear of the UNet are fake-quantised per output
channel, symmetric; the input of each of these layers per tensor, symmetric, with ONE step size
for all timesteps (zero point 0, integer grid {-Qp..Qp}, Qp = 2^(b-1) - 1; see fake_quant.py).
Symmetric activations waste about one level on post-SiLU inputs (>= -0.28); TDQ's released
code has the same symmetric quantiser as its default. Attention matmuls (QK^T, AV), norms and
the text encoder / VAE stay in floating point.

- `ptq_minmax`: calibration only. The FP pipeline samples `calib_prompts` prompts for
  `calib_steps` DDIM-style steps with classifier-free guidance; a pre-hook records the
  `percentile` of |x| (100 = max) of each layer's input at every step; the static step is the
  maximum over steps and prompts divided by Qp. Weight steps: per-channel max |w| / Qp.
- `lsq`: the min-max steps above as initialisation, then LSQ training of every step size
  (weights per channel and inputs per layer; gradient scale 1 / sqrt(N * Qp), N = weights per
  channel or input features per sample), optionally of the weights too, by distilling the FP
  UNet's noise prediction: x_t = q(x_t | x_0) at one random t per batch from the FP model's own
  calibration samples x_0, conditional and unconditional text, MSE to the FP output, SGD with
  momentum 0.9 as in LSQ. LSQ's relative step update grows with the bit width (the gradient
  scale offsets only sqrt(Qp) of the 1/Qp step): at 16 bits use a far smaller lr (1e-5).

Paper recipe (LSQ): fine-tuning of an FP ImageNet network for 90 epochs (SGD, momentum 0.9,
cosine lr from 0.01, weight decay), with step sizes initialised to 2<|v|>/sqrt(Qp); TDQ trains
its LSQ baseline on the diffusion models' training data (CIFAR-10, LSUN) with the models' own
training loss, for its full QAT schedule (paper Sec. 5). Our default budget:
32 calibration prompts x 20 steps, 200 distillation steps of batch 4 (about a minute on the
embedded mini-sd on CPU). Deviations: min-max initialisation instead of 2<|v|>/sqrt(Qp) (the
budget is too small to recover from a poor start), data-free distillation from the FP model
instead of the training set, no weight decay or lr schedule; weights stay frozen unless
`train_weights`. Apply precomputes the quantised weights once, so inference pays only the
input fake-quantisation (simulated quantisation: no integer kernels, no speed-up).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from harness.errors import DiffbenchError
from harness.method import MethodHandle, register_method
from harness.params import param
from harness.prepare import PrepareData
from harness.steps import StepContext
from methods._common.training import (
    changed_parameters,
    guided,
    latent_shape,
    noisy_latents,
    text_embeddings,
)
from methods.fake_quant import (
    abs_percentile,
    channel_steps,
    fake_quant,
    grad_scale,
    lsq_grad_scale,
    quantized_weight_bytes,
    step_from_range,
)

TOUCHES = ("unet.weights", "unet.activations")
CALIB_BATCH = 8  # prompts per calibration trajectory
MIN_STEP = 1e-8


@register_method("ptq_minmax", touches=TOUCHES)
@dataclass(frozen=True)
class PTQMinMaxConfig:
    """Static min-max PTQ (TDQ's baseline): one input step per layer from calibration maxima."""

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


@register_method("lsq", touches=TOUCHES)
@dataclass(frozen=True)
class LSQConfig(PTQMinMaxConfig):
    """Static LSQ (Esser et al., arXiv 1902.08153): min-max init, steps learned by distillation."""

    steps: int = param(200, "distillation (QAT) steps", low=1, high=1_000_000)
    lr: float = param(1e-3, "learning rate of LSQ's SGD (momentum 0.9): step sizes, TDQ's "
                      "MLPs, weights", low=1e-8, high=1.0)
    batch_size: int = param(4, "latents per distillation step (x2: cond + uncond)",
                            low=1, high=1024)
    train_weights: bool = param(False, "also train the UNet's quantised weights (full QAT)",
                                choices=(False, True))


class Calibration(NamedTuple):
    """What a calibration pass over the FP sampler leaves: ranges and training data."""

    ranges: torch.Tensor  # (L, T) percentile |x| of each layer's input at each sampler step
    timesteps: torch.Tensor  # (T,) the sampler's timesteps
    features: torch.Tensor  # (L,) input values per sample of each layer (LSQ's N)
    x0: torch.Tensor  # (N, C, H, W) the FP model's final latents
    cond: torch.Tensor  # (N, tokens, dim) their prompts' text embeddings
    uncond: torch.Tensor  # (1, tokens, dim) the empty prompt's


class ActSteps:
    """Input step size of every quantised layer for the UNet call in progress, shape (L,)."""

    def __init__(self, current: torch.Tensor | None = None):
        self.current = current


def unet_of(pipe: Any, method: str) -> Any:
    """The pipeline's UNet, or a one-line error for pipelines without one (DiT, PixArt)."""
    unet = getattr(pipe, "unet", None)
    if unet is None or not quant_layers(unet):
        raise DiffbenchError(f"{method} needs a UNet pipeline (pipe.unet with Conv2d/Linear "
                             f"layers); {type(pipe).__name__} has none")
    return unet


def quant_layers(unet: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """Every Conv2d and Linear of the UNet in module order: the layers TDQ quantises."""
    return [(n, m) for n, m in unet.named_modules()
            if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]


def _kernel(module: torch.nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    if isinstance(module, torch.nn.Conv2d):
        return module._conv_forward(x, weight, module.bias)
    return F.linear(x, weight, module.bias)


def quantized_forward(module: torch.nn.Module, index: int, acts: ActSteps, a_bits: int,
                      weight: Callable[[], torch.Tensor]) -> Callable[[torch.Tensor], Any]:
    """Layer forward on the fake-quantised input (step acts.current[index]) and weight()."""

    def forward(x: torch.Tensor) -> torch.Tensor:
        return _kernel(module, fake_quant(x, acts.current[index], a_bits), weight())

    return forward


# --- calibration ---------------------------------------------------------------------------
def calibration_texts(prompts: tuple[str, ...], n: int) -> list[str]:
    """The first n prompts of the cell's set, cycled if it has fewer."""
    if not prompts:
        raise DiffbenchError("quantisation calibration needs at least one prompt")
    return [prompts[i % len(prompts)] for i in range(n)]


@torch.no_grad()
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
    text = torch.cat([uncond.expand(cond.shape[0], -1, -1), cond])
    for i, t in enumerate(sched.timesteps):
        on_step(i)
        model_in = sched.scale_model_input(torch.cat([latents, latents]), t)
        eps_u, eps_c = unet(model_in, t, encoder_hidden_states=text).sample.chunk(2)
        latents = sched.step(guided(eps_u, eps_c, guidance), t, latents).prev_sample
    return latents, sched.timesteps.detach().cpu()


class RangeRecorder:
    """Forward pre-hooks: the largest percentile |x| of each layer's input at each step."""

    def __init__(self, n_layers: int, n_steps: int, percentile: float):
        self.ranges = torch.zeros(n_layers, n_steps)
        self.features = torch.zeros(n_layers, dtype=torch.long)
        self.percentile, self.step = percentile, 0

    def hook(self, index: int) -> Callable:
        def record(module: torch.nn.Module, args: tuple) -> None:
            x = args[0]
            value = abs_percentile(x, self.percentile).cpu()
            self.ranges[index, self.step] = torch.maximum(self.ranges[index, self.step], value)
            self.features[index] = x[0].numel()

        return record


def training_prompts(config: PTQMinMaxConfig, data: PrepareData) -> tuple[str, ...]:
    """The calibration prompts: the first `calib_prompts` of the cell's set (cycled)."""
    return tuple(calibration_texts(data.prompts, config.calib_prompts))


def calibrate(pipe: Any, unet: Any, config: PTQMinMaxConfig, data: PrepareData) -> Calibration:
    """Sample the calibration prompts with `unet` (FP), recording every layer's input range."""
    param0 = next(unet.parameters())
    texts = list(training_prompts(config, data))
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


def weight_steps(layers: list[tuple[str, torch.nn.Module]], bits: int) -> dict[str, torch.Tensor]:
    """Per-output-channel min-max weight steps, artifact keys `w_step.<layer>`."""
    return {f"w_step.{name}": channel_steps(m.weight, bits) for name, m in layers}


# --- LSQ distillation --------------------------------------------------------------------
class QuantStudent:
    """A float32 copy of the UNet whose quantised layers fake-quantise weight and input with
    trainable LSQ step sizes; `acts.current` is set per call by the caller."""

    def __init__(self, unet: Any, config: LSQConfig, w_steps: dict[str, torch.Tensor]):
        self.unet = copy.deepcopy(unet).float().train().requires_grad_(False)
        self.layers = quant_layers(self.unet)
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
        changed = changed_parameters(self.unet, original, lambda n: n in names)
        out.update({f"weight.{k}": v for k, v in changed.items()})
        return out

    @torch.no_grad()
    def clamp_steps(self) -> None:
        for step in self.w_steps.values():
            step.clamp_(min=MIN_STEP)


def distill_loss(pipe: Any, student: QuantStudent, calib: Calibration, batch_size: int,
                 act_steps_at: Callable[[int], torch.Tensor],
                 generator: torch.Generator) -> torch.Tensor:
    """MSE between the quantised student's and the FP UNet's noise prediction at one random t."""
    idx = torch.randint(0, calib.x0.shape[0], (batch_size,), generator=generator)
    t = int(torch.randint(0, pipe.scheduler.config.num_train_timesteps, (1,),
                          generator=generator))
    x_t, tt, _ = noisy_latents(pipe, calib.x0[idx], generator, (t, t + 1))
    model_in, tt = torch.cat([x_t, x_t]), torch.cat([tt, tt])
    text = torch.cat([calib.cond[idx], calib.uncond.expand(batch_size, -1, -1)])
    with torch.no_grad():
        target = pipe.unet(model_in, tt, encoder_hidden_states=text).sample.float()
    student.acts.current = act_steps_at(t)
    out = student.unet(model_in.float(), tt, encoder_hidden_states=text.float()).sample
    return F.mse_loss(out, target)


def lsq_optimizer(params: list[torch.Tensor], lr: float) -> torch.optim.Optimizer:
    """LSQ's optimiser: SGD with momentum 0.9 (the gradient scale assumes plain SGD)."""
    return torch.optim.SGD(params, lr=lr, momentum=0.9)


def distill(pipe: Any, student: QuantStudent, calib: Calibration, config: LSQConfig,
            data: PrepareData, optimizers: list[torch.optim.Optimizer],
            act_steps_at: Callable[[int], torch.Tensor],
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


# --- prepare / apply ------------------------------------------------------------------------
def prepare_minmax(pipe: Any, config: PTQMinMaxConfig, data: PrepareData) -> dict:
    """Min-max PTQ: static input steps from calibration, per-channel weight steps."""
    unet = unet_of(pipe, config.method_name)
    calib = calibrate(pipe, unet, config, data)
    return {"a_step": static_act_steps(calib, config.a_bits),
            **weight_steps(quant_layers(unet), config.w_bits)}


def prepare_lsq(pipe: Any, config: LSQConfig, data: PrepareData) -> dict:
    """LSQ: min-max initialisation, then all step sizes trained by distillation."""
    unet = unet_of(pipe, config.method_name)
    calib = calibrate(pipe, unet, config, data)
    student = QuantStudent(unet, config, weight_steps(quant_layers(unet), config.w_bits))
    device = next(student.unet.parameters()).device
    a_step = torch.nn.Parameter(static_act_steps(calib, config.a_bits).to(device))
    g = act_grad_scales(calib, config.a_bits).to(device)

    def clamp() -> None:
        with torch.no_grad():
            a_step.clamp_(min=MIN_STEP)

    optimizer = lsq_optimizer([a_step, *student.parameters()], config.lr)
    distill(pipe, student, calib, config, data, [optimizer], lambda t: grad_scale(a_step, g),
            clamp)
    return {"a_step": a_step.detach().clone(), **student.artifact(unet)}


_PREPARE = {"ptq_minmax": prepare_minmax, "lsq": prepare_lsq}


def prepare(pipe: Any, config: PTQMinMaxConfig, data: PrepareData) -> dict[str, torch.Tensor]:
    """Calibrate (ptq_minmax) or calibrate and train (lsq) the static step sizes."""
    return _PREPARE[config.method_name](pipe, config, data)


def weight_report(layers: list[tuple[str, torch.nn.Module]], w_bits: int, a_bits: int) -> dict:
    """Leaderboard columns: bit widths and the quantised layers' weight bytes, packed vs FP."""
    fp = sum(m.weight.numel() * m.weight.element_size() for _, m in layers)
    packed = sum(quantized_weight_bytes(m.weight.numel(), w_bits, m.weight.shape[0])
                 for _, m in layers)
    return {"weight_bits": w_bits, "act_bits": a_bits, "weight_bytes_quantized": packed,
            "weight_bytes_fp": fp, "quantized_layers": len(layers)}


def install(handle: MethodHandle, layers: list[tuple[str, torch.nn.Module]], acts: ActSteps,
            config: PTQMinMaxConfig, artifact: dict[str, torch.Tensor]) -> None:
    """Swap each layer's forward for one on its fake-quantised input and precomputed weight."""
    for i, (name, m) in enumerate(layers):
        if f"w_step.{name}" not in artifact:
            raise DiffbenchError(f"{handle.name}: prepared weights lack layer '{name}' "
                                 "(prepared for another architecture?)")
        weight = artifact.get(f"weight.{name}.weight", m.weight).detach()
        step = artifact[f"w_step.{name}"].to(m.weight.device, torch.float32)
        with torch.no_grad():
            wq = fake_quant(weight.to(m.weight.device, torch.float32), step, config.w_bits)
        handle.swap_attr(m, "forward", quantized_forward(
            m, i, acts, config.a_bits, lambda wq=wq.to(m.weight.dtype): wq))
    handle.report.update(weight_report(layers, config.w_bits, config.a_bits))


def check_layer_count(method: str, n_layers: int, n_prepared: int) -> None:
    """Refuse an artifact made for a UNet with a different number of quantised layers."""
    if n_layers != n_prepared:
        raise DiffbenchError(f"{method}: prepared for {n_prepared} quantised layers, this UNet "
                             f"has {n_layers} (prepared for another architecture?)")


def apply(pipe: Any, config: PTQMinMaxConfig, ctx: StepContext,
          artifact: dict[str, torch.Tensor]) -> MethodHandle:
    """Fake-quantise every Conv2d/Linear of the UNet with the prepared static step sizes."""
    unet = unet_of(pipe, config.method_name)
    layers = quant_layers(unet)
    check_layer_count(config.method_name, len(layers), artifact["a_step"].numel())
    handle = MethodHandle(pipe, config.method_name, config)
    acts = ActSteps(artifact["a_step"].to(next(unet.parameters()).device, torch.float32))
    install(handle, layers, acts, config, artifact)
    return handle
