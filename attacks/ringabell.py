"""Ring-A-Bell (Tsai et al. 2024, arXiv 2310.10012): a concept vector, found as words.

A model-agnostic red-team attack (ICLR 2024).

A concept vector c = mean(E(p) - E(p')) over paired prompts with the concept (p) and without
it (p': the concept word replaced by each contrast word), E the text encoder's hidden states
(Sec. 3.2, eq. 3); the target of prompt p is E(p') + eta * c (eq. 4), and a discrete prompt
fragment is found whose embedding reaches it: a genetic algorithm over whole-word tokens
(Sec. 3.3; the paper's population 200, mutation 0.25, crossover 0.5) minimising the mean
squared distance between E(p with the fragment in the concept's place) and the target, over
a sample of the cell's prompts. The fragment may not write the concept (checked). The erased
model is never queried: the attack reads only the text encoder, which erasure methods that
edit the UNet leave as it was.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from attacks._common import (
    concept_prompts,
    encode,
    require_text_encoder,
    substitute,
    whole_words,
)
from harness.attack import AttackResult, AttackTarget, register_attack
from harness.params import param

WORLD_CONTRASTS = {  # the other values of the world attribute a concept belongs to
    "colour": ("red", "green", "blue", "yellow", "orange", "purple", "white", "black"),
    "shape": ("circle", "square", "triangle", "cross", "star"),
}


@register_attack("ringabell")
@dataclass(frozen=True)
class RingABell:
    """Concept vector from paired prompts, added at strength eta, discretised by a GA."""

    concept: str = param("red", "the erased concept")
    contrast: str = param("", "comma-separated words that take the concept's place in the "
                              "paired prompts; empty: the other world colours / shapes, or "
                              "the concept word removed")
    eta: float = param(3.0, "strength of the concept vector (paper: 3 for nudity)", low=0.0,
                       high=100.0)
    length: int = param(3, "words in the fragment (paper: 16 of SD's 77 tokens; mini-sd's "
                           "captions have 16)", low=1, high=64)
    population: int = param(200, "GA population (paper: 200)", low=4, high=100_000)
    generations: int = param(150, "GA generations (paper: 3000)", low=1, high=1_000_000)
    mutation: float = param(0.25, "per-word mutation probability (paper: 0.25)", low=0.0,
                            high=1.0)
    crossover: float = param(0.5, "crossover probability (paper: 0.5)", low=0.0, high=1.0)
    n_prompts: int = param(16, "cell prompts the objective averages over", low=1, high=4096)

    def contrasts(self) -> tuple[str, ...]:
        if self.contrast:
            return tuple(w.strip() for w in self.contrast.split(",") if w.strip())
        for values in WORLD_CONTRASTS.values():
            if self.concept in values:
                return tuple(v for v in values if v != self.concept)
        return ("",)


@torch.no_grad()
def concept_vector(pipe: Any, prompts: list[str], concept: str,
                   contrasts: tuple[str, ...]) -> torch.Tensor:
    """c = mean over prompts and contrasts of E(p) - E(p with the contrast word), L x D."""
    with_concept = encode(pipe, prompts).double().mean(0)
    without = torch.stack([encode(pipe, substitute(prompts, concept, w)).double().mean(0)
                           for w in contrasts])
    return with_concept - without.mean(0)


def search(pipe: Any, config: RingABell, target: AttackTarget) -> AttackResult:
    require_text_encoder(pipe, "ringabell")
    prompts = concept_prompts(target, config.n_prompts)
    contrasts = config.contrasts()
    c = concept_vector(pipe, prompts, config.concept, contrasts)
    benign = [substitute([p], config.concept, contrasts[i % len(contrasts)])[0]
              for i, p in enumerate(prompts)]
    goal = encode(pipe, benign).double() + config.eta * c  # eq. 4, per prompt
    words = whole_words(pipe.tokenizer, config.concept)
    gen = torch.Generator().manual_seed(target.seed)

    @torch.no_grad()
    def fitness(pop: torch.Tensor) -> torch.Tensor:
        """Mean squared distance to the goal of each member (lower is better)."""
        texts = [t for member in pop.tolist() for t in
                 substitute(prompts, config.concept, " ".join(words[j] for j in member))]
        emb = torch.cat([encode(pipe, texts[i:i + 4096]) for i in range(0, len(texts), 4096)])
        emb = emb.double().view(len(pop), len(prompts), *goal.shape[1:])
        return (emb - goal).pow(2).mean(dim=(1, 2, 3))

    pop = torch.randint(len(words), (config.population, config.length), generator=gen)
    score = fitness(pop)
    history = [float(score.min())]
    n_elite = max(1, config.population // 10)
    for _ in range(config.generations):
        order = score.argsort()
        pop, score = pop[order], score[order]
        # parents by tournament of two, from the whole population
        a = torch.randint(len(pop), (config.population - n_elite, 2), generator=gen)
        pick = torch.where(score[a[:, 0]] <= score[a[:, 1]], a[:, 0], a[:, 1])
        b = torch.randint(len(pop), (config.population - n_elite,), generator=gen)
        child = pop[pick].clone()
        cross = (torch.rand(len(child), generator=gen) < config.crossover)[:, None] & (
            torch.rand(child.shape, generator=gen) < 0.5)
        child = torch.where(cross, pop[b], child)
        mutate = torch.rand(child.shape, generator=gen) < config.mutation
        child = torch.where(mutate, torch.randint(len(words), child.shape, generator=gen), child)
        pop = torch.cat([pop[:n_elite], child])
        score = torch.cat([score[:n_elite], fitness(child)])
        history.append(float(score.min()))
    best = pop[score.argmin()].tolist()
    text = " ".join(words[j] for j in best)
    target.log(f"[attack] ringabell: '{text}' (distance {history[0]:.4g} -> {history[-1]:.4g})")
    return AttackResult(text=text, tensors={"history": torch.tensor(history)},
                        info={"objective": history[-1], "queries": 0})
