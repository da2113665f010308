"""SDD (Kim et al., arXiv 2307.05977): distil eps(x_t, concept) onto an EMA teacher's eps(x_t, "").

Safe self-Distillation Diffusion. The student UNet's noise estimate conditioned on the concept
to remove is regressed onto the unconditional estimate of its own exponential-moving-average
teacher, under stop-gradient (paper eq. 5):
    L = || eps_theta(x_t, c_s) - sg(eps_theta-(x_t, "")) ||^2,   theta- <- EMA(theta)
x_t lies on the model's own trajectory for the concept: DDIM from x_T with the current student
conditioned on the concept (guidance `sample_guidance`; 1 = the concept prompt alone), stopped
after a random number of the `sample_steps` steps; t is drawn from that step's DDPM interval.
Trained parameters (`train_params`): "xattn-kv" (default) = the cross-attention key and value
projections only, i.e. every `attn2.to_k.weight` / `attn2.to_v.weight` (and their biases, if
any) of the diffusers UNet; "xattn" = every attn2 parameter (to_q, to_k, to_v, to_out), what
the official code trains. As in the paper, the final model is the EMA teacher: the artifact is
the teacher's selected parameters (all of them, changed or not, so lr=0 is an exact identity).
Several concepts (comma-separated `concept`) are removed at once, round-robin one prompt per
step (the official "iterative" schedule).
Text conditioning: each concept is put into every comma-separated `template` ("{}" is the
concept); the default "{}" uses it verbatim as the prompt, as the paper does ("nudity").
mini-sd's tiny causal text encoder only knows caption contexts, so a bare "red" prompt removes
little there: use template "a large {},a small {}" (the caption prefix up to a colour). The
concept-ratio metric reads the same `concept` field (e.g. "red").

Paper recipe (SD-1.4): 1500 steps, batch 1, AdamW lr 1e-5 (weight decay 1e-4, gradient
clipping at norm 1), EMA decay 0.999, x_t from 50 DDIM steps. Our default budget for the CPU
mini-sd: 200 steps, AdamW lr 3e-4 (same weight decay and clipping), EMA decay
0.9 (so the teacher moves within the short budget), 10 DDIM steps, batch 1.
Deviations: the default trains attn2 to_k/to_v only (the official code trains all of attn2:
`train_params=xattn`); the official script samples x_t with the EMA teacher (unconditionally at its
default guidance 1) and takes the target from the student under no_grad, while we follow the
paper's description: x_t from the current model for the concept prompt, target from the EMA
teacher. Training runs in float32 on the UNet's device; weights are stored in the pipeline dtype.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from harness.method import MethodHandle, register_method
from harness.params import param
from harness.prepare import PrepareData
from harness.steps import StepContext
from methods._common import erasure as E
from methods._common.training import EMA, trainable_copy

WEIGHT_DECAY = 1e-4  # official SDD script
MAX_GRAD_NORM = 1.0  # official SDD script


@register_method("sdd", touches=("unet.weights",))
@dataclass(frozen=True)
class SDDConfig:
    """SDD: concepts to remove, trained parameters, EMA teacher decay and the budget."""

    concept: str = param("red", "concept(s) to remove, comma-separated, each put into "
                         "`template` as a prompt (and read by the concept-ratio metric)")
    template: str = param("{}", E.TEMPLATE_DOC)
    train_params: str = param("xattn-kv", "xattn-kv: attn2 to_k/to_v only; xattn: all of attn2",
                              choices=("xattn-kv", "xattn"))
    ema_decay: float = param(0.9, "EMA decay of the teacher, which is also the final model "
                             "(paper: 0.999 over 1500 steps)", low=0.0, high=1.0)
    steps: int = param(200, "training steps (paper: 1500)", low=1, high=100_000)
    lr: float = param(3e-4, "AdamW learning rate (paper: 1e-5); 0 leaves the weights as they are",
                      low=0.0, high=1.0)
    batch_size: int = param(1, "x_t samples per step (paper: 1)", low=1, high=256)
    sample_steps: int = param(10, "DDIM steps of the trajectory x_t is taken from (paper: 50)",
                              low=1, high=1000)
    sample_guidance: float = param(1.0, "classifier-free guidance of that trajectory "
                                   "(1 = the concept prompt alone)", low=0.0, high=30.0)

    def __post_init__(self) -> None:
        E.require_concepts(self.concept, "sdd")
        E.check_template(self.template, "sdd")


@torch.no_grad()
def sdd_batch(pipe: Any, student: torch.nn.Module, teacher: torch.nn.Module, sched: Any,
              cond: torch.Tensor, uncond: torch.Tensor, config: SDDConfig,
              generator: torch.Generator) -> E.Batch:
    """x_t from the current model for the concept; target: the EMA teacher's eps(x_t, "")."""
    cond, uncond, x_t, t = E.trajectory_xt(pipe, student, sched, cond, uncond, config, generator)
    return E.Batch(x_t, t, cond, E.unet_eps(teacher, x_t, t, uncond))


training_prompts = E.no_cell_prompts


def prepare(pipe: Any, config: SDDConfig, data: PrepareData) -> dict[str, torch.Tensor]:
    """Self-distil a float32 copy of the UNet (the pipeline is left as found); the EMA teacher's
    selected tensors."""
    unet = E.require_unet(pipe, "sdd")
    concepts = E.concept_data(pipe, unet, config, "sdd", data.seed)
    select = E.PARAMETER_SETS[config.train_params]
    student = trainable_copy(unet, select).float()
    teacher = EMA(student, config.ema_decay)
    optimizer = torch.optim.AdamW(E.trainable_parameters(student), lr=config.lr,
                                  weight_decay=WEIGHT_DECAY)
    data.log(f"[sdd] removing {', '.join(map(repr, concepts.prompts))} ({config.train_params}, "
             f"EMA {config.ema_decay}, {config.steps} steps, lr {config.lr})")
    E.train_concepts(student, optimizer, concepts, config.steps, lambda cond: sdd_batch(
        pipe, student, teacher.module, concepts.sched, cond, concepts.uncond, config,
        concepts.generator), data.log, "sdd", MAX_GRAD_NORM, lambda: teacher.update(student))
    return E.selected_tensors(teacher.module, select, next(unet.parameters()).dtype)


def apply(pipe: Any, config: SDDConfig, ctx: StepContext,
          artifact: dict[str, torch.Tensor]) -> MethodHandle:
    """Swap the distilled weights into the pipeline's UNet (removable)."""
    return E.apply_weights(pipe, "sdd", config, artifact)
