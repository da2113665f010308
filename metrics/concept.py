"""Concept ratio: share of images in which a named concept is still detected, by zero-shot
CLIP (the concept prompt against contrast prompts), for concept-erasure methods.

A cell gets a value only when a concept is named: `[metric_options.concept] concept = "..."`
in the run options (every cell, baseline included, so the ratio before erasure sits next to the
ratio after), or a `concept` / `erase` key in the cell's method params (that cell only).
Detection: softmax over logit_scale * cos(image, prompt) across [concept, *contrasts]; the image
counts when the concept prompt has the highest probability and at least `min_prob` (0 default).
Options (`[metric_options.concept]`): `concept`, `contrasts` (list of prompts), `template`
("{}" is the concept or contrast), `min_prob`, `clip_model` (as for clip_score).
On the embedded mini-sd, a concept that is one of the world's colours or shapes ("red",
"circle") is detected by mini-CLIP zero-shot over all world captions, marginalised to that
attribute (harness.mini.zeroshot.ZeroShot): a single word is a poor prompt for mini-CLIP's
word-level causal text tower.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from harness.metric import Metric, MetricContext, Observation, register_metric
from metrics.bootstrap import (
    ci_columns,
    images_as_numpy,
    is_embedded,
    metric_options,
    quality_skip_reason,
)

CONTRASTS = ("a photo", "an image of an object", "a picture of a scene")
TEMPLATE = "{}"
MIN_N = 100
PARAM_KEYS = ("concept", "erase")


def zero_shot_probs(image_emb: torch.Tensor, prompt_emb: torch.Tensor,
                    logit_scale: float = 100.0) -> torch.Tensor:
    """N x P softmax of logit_scale * cosine similarities (pure; float64)."""
    a = image_emb.double() / image_emb.double().norm(dim=-1, keepdim=True)
    b = prompt_emb.double() / prompt_emb.double().norm(dim=-1, keepdim=True)
    return torch.softmax(logit_scale * a @ b.T, dim=-1)


def detected(probs: torch.Tensor, min_prob: float = 0.0) -> np.ndarray:
    """1.0 where column 0 (the concept) is the argmax and has at least `min_prob`."""
    hit = (probs.argmax(-1) == 0) & (probs[:, 0] >= min_prob)
    return hit.double().numpy()


def logit_scale(backend: Any) -> float:
    """The CLIP model's learned logit scale (exp of its parameter), 100 when it has none."""
    scale = getattr(backend.model, "logit_scale", None)
    return float(scale.detach().exp()) if scale is not None else 100.0


def concept_of(context: Any) -> str:
    """The concept this cell is scored for ("" when none is named)."""
    opts = metric_options(context, "concept")
    if opts.get("concept"):
        return str(opts["concept"])
    try:
        params = json.loads(getattr(context.cell, "params", "{}") or "{}")
    except ValueError:
        return ""
    for key in PARAM_KEYS:
        value = params.get(key)
        if isinstance(value, str) and value:
            return value
    return ""


class WorldAttributeDetector:
    """mini-sd: is the image's shape colour (or shape) the concept? mini-CLIP zero-shot over
    every world caption, marginalised to the attribute (harness.mini.zeroshot.ZeroShot)."""

    name = "mini-clip-world-zero-shot"

    def __init__(self, concept: str):
        from harness.mini import zeroshot

        self.attribute = "colour" if concept in zeroshot.VALUES["colour"] else "shape"
        self.index = list(zeroshot.VALUES[self.attribute]).index(concept)
        self.zero_shot = zeroshot.ZeroShot.load()

    @staticmethod
    def handles(context: Any, concept: str) -> bool:
        from harness.mini import world

        return is_embedded(context) and (
            concept in world.COLOURS or concept in world.SHAPES)

    @torch.inference_mode()
    def probs(self, images: np.ndarray) -> torch.Tensor:
        """Per-image probability of the concept's value (caption probabilities marginalised)."""
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
        logp = self.zero_shot.caption_log_probs(x)
        mask = self.zero_shot.attr[self.attribute] == self.index
        return logp[:, mask].logsumexp(dim=-1).exp().double()

    @torch.inference_mode()
    def flags(self, images: np.ndarray) -> list[float]:
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
        predicted = self.zero_shot.predict(x)[self.attribute]
        return (predicted == self.index).double().tolist()


