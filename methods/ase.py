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
Transformer denoisers (DiT, PixArt, SD3 / SD3.5 MMDiT, FLUX; the paper's DiT setting): the
units are the last blocks, last first (FLUX: its last single-stream blocks), skipped by passing
their token streams through (methods/_common/blocks.py), the schedule read from the call's
timestep as on the UNet (FLUX pipelines pass t / 1000: scaled back, `calls.call_unit`).
Fine-tuning distils the full-depth model (`target = "teacher"` is required: the epsilon loss
needs inputs a transformer pipeline builds itself): the unchanged pipeline runs its own call on
the first `data_size` prompts (cycled) for `data_steps` steps (methods/_common/calls.py), and
each step regresses the recorded full-depth output on `batch_size` rows of one recorded call at
that call's exit depth; the time / timestep embedders stay frozen.
Paper recipe (released code): DiT-XL/2 on ImageNet 256 (the paper also fine-tunes U-ViT),
full-weight fine-tuning from the pretrained model, real training images, AdamW lr 1e-5, global
batch 64, EMA 0.9999. Ours by default: 300 steps, lr 3e-5, batch 16 on 256 latents, no EMA.
Deviations: on a UNet resnet+attention pairs instead of transformer blocks; on a transformer
distillation on the model's own trajectories instead of real images; no EMA at this budget.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
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
from methods._common.blocks import denoiser_blocks, passthrough
from methods._common.calls import Call, call_unit, record_calls, replay_loss

TABLE = "ase.drop_table"  # artifact key: units skipped at each training timestep
# time / timestep embedders, frozen in fine-tuning (UNet; SD3 and FLUX; PixArt; DiT's blocks)
FROZEN = ("time_embedding.", "time_text_embed.", "adaln_single.", "timestep_embedder.")


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


def check_units(pipe: Any, config: ASEConfig) -> tuple[str, Any, list[U.Unit]]:
    """(kind, denoiser, the first drop_max units in drop order): the UNet's in depth order, a
    transformer's last blocks last first; drop_max beyond them is a one-line error."""
    what, denoiser = U.require_denoiser(pipe, "ase")
    if what == "UNet":
        units, high = U.depth_order(denoiser), None
    else:
        units = [U.Unit(b.name, ((b.module, passthrough(b)),))
                 for b in reversed(denoiser_blocks(pipe, "ase"))]
        high = len(units) - 1  # at least one block runs
    high = len(units) if high is None else high
    if config.drop_max > high:
        raise DiffbenchError(f"ase.drop_max={config.drop_max} is out of range for this {what}; "
                             f"allowed [0, {high}]")
    return what, denoiser, units[:config.drop_max]


class ExitDepth:
    """The exit depth of the forward pass in progress: units with rank < k are skipped."""

    def __init__(self) -> None:
        self.k = 0

    def dropped(self, rank: int) -> bool:
        return rank < self.k

    def from_timestep(self, table: torch.Tensor, unit: float = 1.0) -> Any:
        """Denoiser forward pre-hook: set k from the call's timestep (one depth per call)."""

        def hook(module: Any, args: tuple, kwargs: dict) -> None:
            timestep = kwargs["timestep"] if "timestep" in kwargs else args[1]
            self.set(table, timestep, unit)

        return hook

    def set(self, table: torch.Tensor, timestep: Any, unit: float = 1.0) -> None:
        """k of a call at `timestep` (in the denoiser's units: x `unit` gives table units)."""
        ks = drops_at(table, torch.as_tensor(timestep).double() * unit).unique()
        if ks.numel() != 1:
            raise DiffbenchError("ase: one denoiser call mixes timesteps with different exit "
                                 "depths; call the denoiser once per noise level")
        self.k = int(ks.item())


def make_student(unet: Any, drop_max: int) -> tuple[torch.nn.Module, ExitDepth]:
    """A float32 trainable copy (time embedding frozen) whose deepest units follow an ExitDepth."""
    student = U.to_dtype(finetune.trainable_copy(unet, trainable), torch.float32)
    depth = ExitDepth()
    U.skip_units(setattr, U.depth_order(student)[:drop_max], depth.dropped)
    return student, depth


def trainable(name: str) -> bool:
    """Fine-tuned parameters: all but the time embedding (frozen in the released code)."""
    return not any(name.startswith(p) or f".{p}" in name for p in FROZEN)


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


def fine_tune(student: torch.nn.Module, loss: Any, config: ASEConfig, data: PrepareData) -> None:
    """`config.steps` AdamW steps on `loss()` (the released code's optimiser), logged 10 times."""
    opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=config.lr)
    every, running = max(1, config.steps // 10), 0.0
    for step in range(config.steps):
        value = loss()
        opt.zero_grad(set_to_none=True)
        value.backward()
        opt.step()
        running += value.item()
        if (step + 1) % every == 0:
            data.log(f"[ase] step {step + 1}/{config.steps} loss {running / every:.4e}")
            running = 0.0


def training_prompts(config: ASEConfig, data: PrepareData) -> tuple[str, ...]:
    """The cell's prompts for teacher-generated data or distillation on the pipeline's calls
    (a transformer's); none when a UNet trains on real images."""
    if not config.steps:
        return ()
    return tuple(data.prompts) if config.target == "teacher" else pools.pool_prompts(
        config.data, data, data.prompts)


def prepare(pipe: Any, config: ASEConfig, data: PrepareData) -> dict[str, torch.Tensor]:
    """Fine-tune a copy of the denoiser for the exit schedule; the changed weights + schedule."""
    what, denoiser, _ = check_units(pipe, config)
    table = drop_table(pipe.scheduler.config.num_train_timesteps, config.drop_max,
                       config.schedule, config.until)
    if config.steps == 0:
        return {TABLE: table}
    if what == "transformer":
        return {TABLE: table, **fine_tune_transformer(pipe, denoiser, config, data, table)}
    unet = denoiser
    gen = torch.Generator().manual_seed(data.seed)
    pool = pools.training_pool(pipe, config.data, data, data.prompts, config.data_size,
                            config.data_steps, gen, "ase")
    student, depth = make_student(unet, config.drop_max)

    def loss() -> torch.Tensor:
        batch = pools.sample_batch(pipe, pool, config.batch_size, gen)
        return exit_loss(student, depth, table, batch, loss_target(pipe, batch, config))

    fine_tune(student, loss, config, data)
    U.to_dtype(student, unet.dtype)
    return {TABLE: table, **finetune.changed_parameters(student, unet, trainable)}


def fine_tune_transformer(pipe: Any, transformer: Any, config: ASEConfig, data: PrepareData,
                          table: torch.Tensor) -> dict[str, torch.Tensor]:
    """Distil the full-depth transformer into its exit-depth copy on the pipeline's own calls."""
    name = type(transformer).__name__
    if config.target != "teacher":
        raise DiffbenchError(f"ase.target='{config.target}' trains on the UNet's epsilon loss; "
                             f"on {name} use target='teacher' (distillation on its pipeline's "
                             "own calls)")
    if config.data == "real":
        raise DiffbenchError(f"ase.data='real' is for UNets; on {name} ase distils on the "
                             "model's own trajectories (data='auto' or 'teacher')")
    texts = [data.prompts[i % len(data.prompts)] for i in range(config.data_size)]
    calls, _ = record_calls(pipe, transformer, data, texts, config.data_steps, pools.GUIDANCE,
                            "ase")
    student = U.to_dtype(finetune.trainable_copy(transformer, trainable), torch.float32)
    depth = ExitDepth()
    blocks = denoiser_blocks(SimpleNamespace(transformer=student), "ase")
    U.skip_units(setattr, [U.Unit(b.name, ((b.module, passthrough(b)),))
                           for b in reversed(blocks)][:config.drop_max], depth.dropped)
    unit, gen = call_unit(transformer), torch.Generator().manual_seed(data.seed)

    def at_depth(call: Call) -> None:
        depth.set(table, call.kwargs["timestep"], unit)

    fine_tune(student, lambda: replay_loss(student, calls, config.batch_size, gen, at_depth),
              config, data)
    U.to_dtype(student, transformer.dtype)
    return finetune.changed_parameters(student, transformer, trainable)


def apply(pipe: Any, config: ASEConfig, ctx: StepContext,
          artifact: dict[str, torch.Tensor]) -> MethodHandle:
    """Swap in the fine-tuned weights and skip the deepest k(t) units at each denoiser call."""
    what, denoiser, units = check_units(pipe, config)
    table = artifact[TABLE]
    if table.numel() != pipe.scheduler.config.num_train_timesteps:
        raise DiffbenchError("ase: prepared schedule does not match this scheduler's "
                             "num_train_timesteps (prepared for another model?)")
    handle = MethodHandle(pipe, "ase", config)
    try:
        finetune.swap_in_parameters(handle, denoiser,
                                    {k: v for k, v in artifact.items() if k != TABLE})
    except DiffbenchError:
        handle.remove()
        raise
    handle.report.update(n_params_active=U.active_parameters(denoiser, []),
                         blocks_removed=config.drop_max)
    if config.drop_max == 0:
        return handle
    depth = ExitDepth()
    handle.add_hook(denoiser.register_forward_pre_hook(
        depth.from_timestep(table, call_unit(denoiser)), with_kwargs=True))
    U.skip_units(handle.swap_attr, units, depth.dropped)
    return handle
