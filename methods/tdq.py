"""TDQ (So et al., NeurIPS 2023, arXiv 2306.02316): input step sizes from an MLP of the timestep.

Temporal Dynamic Quantization: each quantised layer's activation step size is a small MLP of
the timestep, precomputed into a table per sampler step.

Quantised layers and grids are those of the static baselines (_common/quant.py): every Conv2d and
Linear of the denoiser (UNet or transformer), weights per output channel symmetric, inputs per
tensor symmetric (zero point 0, grid {-Qp..Qp}, Qp = 2^(b-1) - 1). What TDQ changes is the input
step size: for layer l it is s_l(t) = softplus(MLP_l(I(t))) (paper Sec. 4.2, Fig. 4), I(t) the
geometric Fourier encoding [sin(t w_i), cos(t w_i)], w_i = 10000^(-i / 32), i < 32 (64 values);
MLP_l is, as in the authors' released code, 4 linear layers of width 64 with ReLU, one per
quantised layer (batched here as stacked weight tensors). The last layer's bias starts at
softplus^-1 of the layer's static min-max step and its weight at 0, so the untrained module is the
static quantiser.
- mode "ptq": calibration as `ptq_minmax` (FP sampler, `calib_prompts` x `calib_steps`), keeping
  the range r_l(t) of every step instead of its maximum; the MLPs are fitted (Adam, `fit_steps`) to
  the per-timestep steps r_l(t) / Qp in log space (relative error), weights min-max.
- mode "qat": the "ptq" fit as initialisation, then distillation exactly as in `lsq` (same loss,
  data, SGD with momentum) of the MLPs, whose output s_l(t) takes LSQ's gradient scale 1 / sqrt(N *
  Qp) in place of a static step, and of the per-channel weight steps (and the weights with
  `train_weights`). The released code trains the MLPs without that scale (and with its LDM's Adam);
  with it, at our small default lr, the MLPs move little from the fit.
At apply time the MLPs are evaluated once for the timesteps the sampler will use (read from the
pipeline's scheduler at the first denoiser call of a generation; `begin_index` honoured) into a
(steps x layers) table, cached by timesteps; every denoiser call takes the row of the runner's step
counter (StepContext.step), so inference pays no MLP cost. On flow-matching pipelines the timesteps
are the scheduler's sigma x 1000, calibrated and looked up alike. A call outside a counted
generation evaluates the MLPs at that call's own timestep. Timesteps are clamped to the range of
the calibration timesteps (`tdq.t_range`), in training and at inference: beyond it the nearest
calibrated timestep's steps are used, never an extrapolation of the MLP.

Paper recipe (Sec. 5): TDQ added to LSQ QAT on DDIM CIFAR-10 and LDM LSUN, trained on the
models' training data with their own training loss for the full QAT schedule, and to PTQ4DM /
Q-Diffusion-style PTQ (BRECQ block reconstruction on calibration data drawn across timesteps);
dropout in the TDQ MLP during training (released code); 8-bit down to 4-bit and lower. Our
default budget: 32 calibration prompts x 20 steps, 300 Adam steps fitting the MLPs, plus in
"qat" mode 200 distillation steps of batch 4. Deviations: the PTQ fit targets per-timestep
min-max / percentile ranges instead of BRECQ reconstruction; QAT distils the FP model on its
own samples (data-free) instead of the training set; no dropout; attention matmuls are not
quantised; fake quantisation only (no integer kernels, no speed-up).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from harness.errors import DiffbenchError
from harness.method import MethodHandle, register_method
from harness.params import param
from harness.prepare import PrepareData
from harness.steps import StepContext
from methods._common.quant import (
    TOUCHES,
    ActSteps,
    check_layer_count,
    grad_scale,
    install,
    quant_layers,
    require_quant_denoiser,
    step_from_range,
    weight_steps,
)
from methods._common.quant_train import (
    Calibration,
    LSQTrainingConfig,
    QuantStudent,
    act_grad_scales,
    calibrate,
    calibration_prompts,
    distill,
    lsq_optimizer,
    static_act_steps,
)

ENC_DIM, HIDDEN, DEPTH = 64, 64, 4  # encoding width, MLP width, linear layers (released code)
MAX_PERIOD = 10000.0


@register_method("tdq", touches=TOUCHES)
@dataclass(frozen=True)
class TDQConfig(LSQTrainingConfig):
    """TDQ: bit widths, calibration budget, PTQ fit or QAT distillation of the step MLPs."""

    mode: str = param("ptq", "fit the MLPs to per-timestep ranges (ptq) or then distil (qat)",
                      choices=("ptq", "qat"))
    fit_steps: int = param(300, "Adam steps fitting the MLPs to the per-timestep ranges",
                           low=1, high=1_000_000)
    fit_lr: float = param(1e-2, "Adam learning rate of that fit", low=1e-6, high=1.0)


def fourier_encoding(t: torch.Tensor, dim: int = ENC_DIM) -> torch.Tensor:
    """Geometric Fourier encoding I(t) (paper Sec. 4.2): (T, dim) of [sin(t w_i), cos(t w_i)]."""
    half = dim // 2
    freqs = MAX_PERIOD ** (-torch.arange(half, dtype=torch.float32) / half)
    angles = t.detach().float().cpu()[:, None] * freqs[None, :]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


def inverse_softplus(y: torch.Tensor) -> torch.Tensor:
    """softplus^-1(y) = log(exp(y) - 1), stable for small and large y > 0."""
    return y + torch.log(-torch.expm1(-y))


class TDQModules(torch.nn.Module):
    """One TDQ MLP per quantised layer, batched: step sizes (L, T) from encodings (T, ENC_DIM)."""

    def __init__(self, init_steps: torch.Tensor, generator: torch.Generator):
        super().__init__()
        n, sizes = init_steps.numel(), [ENC_DIM] + [HIDDEN] * (DEPTH - 1) + [1]
        self.weights = torch.nn.ParameterList()
        self.biases = torch.nn.ParameterList()
        for k, (fan_in, fan_out) in enumerate(zip(sizes, sizes[1:])):
            bound = 1.0 / math.sqrt(fan_in)  # torch.nn.Linear's default initialisation range
            w = (torch.rand(n, fan_in, fan_out, generator=generator) * 2 - 1) * bound
            b = (torch.rand(n, 1, fan_out, generator=generator) * 2 - 1) * bound
            if k == DEPTH - 1:  # start exactly at the static step: s(t) = init for every t
                w.zero_()
                b = inverse_softplus(init_steps.float().clamp(min=1e-8)).reshape(n, 1, 1)
            self.weights.append(torch.nn.Parameter(w))
            self.biases.append(torch.nn.Parameter(b))
        self.t_range = torch.tensor([0.0, math.inf])  # timesteps the MLPs were fitted on

    def forward(self, encoding: torch.Tensor) -> torch.Tensor:
        """s_l(t) = softplus(MLP_l(I(t))) for every layer l and encoded timestep t: (L, T)."""
        h = encoding.to(self.weights[0].device).expand(len(self.weights[0]), -1, -1)
        for k, (w, b) in enumerate(zip(self.weights, self.biases)):
            h = torch.baddbmm(b, h, w)
            h = torch.relu(h) if k < DEPTH - 1 else F.softplus(h)
        return h.squeeze(-1)

    def steps_at(self, timesteps: torch.Tensor) -> torch.Tensor:
        """Step sizes (L, T) at the given timesteps, clamped to the fitted range `t_range`."""
        low, high = self.t_range.tolist()
        return self(fourier_encoding(timesteps.reshape(-1).float().clamp(low, high)))

    def artifact(self) -> dict[str, torch.Tensor]:
        out = {f"tdq.w{k}": w.detach().clone() for k, w in enumerate(self.weights)}
        out.update({f"tdq.b{k}": b.detach().clone() for k, b in enumerate(self.biases)})
        out["tdq.t_range"] = self.t_range.clone()
        return out

    @classmethod
    def from_artifact(cls, tensors: dict[str, torch.Tensor]) -> TDQModules:
        """Rebuild the MLPs from `tdq.w*` / `tdq.b*` artifact tensors."""
        if any(f"tdq.w{k}" not in tensors for k in range(DEPTH)):
            raise DiffbenchError("tdq: prepared weights lack the TDQ MLPs (tdq.w0..)")
        n = tensors["tdq.w0"].shape[0]
        module = cls(torch.ones(n), torch.Generator().manual_seed(0))
        with torch.no_grad():
            for k in range(DEPTH):
                module.weights[k].copy_(tensors[f"tdq.w{k}"])
                module.biases[k].copy_(tensors[f"tdq.b{k}"])
        module.t_range = tensors["tdq.t_range"].float().cpu().clone()
        return module.requires_grad_(False)


def fit_to_ranges(mlp: TDQModules, calib: Calibration, bits: int, steps: int, lr: float,
                  log: Any = lambda _: None) -> list[float]:
    """PTQ: fit log s_l(t) to log(r_l(t) / Qp) at the calibration timesteps (Adam, cosine lr)."""
    target = torch.log(step_from_range(calib.ranges, bits)).to(mlp.weights[0].device)
    encoding = fourier_encoding(calib.timesteps)
    mlp.t_range = torch.stack([calib.timesteps.min(), calib.timesteps.max()]).float()
    fused = mlp.weights[0].device.type in ("cpu", "cuda") or None
    optimizer = torch.optim.Adam(mlp.parameters(), lr=lr, fused=fused)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    every, losses = max(1, steps // 5), []
    for step in range(steps):
        loss = F.mse_loss(torch.log(mlp(encoding)), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if (step + 1) % every == 0 or step + 1 == steps:
            log(f"[tdq fit] step {step + 1}/{steps} log-step mse {loss.item():.3e}")
    return losses


training_prompts = calibration_prompts  # the calibration prompts, as for the static baselines


def prepare(pipe: Any, config: TDQConfig, data: PrepareData) -> dict[str, torch.Tensor]:
    """Calibrate, fit the MLPs to the per-timestep ranges, and in "qat" mode distil."""
    denoiser = require_quant_denoiser(pipe, "tdq")
    calib = calibrate(pipe, denoiser, config, data, distils=config.mode == "qat")
    generator = torch.Generator().manual_seed(data.seed)
    mlp = TDQModules(static_act_steps(calib, config.a_bits), generator)
    mlp.to(next(denoiser.parameters()).device)
    fit_to_ranges(mlp, calib, config.a_bits, config.fit_steps, config.fit_lr, data.log)
    w_steps = weight_steps(quant_layers(denoiser), config.w_bits)
    if config.mode == "ptq":
        return {**mlp.artifact(), **w_steps}
    student = QuantStudent(denoiser, config, w_steps)
    g = act_grad_scales(calib, config.a_bits).to(mlp.weights[0].device)
    optimizer = lsq_optimizer([*mlp.parameters(), *student.parameters()], config.lr)
    distill(pipe, student, calib, config, data, [optimizer], lambda t: qat_steps(mlp, t, g))
    return {**mlp.artifact(), **student.artifact(denoiser)}


def qat_steps(mlp: TDQModules, t: float, g: torch.Tensor) -> torch.Tensor:
    """Input steps (L,) at timestep t for QAT: the MLPs' output with LSQ's gradient scale g."""
    return grad_scale(mlp.steps_at(torch.tensor([t]))[:, 0], g)


class StepTable:
    """The MLPs' step sizes precomputed per sampler step; a denoiser pre-hook picks the row."""

    def __init__(self, pipe: Any, mlp: TDQModules, ctx: StepContext, acts: ActSteps):
        self.pipe, self.mlp, self.ctx, self.acts = pipe, mlp, ctx, acts
        self.tables: dict[tuple, torch.Tensor] = {}
        self.last: tuple[Any, torch.Tensor] | None = None  # (timesteps object, its table)

    @torch.no_grad()
    def table(self, timesteps: torch.Tensor) -> torch.Tensor:
        """(T, L) step sizes for these timesteps, computed once per distinct schedule."""
        if self.last is not None and self.last[0] is timesteps:
            return self.last[1]  # same schedule object: no device sync per call
        key = tuple(timesteps.reshape(-1).tolist())
        if key not in self.tables:
            self.tables[key] = self.mlp.steps_at(timesteps.reshape(-1)).T.contiguous()
        self.last = (timesteps, self.tables[key])
        return self.tables[key]

    def before_denoiser(self, module: Any, args: tuple, kwargs: dict) -> None:
        """Set this call's steps: table row of the step counter, else the call's own timestep."""
        scheduler = self.pipe.scheduler
        timesteps = getattr(scheduler, "timesteps", None)
        row = self.ctx.step + (getattr(scheduler, "begin_index", None) or 0)
        driven = self.ctx.num_steps > 0 and timesteps is not None and 0 <= row < len(timesteps)
        if driven:
            self.acts.current = self.table(timesteps)[row]
            return
        t = kwargs["timestep"] if "timestep" in kwargs else args[1]
        t = torch.as_tensor(t).reshape(-1)[:1]
        self.acts.current = self.table(t)[0]

    def clear(self) -> None:
        self.tables.clear()
        self.last = None


def apply(pipe: Any, config: TDQConfig, ctx: StepContext,
          artifact: dict[str, torch.Tensor]) -> MethodHandle:
    """Fake-quantise the denoiser's Conv2d/Linear layers with per-step input steps (table)."""
    denoiser = require_quant_denoiser(pipe, "tdq")
    layers = quant_layers(denoiser)
    mlp = TDQModules.from_artifact(artifact).to(next(denoiser.parameters()).device)
    check_layer_count("tdq", len(layers), artifact["tdq.w0"].shape[0])
    handle = MethodHandle(pipe, "tdq", config)
    acts = ActSteps()
    table = StepTable(pipe, mlp, ctx, acts)
    handle.add_hook(denoiser.register_forward_pre_hook(table.before_denoiser, with_kwargs=True))
    install(handle, layers, acts, config, artifact)
    handle.on_remove(table.clear)
    return handle
