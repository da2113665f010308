"""UCE (Gandikota et al., arXiv 2308.14761): closed-form edit of cross-attention keys and values.

Unified Concept Editing. Every cross-attention key and value projection W (`attn2.to_k` and
`attn2.to_v` of every transformer block of the UNet) is replaced, without gradient steps, by the
minimiser of
    e sum_i ||W' c_i - v_i*||^2 + p sum_j ||W' c_j - W c_j||^2 + r ||W' - W||_F^2,
    W* = (e sum_i v_i* c_i^T + p sum_j W c_j c_j^T + r W)
         (e sum_i c_i c_i^T + p sum_j c_j c_j^T + r I)^-1
(paper eq. 7 with the official code's erase scale e, preserve scale p and ridge term r, which
keeps the inverse well posed). c_i are token embeddings of the erased concepts and
v_i* = W c_i^guide the original projection of the aligned tokens of the guide concept ("" by
default: the empty prompt, an unconditional-like target). As in the official code, the erased
tokens are the concept's last word token and every token after it (end of text, padding),
aligned position by position with the guide's from its last word token on (for "" that is the
start token); preserved concepts contribute every token position of their prompt.
Text conditioning: each concept (comma-separated `concept`; preserved ones likewise) is put into
every comma-separated `template` ("{}" is the concept); the default "{}" uses it verbatim, as
the paper does. mini-sd's tiny causal text encoder only knows caption contexts, so erase a
colour there with template "a large {},a small {}" (the caption prefix up to the colour: the
colour's own token then has exactly its in-caption embedding). The concept-ratio metric reads
the same `concept` field (e.g. "red"). `concept=""` erases nothing: the artifact is the original
weights and images are bit-identical to the baseline.

Paper recipe (SD-1.4): no training; official erasure defaults e = 1, p = 0.1 (preserve on, e.g.
the other artists for art erasure), r = 0.5, the "replace" technique, keys and values edited.
Our defaults are the same.
Deviations: the official "tensor" technique (projecting out the concept direction) is not
implemented; its optional prompt augmentations ("painting by {concept}", ...) are expressed as
`template`; preserve concepts are given explicitly (the official code falls back to a list of
1734 artists for art erasure).
The solve runs in float64; edited weights are stored in the pipeline's dtype.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from harness.errors import DiffbenchError
from harness.method import MethodHandle, register_method
from harness.params import param
from harness.prepare import PrepareData
from harness.steps import StepContext
from methods._common import erasure as E

PROJECTIONS = ("to_k", "to_v")


@register_method("uce", touches=("unet.weights",))
@dataclass(frozen=True)
class UCEConfig:
    """UCE: concepts to erase, what they map to, what to preserve, and the edit's weights."""

    concept: str = param("red", "concept(s) to erase, comma-separated, each put into "
                         "`template` as a prompt (read by the concept-ratio metric); '' erases "
                         "nothing")
    template: str = param("{}", E.TEMPLATE_DOC)
    guide: str = param("", "concept each erased one is mapped to: one for all or one per "
                       "concept, comma-separated; '' = the empty prompt")
    preserve: str = param("", "concepts whose keys and values are kept, comma-separated")
    erase_scale: float = param(1.0, "weight e of the erased concepts' term", low=0.0, high=1e4)
    preserve_scale: float = param(0.1, "weight p of the preserved concepts' term",
                                  low=0.0, high=1e4)
    ridge: float = param(0.5, "weight r of keeping W itself (official lambda); > 0 keeps the "
                         "solve well posed", low=0.0, high=1e4)

    def __post_init__(self) -> None:
        guides_for(self)
        E.check_template(self.template, "uce")


def guides_for(config: UCEConfig) -> tuple[str, ...]:
    """One guide per erased concept ("" when none is given); one-line error on a count mismatch."""
    concepts, guides = E.concept_list(config.concept), E.concept_list(config.guide) or ("",)
    if len(guides) == 1:
        return guides * len(concepts)
    if len(guides) != len(concepts):
        raise DiffbenchError(f"uce.guide={config.guide!r} names {len(guides)} guides for "
                             f"{len(concepts)} concepts; give one guide or one per concept")
    return guides


def aligned_rows(n_src: int, n_dst: int, length: int) -> tuple[range, range]:
    """Token positions of a concept (n_src real tokens incl. start/end) and of its guide paired
    from each one's last word token to the end of the sequence (official UCE code)."""
    start_src, start_dst = max(n_src - 2, 0), max(n_dst - 2, 0)
    count = length - max(start_src, start_dst)
    return range(start_src, start_src + count), range(start_dst, start_dst + count)


