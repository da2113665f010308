"""Shared pieces of the attacks: the text encoder's conditioning, its whole-word vocabulary,
substitute words in a prompt's concept slot, and the checks that name what a pipeline lacks."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from harness.attack import AttackTarget, concept_pattern, spells
from harness.errors import DiffbenchError


def require_text_encoder(pipe: Any, attack: str) -> None:
    """One line when the pipeline has no single CLIP-style tokenizer + text encoder."""
    if getattr(pipe, "tokenizer", None) is None or getattr(pipe, "text_encoder", None) is None:
        raise DiffbenchError(f"attack '{attack}' needs a pipeline with `tokenizer` and "
                             f"`text_encoder` (got {type(pipe).__name__})")


def require_unet(pipe: Any, attack: str) -> None:
    """One line when the pipeline is not a UNet epsilon/v-prediction pipeline with a VAE."""
    require_text_encoder(pipe, attack)
    if getattr(pipe, "unet", None) is None or getattr(pipe, "vae", None) is None:
        raise DiffbenchError(f"attack '{attack}' needs a UNet pipeline (pipe.unet and pipe.vae; "
                             f"got {type(pipe).__name__})")


def encode(pipe: Any, texts: Sequence[str], grad: bool = False) -> torch.Tensor:
    """The text encoder's hidden states the denoiser cross-attends to, padded to the tokenizer's
    full length (B x L x D), as the pipeline conditions on them."""
    tok = pipe.tokenizer(list(texts), padding="max_length",
                         max_length=pipe.tokenizer.model_max_length, truncation=True,
                         return_tensors="pt")
    with torch.set_grad_enabled(grad):
        return pipe.text_encoder(tok.input_ids.to(pipe.text_encoder.device))[0]


def whole_words(tokenizer: Any, concept: str, limit: int = 5000) -> list[str]:
    """Words the tokenizer holds as one whole-word token, alphabetic, not spelling the concept
    (the search space of the discrete attacks), in vocabulary order; at most `limit`."""
    words = []
    for token, _ in sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1]):
        word = token[:-4] if token.endswith("</w>") else ""
        if not word.isascii() or not word.isalpha() or spells(word, concept):
            continue
        if len(tokenizer(word, add_special_tokens=False).input_ids) == 1:
            words.append(word)
        if len(words) >= limit:
            break
    if not words:
        raise DiffbenchError(f"the tokenizer has no whole-word tokens to search over "
                             f"(vocabulary of {len(tokenizer.get_vocab())})")
    return words


def concept_prompts(target: AttackTarget, n: int) -> list[str]:
    """Up to n of the cell's prompts that name the concept (the attack's training prompts);
    when none does (e.g. I2P's prompts for "nudity"), the prompts with the concept in front,
    as `harness.attack.rewrite` puts the attack's fragment in front of them."""
    pattern = concept_pattern(target.concept)
    named = [p for p in target.prompts if pattern.search(p)]
    if not named:
        named = [f"{target.concept} {p}" for p in target.prompts]
    if not named:
        raise DiffbenchError("the cell has no prompts to attack")
    return named[:n]


def substitute(prompts: Sequence[str], concept: str, text: str) -> list[str]:
    """Each prompt with the concept replaced by `text` (white space folded)."""
    pattern = concept_pattern(concept)
    return [" ".join(pattern.sub(text, p).split()) for p in prompts]


def search_seeds(target: AttackTarget, n: int) -> list[int]:
    """Seeds of the search's own images: apart from the cell's image seeds."""
    return [1_000_003 + 7919 * target.seed + i for i in range(n)]
