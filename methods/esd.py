"""ESD (Gandikota et al., arXiv 2303.07345): fine-tune eps(x_t, c) onto negatively guided targets.

Erasing Concepts from Diffusion Models. The fine-tuned UNet theta learns, for the erased concept
c, the frozen original's noise estimate guided *away* from c (paper eq. 3-4):
    eps_theta(x_t, c)  <-  eps*(x_t) - eta (eps*(x_t, c) - eps*(x_t))
with eps* the frozen original (the pipeline's own UNet, never modified), eps*(x_t) its
unconditional ("") estimate and eta the negative guidance. x_t comes from the model being
fine-tuned: DDIM from x_T for the concept prompt with classifier-free guidance
`sample_guidance`, stopped after a random number of the `sample_steps` steps; the training
timestep t is drawn from the DDPM interval of that step (as the official code does).
Variants (`variant`): "x" = ESD-x, every cross-attention parameter (attn2 to_q, to_k, to_v,
to_out; for specific concepts such as styles); "x-strict" = attn2 to_k and to_v only (the
official repository's esd-x-strict); "u" = ESD-u, every parameter except cross-attention, the
time embedding and the output layer (for broad concepts such as nudity; the official code's
"noxattn"). Several concepts (comma-separated `concept`) are trained round-robin, one prompt
per step.
Text conditioning: each concept is put into every comma-separated `template` ("{}" is the
concept); the default "{}" uses it verbatim as the prompt, as the paper does ("Van Gogh").
mini-sd's tiny causal text encoder only knows caption contexts, so a bare "red" prompt erases
little there: use template "a large {},a small {}" (the caption prefix up to a colour). The
concept-ratio metric reads the same `concept` field (e.g. "red"). The artifact is every trained
parameter, changed or not (so lr=0 is an exact identity).

Paper recipe (SD-1.4): 1000 iterations, batch 1, Adam lr 1e-5, eta 1, x_t by 50 DDIM steps
with guidance 3 from the fine-tuned model. The official diffusers rewrite uses 200 iterations,
lr 5e-5, eta 2. Our default budget for the CPU mini-sd: 150 steps, Adam
lr 1e-4, eta 1, 10 DDIM steps with guidance 3, batch 1.
Deviations: multi-concept training (round-robin) is our extension (ESD erases one concept per
model); the official diffusers rewrite samples x_t with the frozen model and uses
eps*(x_t, c) instead of eps*(x_t) as the anchor: we follow the paper's equation and its
original code (anchor eps*(x_t), x_t from the model being trained). Training runs in float32
on whatever device the UNet is on; the trained weights are stored in the pipeline's dtype.
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
from methods._common.training import trainable_copy

VARIANTS = {"x": "xattn", "x-strict": "xattn-kv", "u": "noxattn"}  # -> E.PARAMETER_SETS


@register_method("esd", touches=("unet.weights",))
@dataclass(frozen=True)
class ESDConfig:
    """ESD: concepts to erase, the negative guidance, which parameters train, the budget."""

    concept: str = param("red", "concept(s) to erase, comma-separated, each put into "
                         "`template` as a prompt (and read by the concept-ratio metric)")
    template: str = param("{}", E.TEMPLATE_DOC)
    variant: str = param("x", "x: ESD-x, cross-attention; x-strict: attn2 to_k/to_v only; "
                         "u: ESD-u, all but cross-attention", choices=tuple(VARIANTS))
    eta: float = param(1.0, "negative guidance eta of the target (paper eq. 3)",
                       low=0.0, high=20.0)
    steps: int = param(150, "training steps (paper: 1000)", low=1, high=100_000)
    lr: float = param(1e-4, "Adam learning rate (paper: 1e-5); 0 leaves the weights as they are",
                      low=0.0, high=1.0)
    batch_size: int = param(1, "x_t samples per step (paper: 1)", low=1, high=256)
    sample_steps: int = param(10, "DDIM steps of the trajectory x_t is taken from (paper: 50)",
                              low=1, high=1000)
    sample_guidance: float = param(3.0, "classifier-free guidance of that trajectory (paper: 3)",
                                   low=0.0, high=30.0)

    def __post_init__(self) -> None:
        E.require_concepts(self.concept, "esd")
        E.check_template(self.template, "esd")


def selector(config: ESDConfig) -> Any:
    """The parameter-name predicate of the config's variant."""
    return E.PARAMETER_SETS[VARIANTS[config.variant]]


@torch.no_grad()
def esd_batch(pipe: Any, student: torch.nn.Module, frozen: torch.nn.Module, sched: Any,
              cond: torch.Tensor, uncond: torch.Tensor, config: ESDConfig,
              generator: torch.Generator) -> E.Batch:
    """x_t from the model being trained and the frozen model's negatively guided target."""
    cond, uncond, x_t, t = E.trajectory_xt(pipe, student, sched, cond, uncond, config, generator)
    target = E.esd_target(E.unet_eps(frozen, x_t, t, uncond), E.unet_eps(frozen, x_t, t, cond),
                          config.eta)
    return E.Batch(x_t, t, cond, target)


training_prompts = E.no_cell_prompts


def prepare(pipe: Any, config: ESDConfig, data: PrepareData) -> dict[str, torch.Tensor]:
    """Fine-tune a float32 copy of the UNet (the pipeline is left as found); its trained tensors."""
    unet = E.require_unet(pipe, "esd")
    concepts = E.concept_data(pipe, unet, config, "esd", data.seed)
    select = selector(config)
    student = trainable_copy(unet, select).float()
    optimizer = torch.optim.Adam(E.trainable_parameters(student), lr=config.lr)
    data.log(f"[esd] erasing {', '.join(map(repr, concepts.prompts))} (ESD-{config.variant}, "
             f"eta {config.eta}, {config.steps} steps, lr {config.lr})")
    E.train_concepts(student, optimizer, concepts, config.steps, lambda cond: esd_batch(
        pipe, student, unet, concepts.sched, cond, concepts.uncond, config, concepts.generator),
        data.log, "esd")
    return E.selected_tensors(student, select, next(unet.parameters()).dtype)


def apply(pipe: Any, config: ESDConfig, ctx: StepContext,
          artifact: dict[str, torch.Tensor]) -> MethodHandle:
    """Swap the erased weights into the pipeline's UNet (removable)."""
    return E.apply_weights(pipe, "esd", config, artifact)
