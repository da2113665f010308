"""Prune-distill (Shirkavand et al., arXiv 2412.15341): drop UNet blocks, distil, erase a concept.

Pruning is structural block removal as in BK-SDM (Kim et al., arXiv 2305.15798): the UNet
units listed in `remove` (resnet+attention pairs `down_blocks.i.j` / `up_blocks.i.j`, and/or
`mid_block`; see `methods/_common/unet.py` for which exist and why skip shapes stay valid) are
swapped for identity-like passthroughs through the handle, so `remove()` restores them exactly.
The pruned student (a copy of the UNet, removed units frozen and never run) is then trained:
- distillation step (the paper's lower level, BK-SDM's loss): `data_weight` x the diffusion
  loss + `out_weight` x MSE(student eps, dense teacher eps) + `feat_weight` x the mean MSE of
  the outputs of every down block, the mid block (unless removed) and every up block;
- suppression step (the paper's upper level, the ESD loss of Gandikota et al. 2023 that the
  paper plugs in): MSE(student eps(x_t, c), e_u - eta (e_c - e_u)) with the dense teacher's
  conditional e_c and unconditional e_u at the same x_t, c = `concept`; eta = 0 is the
  "push eps(x_t, concept) toward eps(x_t, '')" target of SDD-style erasure.
`mode`: "distill" runs distillation steps only; "bilevel" is the paper's first-order bilevel
scheme as its released code (`BilevelUnetFineTuner`) runs it: every step is a distillation step
and every `upper_every`-th step is followed by a suppression step with its own AdamW optimizer
(`upper_lr`), so fine-tuning and unlearning share one phase; "two_stage" is the paper's
baseline: all distillation steps, then as many suppression steps as "bilevel" makes
(steps // upper_every), each on the fine-tuned weights (fine-tune, then erase).
A `concept` also names what the concept-ratio metric scores for the cell (metrics/concept.py).

Paper recipe: SD-2.1 pruned by APTP or magnitude pruning, MS-COCO 2017 captions and images for
the lower level, images of the concept (artist styles, nudity) for the upper level, 20k-50k
iterations, batch 16, AdamW lr 1e-6 (upper 5e-6), an upper step every 10 steps, min-SNR (5)
diffusion loss weight 1, output distillation 2, block distillation 0.1, eta 1.
Ours by default: 1000 steps, lr 3e-4 (upper 5e-4), batch 16, same loss weights and upper
frequency. Deviations: BK-SDM block removal instead of APTP / magnitude pruning; lower-level
data (`data`, methods/_common/pool.py) by default data-free: x_0 latents the dense model
generates from the training prompts with a few DDIM steps (`data = "real"` takes the model's
real images when it has some: mini-sd's world); upper level from the concept prompts (as ESD
samples its own x_t); plain MSE diffusion loss (no min-SNR weighting), no warmup.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from harness.errors import DiffbenchError
from harness.method import MethodHandle, register_method
from harness.params import param
from harness.prepare import PrepareData
from harness.prompts import load_prompts
from harness.steps import StepContext
from methods._common import pool as pools
from methods._common import training as finetune
from methods._common import unet as U
from methods._common.erasure import esd_target

MASK = "prune.removed"  # artifact key: 1 for each removed unit of _common.unet.all_units


@register_method("prune_distill", touches=("unet.weights", "unet.block_outputs"))
@dataclass(frozen=True)
class PruneDistillConfig:
    """Removed UNet units, training mode (distill / bilevel / two_stage), concept and budget."""

    remove: tuple = param(("mid_block", "down_blocks.0.0", "up_blocks.1.1"),
                          "UNet units removed: 'mid_block', 'down_blocks.i.j', 'up_blocks.i.j' "
                          "(resnet j + attention j of a block; see methods/_common/unet.py)")
    mode: str = param("distill", "'distill' only, 'bilevel' (suppression step interleaved, the "
                      "paper) or 'two_stage' (distil, then suppress)",
                      choices=("distill", "bilevel", "two_stage"))
    concept: str = param("", "prompts of the concept suppressed in bilevel / two_stage, "
                         "comma-separated (e.g. 'a large red,a small red')")
    eta: float = param(1.0, "negative guidance of the suppression target e_u - eta (e_c - e_u)",
                       low=0.0, high=10.0)
    steps: int = param(1000, "distillation steps", low=1, high=1_000_000)
    lr: float = param(3e-4, "AdamW learning rate of the distillation steps", low=0.0, high=1.0)
    upper_every: int = param(10, "a suppression step after every N distillation steps",
                             low=1, high=1_000_000)
    upper_lr: float = param(5e-4, "AdamW learning rate of the suppression steps",
                            low=0.0, high=1.0)
    batch_size: int = param(16, "training batch size", low=1, high=4096)
    data_weight: float = param(1.0, "weight of the diffusion (epsilon) loss", low=0.0, high=100.0)
    out_weight: float = param(2.0, "weight of the output distillation loss", low=0.0, high=100.0)
    feat_weight: float = param(0.1, "weight of the block-output distillation loss",
                               low=0.0, high=100.0)
    data_size: int = param(64, "x_0 latents per training pool",
                           low=1, high=1_000_000)
    data_steps: int = param(10, "DDIM steps of each teacher generation", low=1, high=1000)
    data: str = param("teacher", pools.DATA_DOC + "; teacher by default (measured better here, "
                      "see the module docstring)", choices=pools.DATA_CHOICES)
    train_prompts: str = param("", "prompt set (name or file) of teacher-generated distillation "
                               "data; '' = the cell's prompts (an erasure suite passes the "
                               "general set, as the paper's lower level uses general captions)")

    def __post_init__(self) -> None:
        """Unit names stripped and empty ones dropped ("mid_block, up_blocks.1.1" from a CLI)."""
        names = tuple(str(n).strip() for n in self.remove if str(n).strip())
        object.__setattr__(self, "remove", names)


@dataclass
class Student:
    """The pruned trainable copy and the block outputs its last forward pass produced."""

    unet: torch.nn.Module
    trainable: Callable[[str], bool]  # which parameters train (all but the removed units)
    features: dict[str, torch.Tensor] = field(default_factory=dict)
    skip_features: tuple[str, ...] = ()


def check_config(unet: Any, config: PruneDistillConfig) -> list[U.Unit]:
    """The removed units; bad names or a suppression mode without a concept: one-line errors."""
    if config.mode != "distill" and not concept_prompts(config):
        raise DiffbenchError(f"prune_distill.concept is empty; mode={config.mode!r} needs the "
                             "concept to suppress (or use mode='distill')")
    return U.select_units(unet, config.remove, "prune_distill.remove")


def concept_prompts(config: PruneDistillConfig) -> list[str]:
    """The suppressed concept's prompts (comma-separated `concept`)."""
    return [c.strip() for c in config.concept.split(",") if c.strip()]


