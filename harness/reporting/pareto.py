"""Speed-quality plots: speedup (with its paired-rounds interval) against a quality column (with
its bootstrap interval), numbered points coloured by method family, a legend table beside the
plot, the Pareto front as a dashed line."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from harness.errors import DiffbenchError
from harness.reporting.tables import (
    PARETO_QUALITY,
    Row,
    higher_is_better,
    interval,
    number,
    present,
    row_labels,
    slug,
    text,
    wrap,
)

MARKERS = "osD^vP*Xph<>"


def pareto_front(points: Sequence[tuple[float, float]], higher_y: bool) -> list[int]:
    """Indices of the points no other point dominates (x: higher is better; y: as given),
    sorted by x."""
    sign = 1.0 if higher_y else -1.0

    def dominates(a: tuple[float, float], b: tuple[float, float]) -> bool:
        return a[0] >= b[0] and sign * a[1] >= sign * b[1] and a != b

    front = [i for i, p in enumerate(points) if not any(dominates(q, p) for q in points)]
    return sorted(front, key=lambda i: (points[i][0], sign * points[i][1]))


def pareto_columns(rows: Sequence[Row], requested: str | None) -> list[str]:
    """The quality columns to plot: the requested one, else every main one with values (the
    Frechet column first)."""
    if requested:
        if not present(rows, [requested]):
            raise DiffbenchError(f"--quality {requested}: no finished cell has that column")
        return [requested]
    return present(rows, PARETO_QUALITY)


def ci_errors(rows: Sequence[Row], keep: Sequence[int], column: str) -> list[list[float]]:
    """Error bars (below, above) from the rows' 95% interval; 0 where there is none."""
    below, above = [], []
    for i in keep:
        value = number(rows[i].get(column))
        lo, hi = interval(rows[i], column)
        below.append(max(value - lo, 0.0) if lo is not None and value is not None else 0.0)
        above.append(max(hi - value, 0.0) if hi is not None and value is not None else 0.0)
    return [below, above]


def families(rows: Sequence[Row]) -> dict[str, tuple[Any, str]]:
    """Method family (the method name; a stack is its own) -> (colour, marker), in row order."""
    from matplotlib import colormaps

    cmap = colormaps["tab20"]
    names = list(dict.fromkeys(text(r, "method") for r in rows))
    return {name: (cmap(i % 20), MARKERS[i % len(MARKERS)]) for i, name in enumerate(names)}


def plotted(rows: Sequence[Row], column: str) -> list[int]:
    """Indices of the rows with both a speedup and a value in the column."""
    return [i for i, r in enumerate(rows)
            if number(r.get("speedup")) is not None and number(r.get(column)) is not None]


