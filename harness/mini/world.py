"""The procedural captioned image world of the embedded `mini-sd` model.

32x32 RGB images of one shape (circle, square, triangle, cross, star) in one of 8 colours, small
or large, at a jittered position on a background of another colour, captioned like
"a large red circle on a blue background". Rendering is vectorised with torch (coordinate grids
and one mask per shape, 2x2 supersampled for soft edges): tens of thousands of images a second
on one core. Everything is deterministic from a seed.

Two (shape, colour) combinations are held out of training to test composition: every purple
triangle and every yellow cross (any size, any background). `sample(n, seed, split)` draws from
"train" (without them), "heldout" (only them) or "all".
"""

from __future__ import annotations

import dataclasses
import math

import torch

SHAPES = ("circle", "square", "triangle", "cross", "star")
COLOURS = ("red", "green", "blue", "yellow", "orange", "purple", "white", "black")
SIZES = ("small", "large")
BACKGROUNDS = COLOURS  # any colour but the shape's own
RGB = {  # 0-255, the centre of each colour's per-image jitter
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 220, 40),
    "orange": (245, 140, 30),
    "purple": (140, 60, 190),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
HELDOUT = (("triangle", "purple"), ("cross", "yellow"))  # (shape, colour) never in training
SPLITS = ("train", "heldout", "all")

RESOLUTION = 32
SIZE_RADIUS = {"small": (5.0, 7.0), "large": (10.0, 12.5)}  # radius range in pixels
COLOUR_JITTER = 12.0  # +- per channel (0-255), drawn once per image for shape and background
SUPERSAMPLE = 2


def caption(shape: str, colour: str, size: str, background: str) -> str:
    """One caption of the world, e.g. "a small green star on an orange background"."""
    article = "an" if background[0] in "aeiou" else "a"
    return f"a {size} {colour} {shape} on {article} {background} background"


def words() -> list[str]:
    """Every word a caption can hold (the mini-CLIP tokenizer's vocabulary), in a fixed order."""
    out = ["a", "an", "on", "background", *SIZES, *COLOURS, *SHAPES]
    return list(dict.fromkeys(out))


def all_captions(split: str = "all") -> list[str]:
    """Every distinct caption of a split (5 x 8 x 2 x 7 = 560 for "all"), in attribute order."""
    return [caption(SHAPES[s], COLOURS[c], SIZES[z], BACKGROUNDS[b])
            for s, c, z, b in combinations(split)]


def combinations(split: str) -> list[tuple[int, int, int, int]]:
    pairs = _pairs(split)
    return [(s, c, z, b) for s, c in pairs for z in range(len(SIZES))
            for b in range(len(BACKGROUNDS)) if b != c]


