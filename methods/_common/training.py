"""Shared pieces of training methods' prepare steps: text conditioning, noisy latents, EMA,
and putting trained tensors into a pipeline through a handle (so remove() restores it exactly).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

from harness.errors import DiffbenchError


@torch.no_grad()
def text_embeddings(pipe: Any, texts: Iterable[str]) -> torch.Tensor:
    """Text-encoder hidden states the UNet cross-attends to (empty string = unconditional)."""
    texts = list(texts)
    tok = pipe.tokenizer(texts, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         truncation=True, return_tensors="pt")
    device = pipe.text_encoder.device
    return pipe.text_encoder(tok.input_ids.to(device))[0]


def latent_shape(pipe: Any, batch: int) -> tuple[int, int, int, int]:
    """(batch, channels, h, w) of the denoiser's latents at the model's default resolution."""
    denoiser = getattr(pipe, "unet", None) or pipe.transformer
    size = denoiser.config.sample_size
    return batch, denoiser.config.in_channels, size, size


def noisy_latents(pipe: Any, x0: torch.Tensor, generator: torch.Generator,
                  t_range: tuple[int, int] | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DDPM forward process q(x_t | x_0) (Ho et al. 2020, eq. 4): (x_t, t, noise)."""
    sched = pipe.scheduler
    low, high = t_range or (0, sched.config.num_train_timesteps)
    t = torch.randint(low, high, (x0.shape[0],), generator=generator).to(x0.device)
    noise = torch.randn(x0.shape, generator=generator).to(x0.device, x0.dtype)
    return sched.add_noise(x0, noise, t), t, noise


def guided(eps_uncond: torch.Tensor, eps_cond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance (Ho & Salimans 2022): eps_u + s (eps_c - eps_u)."""
    return eps_uncond + scale * (eps_cond - eps_uncond)


def ddim_scheduler(pipe: Any, num_steps: int) -> Any:
    """A private deterministic DDIM scheduler (eta 0) on the pipeline's noise schedule."""
    from diffusers import DDIMScheduler

    sched = DDIMScheduler.from_config(pipe.scheduler.config)
    sched.set_timesteps(num_steps)
    return sched


def trainable_copy(module: torch.nn.Module, select: Callable[[str], bool]) -> torch.nn.Module:
    """A deep copy in train mode whose parameters named by `select` require grad, others frozen."""
    clone = copy.deepcopy(module).train()
    for name, p in clone.named_parameters():
        p.requires_grad_(select(name))
    if not any(p.requires_grad for p in clone.parameters()):
        raise DiffbenchError("training selected no parameters")
    return clone


class EMA:
    """Exponential moving average of a module's parameters (teacher / evaluation weights)."""

    def __init__(self, module: torch.nn.Module, decay: float):
        self.decay = decay
        self.module = copy.deepcopy(module).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, module: torch.nn.Module) -> None:
        for ema, p in zip(self.module.parameters(), module.parameters(), strict=True):
            ema.lerp_(p.detach(), 1.0 - self.decay)


def changed_parameters(trained: torch.nn.Module, original: torch.nn.Module,
                       select: Callable[[str], bool] | None = None) -> dict[str, torch.Tensor]:
    """The artifact: parameters (optionally only those `select` names) that differ from original."""
    ref = dict(original.named_parameters())
    return {name: p.detach().clone() for name, p in trained.named_parameters()
            if (select is None or select(name)) and not torch.equal(p, ref[name])}


def swap_in_parameters(handle: Any, module: torch.nn.Module,
                       tensors: Mapping[str, torch.Tensor]) -> None:
    """Replace `module`'s parameters named in `tensors` (dotted names) through `handle.swap_attr`,
    so `handle.remove()` puts the original Parameter objects back; shapes must match."""
    params = dict(module.named_parameters())
    for name, value in tensors.items():
        if name not in params:
            raise DiffbenchError(f"prepared weights name '{name}', which the model does not have "
                                 "(prepared for another architecture?)")
        if params[name].shape != value.shape:
            raise DiffbenchError(f"prepared weight '{name}' has shape {tuple(value.shape)}, the "
                                 f"model {tuple(params[name].shape)}")
        owner_name, _, attr = name.rpartition(".")
        owner = module.get_submodule(owner_name) if owner_name else module
        new = torch.nn.Parameter(value.to(params[name].device, params[name].dtype),
                                 requires_grad=False)
        handle.swap_attr(owner, attr, new)
