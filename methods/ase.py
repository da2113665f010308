"""ASE (Moon et al., ICML 2024, arXiv 2408.05927): early exit by noise level, fine-tuned for it.

Adaptive Score Estimation: score estimation is easier at high noise, so the denoiser runs fewer
blocks there (a time-dependent exit schedule) and is fine-tuned so that each training sample is
evaluated at the exit depth its timestep gets (paper Sec. 4, released code `ee-diffusion`,
`drop_scheduler.py` + `train_ase.py`). `block_drop` is the same schedule without fine-tuning.

Implemented (UNet pipelines): the exit schedule is `block_drop.drop_count` laid over the 1000
training timesteps instead of the sampling steps: at timestep t the deepest k(t) units are
skipped, k = drop_max at t = T - 1 falling to 0 over the noisiest `until` fraction of the
timesteps (linearly, or as a step); all blocks run below (defaults: 3 units, noisiest 80 %, the
shape of the released demo schedule, which keeps every block only for t < 200). Units are the
UNet's removable resnet+attention pairs deepest first (`_common/unet.depth_order`: mid block,
then level by level from the innermost, down pairs then the mirrored up pairs), skipped so that
skip connections keep valid shapes. The schedule is a function of the timestep value the UNet
receives, not of the step index: training draws random timesteps, and the same noise level must
get the same depth at sampling whatever the solver (DDIM, DPM-Solver, ...), its step count or
its timestep spacing; a step-index schedule would give a level a depth it was not fine-tuned
for. So a UNet pre-hook reads the call's timestep (the noise level itself, no scheduler lookup)
and sets k; the StepContext is not needed, and calls outside it behave the same.

Fine-tuning (`prepare`): a copy of the UNet with the time embedding frozen (as the released
code does) is trained with AdamW on the epsilon loss at each sample's exit depth (`target =
"noise"`, the paper's data loss with lambda_t = 1), or on distillation from the full-depth
UNet (`target = "teacher"`). A batch mixing timesteps runs once per distinct depth. Data
(`data`, see methods/_common/pool.py): the model's real training images when it has some
offline (mini-sd: its world, VAE-encoded; the paper trains on real images), otherwise
data-free x_0 latents the unchanged model generates from the training prompts with a few DDIM
steps; 10 % of samples are conditioned on "" so that the unconditional branch of
classifier-free guidance is trained at reduced depth too.
Paper recipe (released code): DiT-XL/2 on ImageNet 256 (the paper also fine-tunes U-ViT),
full-weight fine-tuning from the pretrained model, real training images, AdamW lr 1e-5, global
batch 64, EMA 0.9999. Ours by default: 300 steps, lr 3e-5, batch 16 on 256 latents, no EMA.
Deviations: UNet pairs instead of DiT / U-ViT transformer blocks (transformer pipelines are
refused: `block_drop` drops their blocks without training); no EMA at this small budget.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from harness.errors import DiffbenchError
from harness.method import MethodHandle, register_method
from harness.params import param
from harness.prepare import PrepareData
from harness.steps import StepContext
from methods._common import pool as pools
from methods._common import training as finetune
from methods._common import unet as U

TABLE = "ase.drop_table"  # artifact key: units skipped at each training timestep


@register_method("ase", touches=("unet.weights", "unet.block_outputs"))
@dataclass(frozen=True)
class ASEConfig:
    """ASE exit schedule over timesteps and the fine-tuning budget for it."""

    drop_max: int = param(3, "UNet units skipped at the noisiest timestep (0 = all blocks run)",
                          low=0, high=1000)
    schedule: str = param("linear", "how the skipped count falls to 0 over `until`",
                          choices=("linear", "step"))
    until: float = param(0.8, "noisiest fraction of the timesteps with skipped units",
                         low=0.0, high=1.0)
    target: str = param("noise", "fine-tuning loss: 'noise' (epsilon loss, paper) or "
                        "'teacher' (distil the full-depth UNet)", choices=("noise", "teacher"))
    steps: int = param(300, "fine-tuning steps (0 = schedule only, no training)",
                       low=0, high=1_000_000)
    lr: float = param(3e-5, "AdamW learning rate (0 = weights unchanged)", low=0.0, high=1.0)
    batch_size: int = param(16, "training batch size", low=1, high=4096)
    data_size: int = param(256, "x_0 latents in the training pool",
                           low=1, high=1_000_000)
    data_steps: int = param(10, "DDIM steps of each teacher generation", low=1, high=1000)
    data: str = param("auto", pools.DATA_DOC, choices=pools.DATA_CHOICES)


def drop_table(num_train_timesteps: int, drop_max: int, schedule: str,
               until: float) -> torch.Tensor:
    """k(t) for every training timestep t: block_drop's schedule with step = T - 1 - t."""
    T = num_train_timesteps
    return torch.tensor([U.drop_count(T - 1 - t, T, drop_max, schedule, until) for t in range(T)],
                        dtype=torch.long)


def drops_at(table: torch.Tensor, timestep: Any) -> torch.Tensor:
    """k for each timestep value (int, float or tensor), rounded and clamped to the table."""
    t = torch.as_tensor(timestep).detach().reshape(-1).to("cpu", torch.float64)
    return table[t.round().long().clamp(0, table.numel() - 1)]


