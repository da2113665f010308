"""The concept-erasure toolkit of ESD, SDD and UCE (and prune_distill's ESD target, eq. 3).

Not a method (registers nothing). Holds what the three papers share: how a `concept` string
becomes text conditioning (comma-separated concepts, each put into every comma-separated
`template`; the default "{}" uses the concept verbatim as the prompt, as ESD, SDD and UCE do
with "nudity" or "Van Gogh"), which UNet parameters a variant trains, the
training targets as pure functions, x_t sampled on the model's own DDIM trajectory (ESD Sec. 3,
SDD Sec. 3), one optimizer step on a fixed batch, and applying the erased weights through a
handle so that remove() restores the pipeline bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from harness.errors import DiffbenchError
from harness.method import MethodHandle
from methods._common import sampling
from methods._common.training import (
    ddim_scheduler,
    guided,
    latent_shape,
    swap_in_parameters,
    text_embeddings,
)
from methods._common.unet import require_unet as require_denoiser_unet

LOG_EVERY = 25  # training steps between progress lines
TEMPLATE_DOC = ("prompt template(s) each concept is put into, comma-separated, {} = the concept; "
                "on mini-sd use 'a large {},a small {}' for a colour (its captions' context)")


# --- concepts --------------------------------------------------------------------------------
def concept_list(text: str) -> tuple[str, ...]:
    """The concepts named by a comma-separated string, stripped, empty items dropped."""
    return tuple(part.strip() for part in str(text).split(",") if part.strip())


def require_concepts(text: str, owner: str) -> tuple[str, ...]:
    """The concepts of a training method's `concept` field; one-line error when none is named."""
    concepts = concept_list(text)
    if not concepts:
        raise DiffbenchError(f"{owner}.concept={text!r} names no concept; give one or more "
                             "concepts to erase, comma-separated (e.g. 'red' or 'red,circle')")
    return concepts


def check_template(template: str, owner: str) -> tuple[str, ...]:
    """The prompt templates (comma-separated, each with "{}" for the concept); "" = "{}"."""
    templates = concept_list(template) or ("{}",)
    for t in templates:
        if "{}" not in t:
            raise DiffbenchError(f"{owner}.template={template!r}: template {t!r} has no '{{}}' "
                                 "where the concept goes (e.g. '{}' or 'a large {},a small {}')")
    return templates


def concept_prompts(concepts: tuple[str, ...], template: str,
                    owner: str) -> tuple[tuple[int, str], ...]:
    """(concept index, prompt) for every concept and template, concept-major."""
    templates = check_template(template, owner)
    return tuple((i, t.replace("{}", c)) for i, c in enumerate(concepts) for t in templates)


def no_cell_prompts(config: Any, data: Any) -> tuple[str, ...]:
    """None of the cell's prompts: training reads the concept prompts (in the config) only."""
    return ()


def prompt_at(step: int, n_prompts: int) -> int:
    """Index of the prompt trained at `step`: round-robin (SDD's "iterative" schedule)."""
    return step % n_prompts


# --- which parameters a variant trains ---------------------------------------------------------
def cross_attention(name: str) -> bool:
    """Every parameter of the UNet's cross-attention layers (attn2: to_q, to_k, to_v, to_out)."""
    return ".attn2." in name


def cross_attention_kv(name: str) -> bool:
    """Only the text-facing key / value projections of cross-attention (attn2.to_k, attn2.to_v)."""
    return ".attn2.to_k." in name or ".attn2.to_v." in name


def non_cross_attention(name: str) -> bool:
    """ESD-u: all but cross-attention, the time embedding and the output layer (official code)."""
    frozen = ("time_embedding.", "conv_norm_out.", "conv_out.")
    return not cross_attention(name) and not name.startswith(frozen)


PARAMETER_SETS: dict[str, Callable[[str], bool]] = {
    "xattn": cross_attention, "xattn-kv": cross_attention_kv, "noxattn": non_cross_attention}


