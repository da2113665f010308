"""Prompt search (UnlearnDiffAtk / P4D style): words searched against the erased model.

UnlearnDiffAtk (Zhang et al. 2024, arXiv 2310.11868), P4D (Chin et al. 2024, arXiv
2309.06135): discrete token optimisation against the erased model itself.

A fragment of `length` whole-word tokens takes the concept word's place in the cell's prompts;
greedy coordinate search (one position at a time, `candidates` random words tried there, the
best kept when it raises the objective) maximises the concept detector's mean probability on
the erased model's images of `n_prompts` prompts (their own seeds, `steps` denoising steps),
within a budget of `queries` image batches. The papers optimise the tokens by gradients of a
denoising loss towards a target image; here the objective is the detector the row is scored
with, queried black-box, so the budget counts generations. The fragment may not write the
concept (the vocabulary excludes every word that does).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from attacks._common import (
    concept_prompts,
    require_text_encoder,
    search_seeds,
    substitute,
    whole_words,
)
from harness.attack import AttackResult, AttackTarget, register_attack, spells
from harness.params import param


@register_attack("prompt_search")
@dataclass(frozen=True)
class PromptSearch:
    """Greedy coordinate search over words, maximising the detector on the erased model."""

    concept: str = param("red", "the erased concept")
    length: int = param(3, "words in the fragment", low=1, high=64)
    queries: int = param(120, "image batches the search may generate (its budget)", low=1,
                         high=1_000_000)
    candidates: int = param(8, "random words tried at a position per round", low=1,
                            high=100_000)
    n_prompts: int = param(8, "prompts (one image each) per query", low=1, high=4096)
    steps: int = param(10, "denoising steps of the search's images", low=1, high=1000)


def search(pipe: Any, config: PromptSearch, target: AttackTarget) -> AttackResult:
    require_text_encoder(pipe, "prompt_search")
    prompts = concept_prompts(target, config.n_prompts)
    seeds = search_seeds(target, len(prompts))
    words = whole_words(pipe.tokenizer, config.concept)
    gen = torch.Generator().manual_seed(target.seed)
    used = 0

    def objective(member: list[int]) -> float:
        nonlocal used
        used += 1
        text = " ".join(words[j] for j in member)
        images = target.generate(substitute(prompts, config.concept, text), seeds, config.steps)
        return float(target.concept_prob(images).mean())

    best = torch.randint(len(words), (config.length,), generator=gen).tolist()
    best_score = objective(best)
    history = [best_score]
    position = 0
    while used + config.candidates <= config.queries:
        for j in torch.randint(len(words), (config.candidates,), generator=gen).tolist():
            trial = list(best)
            trial[position] = j
            score = objective(trial)
            if score > best_score:
                best, best_score = trial, score
        history.append(best_score)
        position = (position + 1) % config.length
    text = " ".join(words[j] for j in best)
    assert not spells(text, config.concept)
    target.log(f"[attack] prompt_search: '{text}' (detector {history[0]:.3f} -> "
               f"{best_score:.3f} in {used} queries)")
    return AttackResult(text=text, tensors={"history": torch.tensor(history)},
                        info={"objective": best_score, "queries": used})