def removed_mask(unet: Any, units: list[U.Unit]) -> torch.Tensor:
    """1 for each unit of `_common.unet.all_units` that is removed, 0 otherwise."""
    names = {u.name for u in units}
    return torch.tensor([u.name in names for u in U.all_units(unet)], dtype=torch.uint8)


def make_student(unet: Any, remove: tuple) -> Student:
    """A float32 trainable copy with `remove` skipped and frozen, block outputs captured."""
    frozen = U.unit_parameter_names(unet, U.select_units(unet, remove, "prune_distill.remove"))

    def trainable(name: str) -> bool:
        return name not in frozen

    copy = U.to_dtype(finetune.trainable_copy(unet, trainable), torch.float32)
    units = U.select_units(copy, remove, "prune_distill.remove")
    U.skip_units(setattr, units)
    removed_blocks = tuple(u.name for u in units if u.name == "mid_block")  # whole blocks
    student = Student(copy, trainable, skip_features=removed_blocks)
    U.capture_block_outputs(copy, student.features, student.skip_features)
    return student


@torch.no_grad()
def teacher_outputs(unet: Any, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor,
                    skip: tuple[str, ...] = ()) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The dense UNet's prediction and block outputs (hooks removed before returning)."""
    features: dict[str, torch.Tensor] = {}
    hooks = U.capture_block_outputs(unet, features, skip)
    try:
        pred = unet(x_t, t, encoder_hidden_states=cond).sample
    finally:
        for hook in hooks:
            hook.remove()
    return pred.float(), {k: v.float() for k, v in features.items()}


def distill_loss(pipe: Any, student: Student, batch: pools.Batch,
                 config: PruneDistillConfig) -> torch.Tensor:
    """BK-SDM / the paper's lower level: diffusion + output KD + block-output (feature) KD."""
    pred_t, feats_t = teacher_outputs(pipe.unet, batch.x_t, batch.t, batch.cond,
                                      student.skip_features)
    pred = student.unet(batch.x_t.float(), batch.t,
                        encoder_hidden_states=batch.cond.float()).sample
    loss = config.data_weight * F.mse_loss(pred, pools.diffusion_target(pipe, batch).float())
    loss = loss + config.out_weight * F.mse_loss(pred, pred_t)
    feats = [F.mse_loss(student.features[k], feats_t[k]) for k in feats_t]
    return loss + config.feat_weight * torch.stack(feats).mean()