def selected_tensors(module: torch.nn.Module, select: Callable[[str], bool],
                     dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The artifact: every selected parameter (changed or not, so lr=0 is a valid identity)."""
    return {name: p.detach().to(dtype).clone() for name, p in module.named_parameters()
            if select(name)}


# --- the pipeline --------------------------------------------------------------------------
def has_cross_attention(unet: Any) -> bool:
    """Whether any of the UNet's attention modules attends to text (cross-attention)."""
    return any(getattr(m, "is_cross_attention", False) for m in unet.modules())


def require_unet(pipe: Any, owner: str) -> torch.nn.Module:
    """The pipeline's text-conditioned UNet (SD-1/2 layout); one-line error otherwise."""
    unet = require_denoiser_unet(
        pipe, owner, "pipe.unet with cross-attention, pipe.text_encoder",
        lambda u: has_cross_attention(u) and getattr(pipe, "text_encoder", None) is not None,
        kind="text-to-image UNet")
    if getattr(unet.config, "addition_embed_type", None) is not None:
        raise DiffbenchError(f"{owner} supports SD-1/2 style UNets; this one needs added "
                             f"conditioning ({unet.config.addition_embed_type}, e.g. SDXL)")
    return unet


def encode(pipe: Any, texts: list[str] | tuple[str, ...], device: Any) -> torch.Tensor:
    """float32 text-encoder states of `texts` ("" = unconditional) on `device`."""
    return text_embeddings(pipe, list(texts)).float().to(device)


def unet_eps(unet: torch.nn.Module, x: torch.Tensor, t: torch.Tensor,
             emb: torch.Tensor) -> torch.Tensor:
    """The UNet's prediction (epsilon, or v on v-prediction models) in float32."""
    dtype = next(unet.parameters()).dtype
    out = unet(x.to(dtype), t.to(x.device), encoder_hidden_states=emb.to(dtype)).sample
    return out.float()


# --- targets (pure) --------------------------------------------------------------------------
def esd_target(eps_uncond: torch.Tensor, eps_cond: torch.Tensor, eta: float) -> torch.Tensor:
    """ESD eq. 3 (Gandikota et al. 2023): eps*(x_t) - eta (eps*(x_t, c) - eps*(x_t))."""
    return guided(eps_uncond, eps_cond, -eta)


def ddpm_interval(stop: int, num_steps: int, num_train: int) -> tuple[int, int]:
    """Training timesteps [low, high) of the DDIM step a trajectory stopped at (ESD/SDD code)."""
    low = round((1 - (stop + 1) / num_steps) * num_train)
    high = round((1 - stop / num_steps) * num_train)
    return low, max(high, low + 1)


# --- x_t on the model's own trajectory --------------------------------------------------------
@torch.no_grad()
def sample_xt(pipe: Any, unet: torch.nn.Module, sched: Any, cond: torch.Tensor,
              uncond: torch.Tensor, guidance: float,
              generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """x_t from x_T by `unet`'s DDIM steps for `cond` (guidance `guidance`) stopped at a random
    step, and a training timestep t drawn from that step's interval (ESD / SDD training)."""
    batch, device = cond.shape[0], cond.device
    n = len(sched.timesteps)
    stop = int(torch.randint(0, n, (1,), generator=generator))
    x = torch.randn(latent_shape(pipe, batch), generator=generator).to(device)
    x = x * sched.init_noise_sigma
    predict = sampling.separate_cfg(lambda x_in, t, emb: unet_eps(unet, x_in, t, emb), cond, uncond)
    x = sampling.sample(sched, x, predict, None if guidance == 1.0 else guidance, stop=stop)
    low, high = ddpm_interval(stop, n, sched.config.num_train_timesteps)
    return x, torch.randint(low, high, (batch,), generator=generator).to(device)


# --- one training step -----------------------------------------------------------------------
@dataclass
class Batch:
    """One erasure example: noisy latents, timesteps, the concept conditioning, the target."""

    x_t: torch.Tensor
    t: torch.Tensor
    cond: torch.Tensor
    target: torch.Tensor


def batch_loss(unet: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """|| eps_theta(x_t, c) - target ||^2, averaged (ESD eq. 4, SDD eq. 5)."""
    return F.mse_loss(unet_eps(unet, batch.x_t, batch.t, batch.cond), batch.target)


def train_step(unet: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: Batch,
               max_grad_norm: float | None = None) -> float:
    """One optimizer step on `batch`; the loss before the step."""
    optimizer.zero_grad(set_to_none=True)
    loss = batch_loss(unet, batch)
    loss.backward()
    if max_grad_norm is not None:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    optimizer.step()
    return float(loss.detach())


def trainable_parameters(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]


def log_progress(log: Callable[[str], None], owner: str, step: int, steps: int,
                 loss: float, prompt: str) -> None:
    """A progress line every LOG_EVERY steps and at the last one."""
    if (step + 1) % LOG_EVERY == 0 or step + 1 == steps:
        log(f"[{owner}] step {step + 1}/{steps} loss {loss:.5f} (prompt {prompt!r})")


# --- the concept training loop (ESD, SDD) ------------------------------------------------------
@dataclass
class ConceptData:
    """The concept prompts, their and the empty prompt's text states, the private DDIM
    scheduler of the x_t trajectories and the training generator."""

    prompts: list[str]
    conds: torch.Tensor
    uncond: torch.Tensor
    sched: Any
    generator: torch.Generator


def concept_data(pipe: Any, unet: torch.nn.Module, config: Any, owner: str,
                 seed: int) -> ConceptData:
    """ConceptData of a config with `concept`, `template` and `sample_steps`."""
    prompts = [p for _, p in concept_prompts(require_concepts(config.concept, owner),
                                             config.template, owner)]
    sched = ddim_scheduler(pipe, config.sample_steps)
    device = next(unet.parameters()).device
    conds, uncond = encode(pipe, prompts, device), encode(pipe, [""], device)
    return ConceptData(prompts, conds, uncond, sched, torch.Generator().manual_seed(seed))


@torch.no_grad()
def trajectory_xt(pipe: Any, student: torch.nn.Module, sched: Any, cond: torch.Tensor,
                  uncond: torch.Tensor, config: Any, generator: torch.Generator
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(cond, uncond, x_t, t): the conditioning expanded to `config.batch_size` and x_t on the
    student's own trajectory (`sample_xt` with `config.sample_guidance`)."""
    cond = cond.expand(config.batch_size, -1, -1)
    uncond = uncond.expand(config.batch_size, -1, -1)
    x_t, t = sample_xt(pipe, student, sched, cond, uncond, config.sample_guidance, generator)
    return cond, uncond, x_t, t


def train_concepts(student: torch.nn.Module, optimizer: torch.optim.Optimizer,
                   data: ConceptData, steps: int, batch: Callable[[torch.Tensor], Batch],
                   log: Callable[[str], None], owner: str, max_grad_norm: float | None = None,
                   after_step: Callable[[], None] = lambda: None) -> None:
    """`steps` optimizer steps, the concept prompts round-robin: batch(cond of the prompt)."""
    for step in range(steps):
        k = prompt_at(step, len(data.prompts))
        loss = train_step(student, optimizer, batch(data.conds[k:k + 1]), max_grad_norm)
        after_step()
        log_progress(log, owner, step, steps, loss, data.prompts[k])


# --- apply -----------------------------------------------------------------------------------
def apply_weights(pipe: Any, owner: str, config: Any,
                  artifact: Mapping[str, torch.Tensor]) -> MethodHandle:
    """Swap the erased UNet weights in through a handle; remove() puts the originals back."""
    unet = require_unet(pipe, owner)
    handle = MethodHandle(pipe, owner, config)
    try:
        swap_in_parameters(handle, unet, artifact)
    except Exception:
        handle.remove()
        raise
    return handle
