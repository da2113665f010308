"""Image grids of a run: the baseline row first, then one row per method under a short label,
the same prompt and seed in each column (numbered; the prompts listed under the grid), and
optionally |method - baseline| difference maps."""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from harness.errors import DiffbenchError
from harness.reporting.tables import Row, row_labels, slug, text, wrap

GRID_IMAGES, TILE_MIN, TILE_MAX = 8, 64, 256
LABEL_CHARS = 24  # a row label wraps at this many characters
DIFF_GAIN = 4  # difference maps are |a - b| x 4 (clipped), so small changes show
SAME_IMAGES = ("model", "weights", "prompts", "seed", "resolution", "n_images")


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


def difference(images: Any, baseline: Any) -> Any:
    """|images - baseline| x DIFF_GAIN per pixel, clipped to uint8 (equal shapes only)."""
    import numpy as np

    n = min(len(images), len(baseline), GRID_IMAGES)
    a, b = np.asarray(images[:n], dtype=np.int16), np.asarray(baseline[:n], dtype=np.int16)
    if a.shape != b.shape:
        return None
    return np.clip(np.abs(a - b) * DIFF_GAIN, 0, 255).astype(np.uint8)


def image_grid(labelled: Sequence[tuple[str, Any]], path: Path,
               captions: Sequence[str] = ()) -> None:
    """One row per (label, images or None): the wrapped label, then the images; a header of
    column numbers; `captions` (what each column shows) listed under the grid."""
    from PIL import Image, ImageDraw

    rows = [(label, tiles(images) if images is not None else []) for label, images in labelled]
    texts = ["\n".join(wrap(label, LABEL_CHARS)) + ("" if ts else "\n(no cached images)")
             for label, ts in rows]
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_w = 8 + max(probe.multiline_textbbox((0, 0), t)[2] for t in texts)
    tile_w = max([t.width for _, ts in rows for t in ts] + [TILE_MIN])
    heights = [max([t.height for t in ts] + [TILE_MIN], default=TILE_MIN) for _, ts in rows]
    columns = max(len(ts) for _, ts in rows)
    footer = [line for i, c in enumerate(captions[:columns], 1)
              for line in wrap(f"{i}: {c}", 110)]
    top, line_h = 14, 12
    width = max(label_w + columns * (tile_w + 2) + 2, label_w + TILE_MIN,
                8 + max((probe.textbbox((0, 0), f)[2] for f in footer), default=0))
    height = top + sum(h + 2 for h in heights) + 2 + (line_h * len(footer) + 6 if footer else 0)
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    for i in range(columns):
        draw.text((label_w + i * (tile_w + 2) + tile_w // 2 - 3, 1), str(i + 1), fill="black")
    y = top
    for (_, ts), label, h in zip(rows, texts, heights):
        draw.multiline_text((4, y + 2), label, fill="black")
        for i, t in enumerate(ts):
            canvas.paste(t, (label_w + i * (tile_w + 2), y))
        y += h + 2
    for line in footer:
        draw.text((4, y + 4), line, fill="black")
        y += line_h
    canvas.save(path)


def cached_images(run_dir: Path, key: str) -> Any:
    """A cell's cached images, or None (with a stderr line) when the key from the CSV is not a
    cell key or the file is absent or damaged."""
    from harness.run.store import CellStore

    try:
        return CellStore(run_dir).load_images(key)
    except DiffbenchError as exc:
        print(f"diffbench: grid without cell {key!r}: {exc}", file=sys.stderr)
        return None


def baseline_of(row: Row, rows: Sequence[Row]) -> Row | None:
    """The unattacked baseline row that made the same images as `row` would without a method
    (same model, weights, prompts, seed, resolution and count), or None."""
    for other in rows:
        if text(other, "method") == "baseline" and text(other, "attack") in ("", "none") \
                and all(text(other, c) == text(row, c) for c in SAME_IMAGES):
            return other
    return None


def captions(row: Row) -> list[str]:
    """What each column of a cell shows: its prompt and seed (empty when the prompt set cannot
    be read here)."""
    from harness.prompts import load_prompts
    from harness.seeds import image_seed

    try:
        prompts = load_prompts(text(row, "prompts"), min(int(text(row, "n_images")), GRID_IMAGES))
        seed = int(text(row, "seed") or 0)
    except (DiffbenchError, ValueError, OSError):
        return []
    return [f"{p.text} (seed {p.seed if p.seed is not None else image_seed(seed, i)})"
            for i, p in enumerate(prompts.prompts)]


def grids(run_dir: Path, groups: dict[str, list[Row]], out: Path,
          defaults: dict[str, dict[str, Any]], diff: bool = False) -> dict[str, list[str]]:
    """Write grid-<model>.png (and diff-<model>.png with `diff`) for every model's rows
    (numbered as in the tables, baseline first: see `baseline_first`); model -> file names."""
    written: dict[str, list[str]] = {}
    for model, group in groups.items():
        rows = list(group)
        images = {text(r, "config_hash"): cached_images(run_dir, text(r, "config_hash"))
                  for r in rows}
        labels = [f"{n}. {lb}" for n, lb in enumerate(row_labels(rows, defaults), 1)]
        shown = captions(rows[0])
        name = f"grid-{slug(model)}.png"
        image_grid([(lb, images[text(r, "config_hash")]) for lb, r in zip(labels, rows)],
                   out / name, shown)
        written[model] = [name]
        if diff:
            name = f"diff-{slug(model)}.png"
            image_grid(difference_rows(rows, labels, images), out / name, shown)
            written[model].append(name)
    return written


def difference_rows(rows: Sequence[Row], labels: Sequence[str],
                    images: dict[str, Any]) -> list[tuple[str, Any]]:
    """The baseline rows as they are, every other row as its difference to its baseline."""
    out = []
    for row, label in zip(rows, labels):
        mine = images[text(row, "config_hash")]
        base = baseline_of(row, rows)
        if text(row, "method") == "baseline" or mine is None:
            out.append((label, mine))
        elif base is None or images[text(base, "config_hash")] is None:
            out.append((f"{label} (no baseline at these settings)", None))
        else:
            out.append((f"{label} |diff| x{DIFF_GAIN}",
                        difference(mine, images[text(base, "config_hash")])))
    return out