def uce_closed_form(weight: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                    preserve: torch.Tensor, erase_scale: float, preserve_scale: float,
                    ridge: float) -> torch.Tensor:
    """W* = (e V K^T + p W P P^T + r W)(e K K^T + p P P^T + r I)^-1 (UCE eq. 7 + ridge).

    weight: (out, d); keys: (d, N) erased concept tokens; values: (out, N) their targets v*;
    preserve: (d, M) preserved concept tokens (M may be 0)."""
    eye = torch.eye(weight.shape[1], dtype=weight.dtype, device=weight.device)
    lhs = erase_scale * values @ keys.T + preserve_scale * weight @ preserve @ preserve.T
    lhs = lhs + ridge * weight
    gram = erase_scale * keys @ keys.T + preserve_scale * preserve @ preserve.T + ridge * eye
    try:
        return torch.linalg.solve(gram, lhs.T).T  # gram is symmetric
    except RuntimeError as exc:  # torch.linalg.LinAlgError: singular key matrix
        raise DiffbenchError("uce: the key matrix is singular; set uce.ridge > 0 or name more "
                             "preserve concepts") from exc


def token_counts(pipe: Any, texts: list[str]) -> list[int]:
    """Real tokens (start and end included) of each text, as the pipeline tokenizes it."""
    tok = pipe.tokenizer(list(texts), padding="max_length",
                         max_length=pipe.tokenizer.model_max_length, truncation=True,
                         return_tensors="pt")
    return [int(n) for n in tok.attention_mask.sum(dim=1)]


def concept_keys(pipe: Any, prompts: list[str], guides: list[str],
                 device: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(K, G): aligned token embeddings of the erased prompts and of their guides, (d, N)."""
    emb_c, emb_g = E.encode(pipe, prompts, device), E.encode(pipe, guides, device)
    n_c, n_g = token_counts(pipe, prompts), token_counts(pipe, guides)
    keys, guide_keys = [], []
    for i in range(len(prompts)):
        rows_c, rows_g = aligned_rows(n_c[i], n_g[i], emb_c.shape[1])
        keys.append(emb_c[i, list(rows_c)])
        guide_keys.append(emb_g[i, list(rows_g)])
    return torch.cat(keys).double().T, torch.cat(guide_keys).double().T


def preserve_keys(pipe: Any, texts: list[str], width: int, device: Any) -> torch.Tensor:
    """(d, M): every token embedding of the preserved concepts' prompts (M = 0 for none)."""
    if not texts:
        return torch.zeros(width, 0, dtype=torch.float64, device=device)
    return E.encode(pipe, texts, device).reshape(-1, width).double().T


def cross_attention_layers(unet: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """Every cross-attention module (attn2) of the UNet, by name."""
    return [(name, m) for name, m in unet.named_modules()
            if getattr(m, "is_cross_attention", False) and all(hasattr(m, p) for p in PROJECTIONS)]


training_prompts = E.no_cell_prompts


def prepare(pipe: Any, config: UCEConfig, data: PrepareData) -> dict[str, torch.Tensor]:
    """The edited to_k / to_v weights of every cross-attention layer (closed form, no training)."""
    unet = E.require_unet(pipe, "uce")
    layers = cross_attention_layers(unet)
    concepts = E.concept_list(config.concept)
    weights = {f"{name}.{p}.weight": getattr(m, p).weight for name, m in layers
               for p in PROJECTIONS}
    if not concepts:
        data.log("[uce] no concept named: the original weights (identity)")
        return {name: w.detach().clone() for name, w in weights.items()}
    guides, preserved = guides_for(config), E.concept_list(config.preserve)
    pairs = E.concept_prompts(concepts, config.template, "uce")
    prompts, prompt_guides = [p for _, p in pairs], [guides[i] for i, _ in pairs]
    device = next(unet.parameters()).device
    keys, guide_keys = concept_keys(pipe, prompts, prompt_guides, device)
    preserved = [p for _, p in E.concept_prompts(preserved, config.template, "uce")]
    kept = preserve_keys(pipe, preserved, keys.shape[0], device)
    data.log(f"[uce] erasing {', '.join(map(repr, prompts))} towards "
             f"{', '.join(map(repr, prompt_guides))} in {len(weights)} projections"
             + (f", preserving {', '.join(map(repr, preserved))}" if preserved else ""))
    out = {}
    for name, w in weights.items():
        w64 = w.detach().double()
        new = uce_closed_form(w64, keys, w64 @ guide_keys, kept, config.erase_scale,
                              config.preserve_scale, config.ridge)
        out[name] = new.to(w.dtype)
    return out


def apply(pipe: Any, config: UCEConfig, ctx: StepContext,
          artifact: dict[str, torch.Tensor]) -> MethodHandle:
    """Swap the edited projections into the pipeline's UNet (removable)."""
    return E.apply_weights(pipe, "uce", config, artifact)