def suppression_loss(pipe: Any, student: Student, batch: pools.Batch, uncond: torch.Tensor,
                     eta: float) -> torch.Tensor:
    """The paper's upper level: the student's eps(x_t, concept) toward the ESD target."""
    unet = pipe.unet
    with torch.no_grad():
        e_c = unet(batch.x_t, batch.t, encoder_hidden_states=batch.cond).sample.float()
        e_u = unet(batch.x_t, batch.t, encoder_hidden_states=uncond.expand_as(batch.cond)
                   ).sample.float()
    pred = student.unet(batch.x_t.float(), batch.t,
                        encoder_hidden_states=batch.cond.float()).sample
    return F.mse_loss(pred, esd_target(e_u, e_c, eta))


def training_plan(mode: str, steps: int, upper_every: int) -> list[str]:
    """Order of "distill" / "suppress" steps for a mode (see the module docstring)."""
    if mode == "distill":
        return ["distill"] * steps
    if mode == "two_stage":
        return ["distill"] * steps + ["suppress"] * (steps // upper_every)
    plan = []
    for step in range(steps):
        plan.append("distill")
        if (step + 1) % upper_every == 0:
            plan.append("suppress")
    return plan


def optimizer_step(optimizer: torch.optim.Optimizer, loss: torch.Tensor) -> float:
    """One AdamW update on `loss`; its value before the update."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.item()


def training_prompts(config: PruneDistillConfig, data: PrepareData) -> tuple[str, ...]:
    """Prompts of the distillation data: `train_prompts`, else the cell's; none for real images."""
    prompts = load_prompts(config.train_prompts).texts if config.train_prompts else data.prompts
    return pools.pool_prompts(config.data, data, prompts)


def prepare(pipe: Any, config: PruneDistillConfig, data: PrepareData) -> dict[str, torch.Tensor]:
    """Train the pruned copy by the mode's plan; the changed weights + the removal mask."""
    unet = U.require_unet(pipe, "prune_distill")
    units = check_config(unet, config)
    plan = training_plan(config.mode, config.steps, config.upper_every)
    gen = torch.Generator().manual_seed(data.seed)
    pool = pools.training_pool(pipe, config.data, data, training_prompts(config, data),
                            config.data_size, config.data_steps, gen, "prune_distill")
    concept = None
    if "suppress" in plan:
        concept = pools.teacher_pool(pipe, concept_prompts(config), config.data_size,
                                  config.data_steps, gen)
    student = make_student(unet, config.remove)
    params = [p for p in student.unet.parameters() if p.requires_grad]
    lower = torch.optim.AdamW(params, lr=config.lr)
    upper = torch.optim.AdamW(params, lr=config.upper_lr)
    every = max(1, len(plan) // 10)
    for i, kind in enumerate(plan):
        if kind == "distill":
            batch = pools.sample_batch(pipe, pool, config.batch_size, gen)
            value = optimizer_step(lower, distill_loss(pipe, student, batch, config))
        else:
            batch = pools.sample_batch(pipe, concept, config.batch_size, gen, uncond_prob=0.0)
            value = optimizer_step(upper, suppression_loss(pipe, student, batch, concept.uncond,
                                                           config.eta))
        if (i + 1) % every == 0:
            data.log(f"[prune_distill] {i + 1}/{len(plan)} {kind} loss {value:.4f}")
    U.to_dtype(student.unet, unet.dtype)
    trained = finetune.changed_parameters(student.unet, unet, student.trainable)
    return {MASK: removed_mask(unet, units), **trained}


def apply(pipe: Any, config: PruneDistillConfig, ctx: StepContext,
          artifact: dict[str, torch.Tensor]) -> MethodHandle:
    """Swap in the trained weights and replace the removed units by passthroughs."""
    unet = U.require_unet(pipe, "prune_distill")
    units = check_config(unet, config)
    mask = artifact.get(MASK)
    if mask is None or not torch.equal(mask, removed_mask(unet, units)):
        raise DiffbenchError("prune_distill: prepared weights are for another UNet or another "
                             "'remove' list; prepare again")
    handle = MethodHandle(pipe, "prune_distill", config)
    try:
        finetune.swap_in_parameters(handle, unet, {k: v for k, v in artifact.items()
                                                   if k != MASK})
    except DiffbenchError:
        handle.remove()
        raise
    U.skip_units(handle.swap_attr, units)
    handle.report.update(n_params_active=U.active_parameters(unet, units),
                         blocks_removed=len(units))
    return handle
