"""The world's compositional adherence, pure: a caption's attributes and, per image, which of
them the judge reads as the prompt's (GenEval-style, Ghosh et al. 2023, arXiv 2310.11513).

The `adherence` metric (metrics/adherence.py) and the models' self-evaluation (evaluate.py)
both score with these functions.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

ATTRIBUTES = ("colour", "shape", "size", "background")  # what the judge reads
REQUIRED = ("colour", "shape", "size")  # what an image must match by default
FLAGS = (*ATTRIBUTES, "heldout")  # one row per scored image: 1.0 / 0.0 each
Row = list[float]


class Caption(NamedTuple):
    """A world caption's attributes, in world.caption's argument order."""

    shape: str
    colour: str
    size: str
    background: str


def parse_caption(text: str) -> Caption | None:
    """The attributes of a world caption ("a small green star on an orange background"), or
    None for text that is not one (case and runs of spaces ignored)."""
    from harness.mini import world

    words = str(text).lower().split()
    if len(words) != 8:
        return None
    a, size, colour, shape, on, article, background, last = words
    parsed = Caption(shape, colour, size, background)
    if (a, on, last) != ("a", "on", "background") or size not in world.SIZES \
            or colour not in world.COLOURS or shape not in world.SHAPES \
            or background not in world.BACKGROUNDS or background == colour:
        return None
    return parsed if world.caption(*parsed) == " ".join(words) else None


def adherence_flags(predicted: Mapping[str, Any], prompts: Sequence[str]) -> list[Row | None]:
    """Per image, its FLAGS row: 1.0 where the judged attribute is the prompt's, and whether the
    prompt's (shape, colour) is held out; None where the prompt is not a world caption.

    `predicted`: attribute -> N predicted value indices (ZeroShot.predict's output).
    """
    from harness.mini import world
    from harness.mini.zeroshot import VALUES

    picks = {name: [int(v) for v in np.asarray(predicted[name]).reshape(-1)]
             for name in ATTRIBUTES}
    if any(len(v) != len(prompts) for v in picks.values()):
        raise ValueError(f"{len(picks['colour'])} judged images but {len(prompts)} prompts")
    out: list[Row | None] = []
    for i, text in enumerate(prompts):
        wanted = parse_caption(text)
        if wanted is None:
            out.append(None)
            continue
        row = [float(VALUES[name][picks[name][i]] == getattr(wanted, name))
               for name in ATTRIBUTES]
        out.append([*row, float(world.is_heldout(wanted.shape, wanted.colour))])
    return out


def adherence_values(rows: Sequence[Sequence[float]],
                     attributes: Sequence[str] = REQUIRED) -> dict[str, list[float]]:
    """Per-image values of each column from FLAGS rows: `adherence` (all `attributes` match),
    `adherence_<attribute>` for each of them, `adherence_heldout` (all match, held-out rows)."""
    flags = np.asarray(rows, dtype=np.float64).reshape(-1, len(FLAGS))
    need = [FLAGS.index(a) for a in attributes]
    every = flags[:, need].min(axis=1) if need else np.ones(len(flags))
    out = {"adherence": every.tolist()}
    out.update({f"adherence_{a}": flags[:, FLAGS.index(a)].tolist() for a in attributes})
    out["adherence_heldout"] = every[flags[:, FLAGS.index("heldout")] == 1.0].tolist()
    return out


def adherence_shares(rows: Sequence[Sequence[float]],
                     attributes: Sequence[str] = REQUIRED) -> dict[str, float | None]:
    """The point values of `adherence_values` (None for a column without images)."""
    return {k: (float(np.mean(v)) if v else None)
            for k, v in adherence_values(rows, attributes).items()}
