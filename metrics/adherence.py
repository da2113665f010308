"""Compositional prompt adherence on the embedded world (GenEval-style, Ghosh et al. 2023,
arXiv 2310.11513): does each generated image show the size, colour and shape its prompt asks
for, as read by the embedded judge?

Only for the embedded model (ModelSpec.embedded, mini-sd / mini-sd3) and its world captions,
"a {size} {colour} {shape} on a(n) {background} background" (harness.mini.world.caption). Each
image is read by mini-CLIP zero-shot over every world caption, marginalised per attribute
(harness.mini.zeroshot.ZeroShot.predict); the prompt's attributes come from `parse_caption`.
GenEval scores an object detector's reading of the image against the prompt's objects,
colours, counts and positions; here the world has one object, and its attributes are the
colour, the shape and the size (the background is read but not required by default).

Columns: `adherence` (share of images whose required attributes all match; colour, shape and
size by default), `adherence_<attribute>` per required attribute, each with a percentile
bootstrap interval and a small-sample warning (metrics.bootstrap.ci_columns);
`adherence_heldout` (the all-match share on images whose (shape, colour) is held out of
training, world.HELDOUT; None when the prompts hold none); `adherence_n` (images scored).
A prompt that is not a world caption is not scored: `adherence_note` counts them.
No columns for other models, toy models or random weights.
Options (`[metric_options.adherence]`): `attributes`, the attributes an image must match
(a list of "colour", "shape", "size", "background"; default colour, shape and size).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from harness.errors import DiffbenchError
from harness.metric import Metric, MetricContext, Observation, register_metric
from harness.mini.adherence import (
    ATTRIBUTES,
    REQUIRED,
    adherence_flags,
    adherence_values,
)
from metrics.bootstrap import (
    ci_columns,
    images_as_numpy,
    is_embedded,
    metric_options,
    quality_skip_reason,
)

MIN_N = 100

def check_attributes(value: Any) -> tuple[str, ...]:
    """The `attributes` option as a tuple, refused in one line when it names something else."""
    items = [value] if isinstance(value, str) else list(value)
    bad = [str(a) for a in items if a not in ATTRIBUTES]
    if bad or not items:
        raise DiffbenchError(f"[metric_options.adherence] attributes = {items!r}: choose one or "
                             f"more of {', '.join(ATTRIBUTES)}")
    return tuple(dict.fromkeys(items))


@functools.lru_cache(maxsize=1)
def world_judge() -> Callable[[np.ndarray], dict[str, Any]]:
    """uint8 N x H x W x 3 images -> attribute -> predicted value indices (mini-CLIP
    zero-shot, loaded once per process)."""
    import torch

    from harness.mini.zeroshot import ZeroShot

    zero_shot = ZeroShot.load()

    @torch.inference_mode()
    def judge(images: np.ndarray) -> dict[str, Any]:
        x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0
        return {k: v.numpy() for k, v in zero_shot.predict(x).items()}

    return judge


@register_metric("adherence")
class Adherence(Metric):
    """Share of images with their prompt's colour, shape and size (embedded world, judged).

    Per-attribute and held-out shares with intervals, and the number of images scored."""

    higher_is_better = True
    option_names = ("attributes",)
    def __init__(self, judge: Callable[[np.ndarray], Mapping[str, Any]] | None = None,
                 attributes: Sequence[str] = REQUIRED) -> None:
        super().__init__()
        self.judge, self.attributes = judge, tuple(attributes)
        self.add_state("flags", [], reduce="cat")  # FLAGS row per scored image
        self.add_state("unscored", [], reduce="cat")  # prompts that are not world captions

    @classmethod
    def for_cell(cls, context: MetricContext) -> Adherence:
        if quality_skip_reason(context) or not is_embedded(context):
            return cls()
        opts = metric_options(context, "adherence")
        attributes = check_attributes(opts.get("attributes", REQUIRED))
        return cls(world_judge(), attributes)

    def update(self, obs: Observation) -> None:
        if self.judge is None or obs.images is None or not obs.prompts:
            return
        images = images_as_numpy(obs.images)
        if len(images) != len(obs.prompts):
            raise ValueError(f"{len(images)} images but {len(obs.prompts)} prompts")
        rows = adherence_flags(self.judge(images), list(obs.prompts))
        self.flags.extend(r for r in rows if r is not None)
        self.unscored.extend(t for t, r in zip(obs.prompts, rows, strict=True) if r is None)

    def compute(self) -> dict[str, Any]:
        if self.judge is None:
            return {}
        out: dict[str, Any] = {}
        for col, values in adherence_values(self.flags, self.attributes).items():
            out.update(ci_columns(col, values, MIN_N, "wide interval"))
        out["adherence_n"] = len(self.flags)
        if self.unscored:
            total = len(self.flags) + len(self.unscored)
            example = " ".join(str(self.unscored[0]).split())[:40]
            out["adherence_note"] = (f"{len(self.unscored)} of {total} prompts are not world "
                                     f"captions, not scored (e.g. {example!r})")
        return out
