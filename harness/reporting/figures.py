"""Figures of a run: the speed-quality Pareto plot and the image grids."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from harness.errors import DiffbenchError
from harness.reporting.tables import (
    PARETO_QUALITY,
    Row,
    higher_is_better,
    number,
    present,
    row_labels,
    slug,
    text,
)

GRID_IMAGES, TILE_MIN, TILE_MAX = 8, 64, 256


def pareto_front(points: Sequence[tuple[float, float]], higher_y: bool) -> list[int]:
    """Indices of the points no other point dominates (x: higher is better; y: as given),
    sorted by x."""
    sign = 1.0 if higher_y else -1.0

    def dominates(a: tuple[float, float], b: tuple[float, float]) -> bool:
        return a[0] >= b[0] and sign * a[1] >= sign * b[1] and a != b

    front = [i for i, p in enumerate(points) if not any(dominates(q, p) for q in points)]
    return sorted(front, key=lambda i: (points[i][0], sign * points[i][1]))


def pareto_column(rows: Sequence[Row], requested: str | None) -> str | None:
    """The quality column of the plot: the requested one, else the first with values."""
    if requested:
        if not present(rows, [requested]):
            raise DiffbenchError(f"--quality {requested}: no finished cell has that column")
        return requested
    found = present(rows, PARETO_QUALITY)
    return found[0] if found else None


def pareto_plot(groups: dict[str, list[Row]], column: str, path: Path,
                defaults: dict[str, dict[str, Any]] | None = None) -> None:
    """One panel per model: labelled points with CI bars, the Pareto front as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    higher = higher_is_better(column)
    fig, axes = plt.subplots(1, len(groups), figsize=(5.5 * len(groups), 4.2), squeeze=False)
    for ax, (model, rows) in zip(axes[0], groups.items()):
        labels = row_labels(rows, defaults)
        pts = [(number(r.get("speedup")), number(r.get(column))) for r in rows]
        keep = [i for i, (x, y) in enumerate(pts) if x is not None and y is not None]
        xy = [pts[i] for i in keep]
        ax.errorbar([p[0] for p in xy], [p[1] for p in xy], yerr=ci_errors(rows, keep, column),
                    fmt="o", capsize=3, zorder=3)
        for i, p in zip(keep, xy):
            ax.annotate(labels[i], p, textcoords="offset points", xytext=(4, 4), fontsize=7)
        front = [xy[i] for i in pareto_front(xy, bool(higher))] if higher is not None else []
        if front:
            ax.plot([p[0] for p in front], [p[1] for p in front], "--", color="tab:red",
                    zorder=2, label="Pareto front")
            ax.legend(fontsize=7, loc="best")
        ax.set_title(model)
        ax.set_xlabel("speedup vs baseline (higher is better)")
        direction = {True: "higher", False: "lower"}.get(higher, "unknown direction")
        ax.set_ylabel(f"{column} ({direction} is better)")
        ax.grid(alpha=0.3)
        ax.margins(0.2, 0.15)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def ci_errors(rows: Sequence[Row], keep: Sequence[int], column: str) -> list[list[float]]:
    """Error bars (below, above) from the rows' bootstrap interval; 0 where there is none."""
    below, above = [], []
    for i in keep:
        y = number(rows[i].get(column))
        lo, hi = number(rows[i].get(f"{column}_ci_lo")), number(rows[i].get(f"{column}_ci_hi"))
        below.append(max(y - lo, 0.0) if lo is not None else 0.0)
        above.append(max(hi - y, 0.0) if hi is not None else 0.0)
    return [below, above]


def tiles(images: Any) -> list[Any]:
    """The first images as PIL tiles, upscaled (nearest) to >= 64 px, shrunk to <= 256 px."""
    from PIL import Image

    out = []
    for img in images[:GRID_IMAGES]:
        tile = Image.fromarray(img[..., :3].astype("uint8"), "RGB")
        h = tile.height
        if h < TILE_MIN:
            factor = math.ceil(TILE_MIN / h)
            tile = tile.resize((tile.width * factor, h * factor), Image.NEAREST)
        elif h > TILE_MAX:
            tile = tile.resize((round(tile.width * TILE_MAX / h), TILE_MAX), Image.BOX)
        out.append(tile)
    return out


def image_grid(labelled: Sequence[tuple[str, Any]], path: Path) -> None:
    """One row per (label, images or None): the label on the left, then the images."""
    from PIL import Image, ImageDraw

    rows = [(label, tiles(images) if images is not None else []) for label, images in labelled]
    wrapped = [_wrap(label) + ("" if ts else "\n(no cached images)") for label, ts in rows]
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_w = 8 + max(probe.multiline_textbbox((0, 0), w)[2] for w in wrapped)
    heights = [max([t.height for t in ts] + [TILE_MIN]) for _, ts in rows]
    width = label_w + max(sum(t.width + 2 for t in ts) for _, ts in rows) + 2
    canvas = Image.new("RGB", (max(width, label_w + TILE_MIN), sum(h + 2 for h in heights) + 2),
                       "white")
    draw, y = ImageDraw.Draw(canvas), 2
    for (_, ts), text_, h in zip(rows, wrapped, heights):
        draw.multiline_text((4, y + 2), text_, fill="black")
        x = label_w
        for t in ts:
            canvas.paste(t, (x, y))
            x += t.width + 2
        y += h + 2
    canvas.save(path)


def _wrap(label: str, width: int = 22) -> str:
    lines, line = [], ""
    for word in re.split(r"(?<=[ ,])", label):
        if line and len(line) + len(word) > width:
            lines.append(line.rstrip())
            line = ""
        line += word
    return "\n".join([*lines, line.rstrip()])


def cached_images(run_dir: Path, key: str) -> Any:
    """A cell's cached images, or None (with a stderr line) when the key from the CSV is not a
    cell key or the file is absent or damaged."""
    import sys

    from harness.errors import DiffbenchError
    from harness.run.store import CellStore

    try:
        return CellStore(run_dir).load_images(key)
    except DiffbenchError as exc:
        print(f"diffbench: grid without cell {key!r}: {exc}", file=sys.stderr)
        return None


def grids(run_dir: Path, groups: dict[str, list[Row]], out: Path,
          defaults: dict[str, dict[str, Any]]) -> dict[str, str]:
    """Write grid-<model>.png for every model with finished cells; model -> file name."""
    written = {}
    for model, rows in groups.items():
        images = [cached_images(run_dir, text(r, "config_hash")) for r in rows]
        name = f"grid-{slug(model)}.png"
        image_grid(list(zip(row_labels(rows, defaults), images)), out / name)
        written[model] = name
    return written