@register_metric("concept")
class ConceptRatio(Metric):
    """Share of images where the concept is detected (zero-shot), CI, concept and model named."""

    higher_is_better = False
    option_names = ("clip_model", "concept", "contrasts", "min_prob", "template")

    def __init__(self, backend: Any = None, concept: str = "",
                 contrasts: Sequence[str] = CONTRASTS, template: str = TEMPLATE,
                 min_prob: float = 0.0) -> None:
        super().__init__()
        self.backend, self.concept = backend, concept
        self.contrasts, self.template = tuple(contrasts), template
        self.min_prob = float(min_prob)
        self.note = ""
        self.world: WorldAttributeDetector | None = None
        self._prompt_emb: torch.Tensor | None = None
        self.each: list[WorldAttributeDetector] = []  # several world concepts, one per column
        self.add_state("flags", [], reduce="cat")
        self.add_state("flags_each", [], reduce="cat")  # per image: one flag per concept

    @classmethod
    def for_cell(cls, context: MetricContext) -> ConceptRatio:
        from metrics.clip_score import try_backend

        concept = concept_of(context)
        if quality_skip_reason(context) or not concept:
            return cls()
        concepts = [c.strip() for c in concept.split(",") if c.strip()]
        if len(concepts) > 1 and all(WorldAttributeDetector.handles(context, c)
                                     for c in concepts):
            m = cls(concept=",".join(concepts))  # several erased at once: one column each
            m.world = WorldAttributeDetector(concepts[0])
            m.each = [WorldAttributeDetector(c) for c in concepts]
            return m
        if WorldAttributeDetector.handles(context, concept):
            m = cls(concept=concept)
            m.world = WorldAttributeDetector(concept)
            return m
        opts = metric_options(context, "concept")
        backend, note = try_backend(context, "concept")
        if backend is None:
            m = cls(concept=concept)
            m.note = note
            return m
        return cls(backend, concept,
                   contrasts=tuple(opts.get("contrasts", CONTRASTS)),
                   template=str(opts.get("template", TEMPLATE)),
                   min_prob=float(opts.get("min_prob", 0.0)))

    @property
    def prompts(self) -> list[str]:
        return [self.template.format(t) for t in (self.concept, *self.contrasts)]

    def update(self, obs: Observation) -> None:
        if self.each and obs.images is not None:
            images = images_as_numpy(obs.images)
            per = list(zip(*[d.flags(images) for d in self.each], strict=True))
            self.flags_each.extend(list(f) for f in per)
            self.flags.extend(float(max(f)) for f in per)  # any of the concepts is there
            return
        if self.world is not None and obs.images is not None:
            self.flags.extend(self.world.flags(images_as_numpy(obs.images)))
            return
        if self.backend is None or not self.concept or obs.images is None:
            return
        if self._prompt_emb is None:
            self._prompt_emb = self.backend.text_embeds(self.prompts)
        emb = self.backend.image_embeds(images_as_numpy(obs.images))
        self.flags.extend(float(f) for f in detected(
            zero_shot_probs(emb, self._prompt_emb, logit_scale(self.backend)), self.min_prob))

    def compute(self) -> dict[str, Any]:
        if self.world is not None:
            out = ci_columns("concept_ratio", self.flags, MIN_N, "wide interval")
            out.update({"concept": self.concept, "concept_model": self.world.name,
                        "concept_contrasts": f"world {self.world.attribute}s"})
            if self.each:  # several concepts: also each on its own
                out["concept_contrasts"] = "world colours / shapes"
            for k, name in enumerate(self.concept.split(",") if self.each else ()):
                out.update(ci_columns(f"concept_ratio_{name}",
                                      [f[k] for f in self.flags_each], MIN_N, "wide interval"))
            return out
        if self.backend is None or not self.concept:
            return {"concept_ratio": None, "concept_note": self.note} if self.note else {}
        out = ci_columns("concept_ratio", self.flags, MIN_N, "wide interval")
        out.update({"concept": self.concept, "concept_model": self.backend.name,
                    "concept_contrasts": "|".join(self.contrasts)})
        return out


def concept_detector(context: MetricContext, concept: str) -> Any:
    """uint8 images -> per-image probability that `concept` is present (float64 tensor): the
    detector the concept column counts with (the world judge, or CLIP zero-shot); an attack's
    objective."""
    from harness.errors import DiffbenchError

    metric = ConceptRatio.for_cell(context) if concept_of(context) == concept else None
    if metric is None or (metric.world is None and metric.backend is None):
        if WorldAttributeDetector.handles(context, concept):
            world = WorldAttributeDetector(concept)
            return lambda images: world.probs(images_as_numpy(images))
        raise DiffbenchError(f"no detector for concept '{concept}': set [metric_options.concept]"
                             f" concept = '{concept}' (and clip_model on a non-embedded model)")
    if metric.world is not None:
        return lambda images: metric.world.probs(images_as_numpy(images))
    prompt_emb = metric.backend.text_embeds(metric.prompts)
    scale = logit_scale(metric.backend)

    def probs(images: Any) -> torch.Tensor:
        emb = metric.backend.image_embeds(images_as_numpy(images))
        return zero_shot_probs(emb, prompt_emb, scale)[:, 0]

    return probs
