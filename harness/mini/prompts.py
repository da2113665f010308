"""Prompt sets of the embedded world: its captions, all of them and split by the concept red."""

from __future__ import annotations

import itertools

from harness.mini.world import COLOURS, SHAPES, SIZES, caption
from harness.prompts import register_prompt_set, seeded_order

SHUFFLE_SEED = 0


@register_prompt_set("shapes")
def shapes() -> list[str]:
    """Captions of the procedural world: 5 shapes x 8 colours x 2 sizes x 7 backgrounds."""
    per_shape = [seeded_order([caption(shape, c, size, bg) for c, size, bg
                               in itertools.product(COLOURS, SIZES, COLOURS) if bg != c],
                              SHUFFLE_SEED) for shape in SHAPES]
    # Round-robin over the shuffled per-shape lists: any 5 consecutive prompts hold every shape.
    return [text for group in zip(*per_shape, strict=True) for text in group]


@register_prompt_set("shapes-red")
def shapes_red() -> list[str]:
    """World captions of red shapes (the concept an erasure suite removes), in shapes' order."""
    return [t for t in shapes() if t.split()[2] == "red"]


@register_prompt_set("shapes-not-red")
def shapes_not_red() -> list[str]:
    """World captions without the word red: what an erasure of red must leave intact."""
    return [t for t in shapes() if "red" not in t.split()]


def _with(value: str) -> list[str]:
    """World captions whose shape has this colour or is this shape, in shapes' order."""
    return [t for t in shapes() if t.split()[2:4].count(value)]


def _without(*values: str) -> list[str]:
    """World captions that name none of the values (as shape colour, shape or background)."""
    return [t for t in shapes() if not set(values) & set(t.split())]


for _value in (*COLOURS, *SHAPES):  # shapes-<colour> and shapes-<shape>: the concept's prompts
    if _value != "red":
        register_prompt_set(f"shapes-{_value}")(
            lambda v=_value: _with(v))
register_prompt_set("shapes-not-red-blue")(lambda: _without("red", "blue"))
register_prompt_set("shapes-not-red-blue-circle")(lambda: _without("red", "blue", "circle"))