def check_units(unet: Any, config: ASEConfig) -> list[U.Unit]:
    """The first drop_max units in depth order; drop_max beyond them is a one-line error."""
    units = U.depth_order(unet)
    if config.drop_max > len(units):
        raise DiffbenchError(f"ase.drop_max={config.drop_max} is out of range for this UNet; "
                             f"allowed [0, {len(units)}]")
    return units[:config.drop_max]


class ExitDepth:
    """The exit depth of the forward pass in progress: units with rank < k are skipped."""

    def __init__(self) -> None:
        self.k = 0

    def dropped(self, rank: int) -> bool:
        return rank < self.k

    def from_timestep(self, table: torch.Tensor) -> Any:
        """UNet forward pre-hook: set k from the call's timestep (one depth per call)."""

        def hook(module: Any, args: tuple, kwargs: dict) -> None:
            timestep = args[1] if len(args) > 1 else kwargs["timestep"]
            ks = drops_at(table, timestep).unique()
            if ks.numel() != 1:
                raise DiffbenchError("ase: one UNet call mixes timesteps with different exit "
                                     "depths; call the UNet once per noise level")
            self.k = int(ks.item())

        return hook


def make_student(unet: Any, drop_max: int) -> tuple[torch.nn.Module, ExitDepth]:
    """A float32 trainable copy (time embedding frozen) whose deepest units follow an ExitDepth."""
    student = U.to_dtype(finetune.trainable_copy(unet, trainable), torch.float32)
    depth = ExitDepth()
    U.skip_units(setattr, U.depth_order(student)[:drop_max], depth.dropped)
    return student, depth


def trainable(name: str) -> bool:
    """Fine-tuned parameters: all but the time embedding (frozen in the released code)."""
    return not name.startswith("time_embedding.")


def exit_loss(student: Any, depth: ExitDepth, table: torch.Tensor, batch: pools.Batch,
              target: torch.Tensor) -> torch.Tensor:
    """Mean squared error of the student at each sample's exit depth k(t) (paper Sec. 4)."""
    ks = drops_at(table, batch.t).to(batch.t.device)
    total = torch.zeros((), device=target.device)
    for k in ks.unique().tolist():
        rows = ks == k
        depth.k = k
        pred = student(batch.x_t[rows].float(), batch.t[rows],
                       encoder_hidden_states=batch.cond[rows].float()).sample
        total = total + F.mse_loss(pred, target[rows].float(), reduction="sum")
    depth.k = 0
    return total / target.numel()


def loss_target(pipe: Any, batch: pools.Batch, config: ASEConfig) -> torch.Tensor:
    """The epsilon (or v) target, or the full-depth UNet's prediction for distillation."""
    if config.target == "noise":
        return pools.diffusion_target(pipe, batch)
    with torch.no_grad():
        return pipe.unet(batch.x_t, batch.t, encoder_hidden_states=batch.cond).sample


def training_prompts(config: ASEConfig, data: PrepareData) -> tuple[str, ...]:
    """The cell's prompts for teacher-generated data; none when training on real images."""
    return pools.pool_prompts(config.data, data, data.prompts) if config.steps else ()


def prepare(pipe: Any, config: ASEConfig, data: PrepareData) -> dict[str, torch.Tensor]:
    """Fine-tune a copy of the UNet for the exit schedule; the changed weights + the schedule."""
    unet = U.require_unet(pipe, "ase")
    check_units(unet, config)
    table = drop_table(pipe.scheduler.config.num_train_timesteps, config.drop_max,
                       config.schedule, config.until)
    if config.steps == 0:
        return {TABLE: table}
    gen = torch.Generator().manual_seed(data.seed)
    pool = pools.training_pool(pipe, config.data, data, data.prompts, config.data_size,
                            config.data_steps, gen, "ase")
    student, depth = make_student(unet, config.drop_max)
    opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=config.lr)
    every, running = max(1, config.steps // 10), 0.0
    for step in range(config.steps):
        batch = pools.sample_batch(pipe, pool, config.batch_size, gen)
        loss = exit_loss(student, depth, table, batch, loss_target(pipe, batch, config))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        running += loss.item()
        if (step + 1) % every == 0:
            data.log(f"[ase] step {step + 1}/{config.steps} loss {running / every:.4f}")
            running = 0.0
    U.to_dtype(student, unet.dtype)
    return {TABLE: table, **finetune.changed_parameters(student, unet, trainable)}


def apply(pipe: Any, config: ASEConfig, ctx: StepContext,
          artifact: dict[str, torch.Tensor]) -> MethodHandle:
    """Swap in the fine-tuned weights and skip the deepest k(t) units at each UNet call."""
    unet = U.require_unet(pipe, "ase")
    units = check_units(unet, config)
    table = artifact[TABLE]
    if table.numel() != pipe.scheduler.config.num_train_timesteps:
        raise DiffbenchError("ase: prepared schedule does not match this scheduler's "
                             "num_train_timesteps (prepared for another model?)")
    handle = MethodHandle(pipe, "ase", config)
    try:
        finetune.swap_in_parameters(handle, unet,
                                    {k: v for k, v in artifact.items() if k != TABLE})
    except DiffbenchError:
        handle.remove()
        raise
    handle.report.update(n_params_active=U.active_parameters(unet, []),
                         blocks_removed=config.drop_max)
    if config.drop_max == 0:
        return handle
    depth = ExitDepth()
    handle.add_hook(unet.register_forward_pre_hook(depth.from_timestep(table), with_kwargs=True))
    U.skip_units(handle.swap_attr, units, depth.dropped)
    return handle