def pareto_plot(model: str, rows: Sequence[Row], column: str, path: Path,
                defaults: dict[str, dict[str, Any]] | None = None) -> None:
    """One figure: the points numbered by row (1 = the first row) with both intervals, the
    front, the legend table."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    keep, labels, style = plotted(rows, column), row_labels(rows, defaults), families(rows)
    lines = [(i + 1, i, part, k) for i in keep for k, part in enumerate(wrap(labels[i], 46))]
    fig, (ax, legend) = plt.subplots(
        1, 2, figsize=(11.5, max(4.6, 0.2 * len(lines) + 1.2)),
        gridspec_kw={"width_ratios": [1.35, 1.0]})
    higher = higher_is_better(column)
    xs = [number(rows[i].get("speedup")) for i in keep]
    ys = [number(rows[i].get(column)) for i in keep]
    xerr, yerr = ci_errors(rows, keep, "speedup"), ci_errors(rows, keep, column)
    for k, (i, x, y) in enumerate(zip(keep, xs, ys)):
        colour, marker = style[text(rows[i], "method")]
        ax.errorbar([x], [y], xerr=[[xerr[0][k]], [xerr[1][k]]], yerr=[[yerr[0][k]], [yerr[1][k]]],
                    fmt=marker, color=colour, ecolor=colour, elinewidth=0.8, capsize=2,
                    markersize=6, zorder=3)
    points = list(zip(xs, ys))
    front = [points[i] for i in pareto_front(points, bool(higher))] if higher is not None else []
    if front:
        ax.plot([p[0] for p in front], [p[1] for p in front], "--o", color="0.35", lw=1,
                markersize=12, markerfacecolor="none", zorder=2, label="Pareto front")
        ax.legend(fontsize=7, loc="best")
    ax.axvline(1.0, color="0.7", lw=0.8, zorder=1)
    ax.margins(0.12, 0.12)
    ax.autoscale_view()
    pixels = ax.transData.transform(points) if points else []
    for (i, _), offset in zip(zip(keep, points), label_offsets(pixels, fig.dpi)):
        ax.annotate(str(i + 1), points[keep.index(i)], textcoords="offset points",
                    xytext=offset, fontsize=7, zorder=4)
    direction = {True: "higher", False: "lower"}.get(higher, "unknown direction")
    ax.set_title(f"{model}: speedup vs {column}", fontsize=10)
    ax.set_xlabel("speedup vs baseline, 95% interval (higher is better)")
    ax.set_ylabel(f"{column}, 95% interval ({direction} is better)")
    ax.grid(alpha=0.3)
    draw_legend(legend, rows, lines, style)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


OFFSETS = [(4, 3), (4, -9), (-11, 3), (-11, -9), (-3, 8), (-3, -14), (10, -3), (-17, -3),
           (10, 9), (-17, 9), (10, -15), (-17, -15)]  # label positions tried, in points


def label_offsets(pixels: Any, dpi: float) -> list[tuple[int, int]]:
    """For each point (display pixels, in order) the first offset whose number box (7 pt
    text, 2 digits) overlaps no marker and no number already placed; the least crowded one
    when every offset overlaps."""
    scale, placed = dpi / 72.0, []
    w, h, r = 9 * scale, 7 * scale, 4 * scale

    def crowding(box: tuple[float, float, float, float]) -> int:
        x0, y0, x1, y1 = box
        hits = sum(x0 < b[2] and b[0] < x1 and y0 < b[3] and b[1] < y1 for b in placed)
        return hits + sum(x0 - r < px < x1 + r and y0 - r < py < y1 + r for px, py in pixels)

    out = []
    for px, py in pixels:
        boxes = [(px + dx * scale, py + dy * scale, px + dx * scale + w, py + dy * scale + h)
                 for dx, dy in OFFSETS]
        scores = [crowding(b) for b in boxes]
        best = scores.index(min(scores))
        placed.append(boxes[best])
        out.append(OFFSETS[best])
    return out


def draw_legend(ax: Any, rows: Sequence[Row], lines: Sequence[tuple[int, int, str, int]],
                style: dict[str, tuple[Any, str]]) -> None:
    """The legend table: number, family marker, short label (wrapped), one line each."""
    ax.set_axis_off()
    ax.set_xlim(0, 1)
    ax.set_ylim(len(lines) + 0.5, -0.5)
    for y, (n, i, part, k) in enumerate(lines):
        if k == 0:
            colour, marker = style[text(rows[i], "method")]
            ax.text(0.0, y, f"{n:>2}", fontsize=8, va="center", ha="left", family="monospace")
            ax.plot([0.075], [y], marker=marker, color=colour, markersize=6, clip_on=False)
        ax.text(0.12, y, part, fontsize=8, va="center", ha="left")


def pareto_plots(groups: dict[str, list[Row]], columns: Sequence[str], out: Path,
                 defaults: dict[str, dict[str, Any]] | None = None) -> dict[str, list[str]]:
    """Write pareto-<model>-<column>.png for every model and column with points; model ->
    file names."""
    written: dict[str, list[str]] = {}
    for model, rows in groups.items():
        for column in columns:
            if not plotted(rows, column):
                continue
            name = f"pareto-{slug(model)}-{slug(column)}.png"
            pareto_plot(model, rows, column, out / name, defaults)
            written.setdefault(model, []).append(name)
    return written
