"""The embedded judge: mini-CLIP zero-shot classifier of the world's attributes.

Each image is scored against every caption of the world (5 shapes x 8 colours x 2 sizes x 7
backgrounds = 560 captions) and an attribute is predicted by summing the caption probabilities
that share its value (CLIP zero-shot, Radford et al. 2021, Sec. 3.1.4). Concept detection and
the mini model's self-evaluation use it.
"""

from __future__ import annotations

from typing import Any

import torch

from harness.mini import world
from harness.mini.clip import image_embeddings, load_mini_clip, text_embeddings

ATTRIBUTES = ("shape", "colour", "size", "background")
VALUES = {"shape": world.SHAPES, "colour": world.COLOURS, "size": world.SIZES,
          "background": world.BACKGROUNDS}


class ZeroShot:
    """mini-CLIP zero-shot classifier of the world's attributes (a concept detector)."""

    def __init__(self, model: Any, tokenizer: Any):
        self.model = model
        combos = world.combinations("all")
        self.captions = [world.caption(world.SHAPES[s], world.COLOURS[c], world.SIZES[z],
                                       world.BACKGROUNDS[b]) for s, c, z, b in combos]
        self.attr = {name: torch.tensor([combo[i] for combo in combos])
                     for i, name in enumerate(ATTRIBUTES)}
        self.text = text_embeddings(model, tokenizer, self.captions)
        self.scale = float(model.logit_scale.detach().exp().clamp(max=100))

    @classmethod
    def load(cls) -> ZeroShot:
        return cls(*load_mini_clip())

    def caption_log_probs(self, images: torch.Tensor) -> torch.Tensor:
        """log p(caption | image), N x 560, for float [0, 1] N x 3 x H x W images."""
        logits = self.scale * image_embeddings(self.model, images) @ self.text.T
        return logits.log_softmax(dim=-1)

    def predict(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Predicted index of each attribute (marginalising the caption probabilities)."""
        logp = self.caption_log_probs(images)
        out = {}
        for name in ATTRIBUTES:
            k = len(VALUES[name])
            per_value = torch.full((len(images), k), -torch.inf)
            for v in range(k):
                per_value[:, v] = logp[:, self.attr[name] == v].logsumexp(dim=-1)
            out[name] = per_value.argmax(dim=-1)
        return out