def _pairs(split: str) -> list[tuple[int, int]]:
    """(shape index, colour index) pairs allowed in a split."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    held = {(SHAPES.index(s), COLOURS.index(c)) for s, c in HELDOUT}
    every = [(s, c) for s in range(len(SHAPES)) for c in range(len(COLOURS))]
    if split == "train":
        return [p for p in every if p not in held]
    if split == "heldout":
        return [p for p in every if p in held]
    return every


def is_heldout(shape: str, colour: str) -> bool:
    return (shape, colour) in HELDOUT


@dataclasses.dataclass
class Batch:
    """Images (uint8, N x 32 x 32 x 3), their captions and attribute indices (int64, N)."""

    images: torch.Tensor
    captions: list[str]
    shape: torch.Tensor
    colour: torch.Tensor
    size: torch.Tensor
    background: torch.Tensor

    def __len__(self) -> int:
        return len(self.captions)

    def float_images(self) -> torch.Tensor:
        """N x 3 x 32 x 32 float in [0, 1] (the layout diffusers and mini-CLIP take)."""
        return self.images.permute(0, 3, 1, 2).float() / 255.0


def sample(n: int, seed: int, split: str = "train") -> Batch:
    """n random images of a split; the same (n, seed, split) always gives the same batch."""
    gen = torch.Generator().manual_seed(int(seed))
    pairs = torch.tensor(_pairs(split), dtype=torch.long)
    pick = torch.randint(len(pairs), (n,), generator=gen)
    shape, colour = pairs[pick, 0], pairs[pick, 1]
    size = torch.randint(len(SIZES), (n,), generator=gen)
    # A background uniform over the 7 other colours: shift past the shape's colour.
    background = torch.randint(len(BACKGROUNDS) - 1, (n,), generator=gen)
    background = background + (background >= colour).long()
    images = render(shape, colour, size, background, gen)
    captions = [caption(SHAPES[s], COLOURS[c], SIZES[z], BACKGROUNDS[b])
                for s, c, z, b in zip(shape.tolist(), colour.tolist(), size.tolist(),
                                      background.tolist(), strict=True)]
    return Batch(images, captions, shape, colour, size, background)


def render(shape: torch.Tensor, colour: torch.Tensor, size: torch.Tensor,
           background: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Draw images of given attribute indices (radius, position, rotation-free, colour jitter)."""
    n = len(shape)
    lo = torch.tensor([SIZE_RADIUS[s][0] for s in SIZES])[size]
    hi = torch.tensor([SIZE_RADIUS[s][1] for s in SIZES])[size]
    radius = lo + (hi - lo) * torch.rand(n, generator=gen)
    # Centre anywhere the shape stays inside the image with a 1 px margin.
    span = RESOLUTION - 2 * (radius + 1)
    cx = radius + 1 + span * torch.rand(n, generator=gen)
    cy = radius + 1 + span * torch.rand(n, generator=gen)
    palette = torch.tensor([RGB[c] for c in COLOURS], dtype=torch.float32)
    fg = palette[colour] + COLOUR_JITTER * (2 * torch.rand(n, 3, generator=gen) - 1)
    bg = palette[background] + COLOUR_JITTER * (2 * torch.rand(n, 3, generator=gen) - 1)

    # Sample points: SUPERSAMPLE^2 per pixel, in pixel units, averaged back to 32x32 coverage.
    k = SUPERSAMPLE
    axis = (torch.arange(RESOLUTION * k, dtype=torch.float32) + 0.5) / k
    u = (axis.view(1, 1, -1) - cx.view(-1, 1, 1)) / radius.view(-1, 1, 1)  # x, right
    v = (axis.view(1, -1, 1) - cy.view(-1, 1, 1)) / radius.view(-1, 1, 1)  # y, down
    mask = torch.zeros(n, RESOLUTION * k, RESOLUTION * k)
    for index, name in enumerate(SHAPES):
        rows = (shape == index).nonzero().flatten()
        if len(rows):
            mask[rows] = SHAPE_MASKS[name](u[rows], v[rows]).float()
    cover = mask.view(n, RESOLUTION, k, RESOLUTION, k).mean(dim=(2, 4)).unsqueeze(-1)
    image = cover * fg.view(n, 1, 1, 3) + (1 - cover) * bg.view(n, 1, 1, 3)
    return image.round().clamp(0, 255).to(torch.uint8)


# --- shape masks over normalised coordinates (u right, v down, radius 1) -----------------------
def _circle(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return u * u + v * v <= 1.0


def _square(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return torch.maximum(u.abs(), v.abs()) <= 0.82


def _triangle(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    # Upright, apex at v = -1, base at v = 0.75, half-width 1 at the base.
    return (v <= 0.75) & (u.abs() <= (v + 1.0) / 1.75)


def _cross(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    arm, half = 0.32, 0.95
    return ((u.abs() <= arm) & (v.abs() <= half)) | ((v.abs() <= arm) & (u.abs() <= half))


def _star(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    # Five points, one straight up: a polygon with straight edges between outer and inner tips.
    outer, inner = 1.0, 0.42
    theta = torch.atan2(u, -v)  # 0 points up, clockwise
    sector = 2 * math.pi / 5
    phi = torch.remainder(theta + sector / 2, sector) - sector / 2  # angle to the nearest tip
    phi = phi.abs()
    # Edge from tip (outer, 0) to notch (inner, sector/2), in the sector's polar frame.
    a = torch.tensor([outer, 0.0])
    b = torch.tensor([inner * math.cos(sector / 2), inner * math.sin(sector / 2)])
    normal = torch.tensor([b[1] - a[1], a[0] - b[0]])  # points away from the origin
    offset = (normal * a).sum()
    rho = torch.sqrt(u * u + v * v)
    x, y = rho * torch.cos(phi), rho * torch.sin(phi)
    return x * normal[0] + y * normal[1] <= offset


SHAPE_MASKS = {"circle": _circle, "square": _square, "triangle": _triangle, "cross": _cross,
               "star": _star}
