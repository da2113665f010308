"""Embedding attack (CCE, Pham et al. 2024, arXiv 2308.01508): a learned token embedding.

Circumventing Concept Erasure: textual inversion (Gal et al. 2023, arXiv 2208.01618) against
the erased model, white-box.

One new word embedding v is learned in the erased pipeline so that the denoising loss
||eps_theta(x_t, t, E(p*)) - eps||^2 (Gal et al. eq. 2) is small on images of the concept,
where p* is the concept prompt with the concept word replaced by a placeholder token whose
input embedding is v. The concept images are the original model's (the cell's method taken
off) for the cell's prompts, as CCE uses the original model's generations. Everything but v
is frozen; v starts from the mean token embedding. Applying the attack puts the placeholder in
every prompt and v behind it (a forward hook on the token embedding, removed afterwards).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from attacks._common import concept_prompts, encode, require_unet, search_seeds, substitute
from harness.attack import AttackResult, AttackTarget, register_attack
from harness.errors import DiffbenchError
from harness.method import MethodHandle
from harness.params import param

PLACEHOLDERS = ("sks", "q", "z", "x")  # rare single-token words, the first free one is used


@register_attack("embedding")
@dataclass(frozen=True)
class Embedding:
    """A learned token embedding (textual inversion) that brings the concept back."""

    concept: str = param("red", "the erased concept")
    steps: int = param(300, "optimisation steps (CCE: 1000-5000 at SD scale)", low=1,
                       high=1_000_000)
    lr: float = param(5e-3, "Adam learning rate of the embedding (textual inversion: 5e-3)",
                      low=0.0, high=10.0)
    batch_size: int = param(8, "images per step", low=1, high=4096)
    n_images: int = param(32, "concept images from the original model", low=1, high=100_000)
    image_steps: int = param(25, "denoising steps of those images", low=1, high=1000)


def placeholder(tokenizer: Any, prompts: list[str]) -> tuple[str, int]:
    """The first of PLACEHOLDERS that is one token and absent from the prompts."""
    text = " ".join(prompts).lower().split()
    for word in PLACEHOLDERS:
        ids = tokenizer(word, add_special_tokens=False).input_ids
        if len(ids) == 1 and word not in text:
            return word, ids[0]
    raise DiffbenchError(f"attack 'embedding': none of {PLACEHOLDERS} is a single free token "
                         "of this tokenizer")


def hook_embedding(pipe: Any, token_id: int, vector: torch.Tensor) -> Any:
    """A forward hook on the token embedding: rows of `token_id` become `vector`."""
    module = pipe.text_encoder.get_input_embeddings()

    def hook(mod: Any, args: tuple, output: torch.Tensor) -> torch.Tensor:
        mask = (args[0] == token_id).unsqueeze(-1)
        return torch.where(mask, vector.to(output.dtype), output)

    return module.register_forward_hook(hook)


def concept_latents(pipe: Any, images: torch.Tensor) -> torch.Tensor:
    """VAE latents (posterior mean, scaled) of uint8 N x H x W x 3 images."""
    x = images.permute(0, 3, 1, 2).float().div(127.5).sub(1).to(pipe.vae.device, pipe.vae.dtype)
    with torch.no_grad():
        return pipe.vae.encode(x).latent_dist.mean * pipe.vae.config.scaling_factor


def search(pipe: Any, config: Embedding, target: AttackTarget) -> AttackResult:
    require_unet(pipe, "embedding")
    prompts = concept_prompts(target, config.n_images)
    prompts = [prompts[i % len(prompts)] for i in range(config.n_images)]
    seeds = search_seeds(target, config.n_images)
    latents = concept_latents(pipe, target.original(prompts, seeds, config.image_steps))
    word, token_id = placeholder(pipe.tokenizer, prompts)
    captions = substitute(prompts, config.concept, word)
    table = pipe.text_encoder.get_input_embeddings().weight
    vector = table.detach().mean(0).clone().requires_grad_(True)
    optimizer = torch.optim.Adam([vector], lr=config.lr)
    sched, unet = pipe.scheduler, pipe.unet
    gen = torch.Generator().manual_seed(target.seed)
    frozen = [(p, p.requires_grad) for m in (unet, pipe.text_encoder) for p in m.parameters()]
    for p, _ in frozen:
        p.requires_grad_(False)  # only v learns; the pipeline's weights get no gradients
    handle = hook_embedding(pipe, token_id, vector)
    losses = []
    try:
        for _ in range(config.steps):
            pick = torch.randint(len(captions), (config.batch_size,), generator=gen)
            x0 = latents[pick]
            noise = torch.randn(x0.shape, generator=gen).to(x0)
            t = torch.randint(0, sched.config.num_train_timesteps, (len(x0),), generator=gen)
            x_t = sched.add_noise(x0, noise, t.to(x0.device))
            goal = (sched.get_velocity(x0, noise, t.to(x0.device))
                    if sched.config.get("prediction_type") == "v_prediction" else noise)
            cond = encode(pipe, [captions[i] for i in pick.tolist()], grad=True)
            pred = unet(x_t, t.to(x0.device), encoder_hidden_states=cond).sample
            loss = (pred.float() - goal.float()).pow(2).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
    finally:
        handle.remove()
        for p, flag in frozen:
            p.requires_grad_(flag)
    n = max(1, len(losses) // 10)
    target.log(f"[attack] embedding: placeholder '{word}', loss {sum(losses[:n]) / n:.4f} -> "
               f"{sum(losses[-n:]) / n:.4f}")
    return AttackResult(text=word, tensors={"embedding": vector.detach().cpu(),
                                            "losses": torch.tensor(losses)},
                        info={"objective": sum(losses[-n:]) / n, "queries": 0})


def apply(pipe: Any, config: Embedding, result: AttackResult, handle: MethodHandle) -> None:
    """The placeholder's embedding is the learned vector while the images are made."""
    ids = pipe.tokenizer(result.text, add_special_tokens=False).input_ids
    handle.add_hook(hook_embedding(pipe, ids[0], result.tensors["embedding"]))
