"""`diffbench report RUN_DIR`: paper-ready tables, a Pareto plot and image grids of a run.

Writes into REPORT_DIR (default RUN_DIR/report): `report.md` (one Markdown table per model,
failed cells with their error, links, the environment card), `table.tex` (booktabs tables,
mean $\\pm$ half-width of the 95% bootstrap interval, best entry per column in bold),
`pareto.png` (speedup vs a quality column, Pareto front per model) and `grid-<model>.png`
(the first cached images of every method row). Table building is pure (rows in, text out).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from harness.errors import DiffbenchError
from harness.run.leaderboard import ENVIRONMENT

Row = dict[str, Any]
SPEED = ("latency_s", "images_per_s", "speedup", "flops_ratio", "peak_mem_mb")
QUALITY = ("fd_clip", "fid", "clip_score", "nsfw_ratio", "concept_ratio", "psnr", "ssim")
PARETO_QUALITY = ("fd_clip", "fid", "clip_score", "psnr")
SETTINGS = ("weights", "prompts", "resolution", "dtype", "device", "seed", "n_images",
            "guidance", "batch_size")  # shown only when they vary within a model's rows
# column -> registered metric whose class attribute `higher_is_better` gives its direction
METRIC_OF = {"latency_s": "latency", "peak_mem_mb": "memory", "fid": "fid", "fd_clip": "fd_clip",
             "clip_score": "clip_score", "nsfw_ratio": "nsfw", "concept_ratio": "concept",
             "psnr": "fidelity", "ssim": "fidelity"}
HIGHER_FALLBACK = {"speedup": True, "images_per_s": True, "clip_score": True, "psnr": True,
                   "ssim": True, "latency_s": False, "fd_clip": False, "fid": False,
                   "flops_ratio": False, "peak_mem_mb": False, "nsfw_ratio": False,
                   "concept_ratio": False, "mfu": True, "tflops_achieved": True}
LATEX_HEADERS = {"latency_s": "Latency (s)", "images_per_s": "Images/s", "speedup": "Speedup",
                 "flops_ratio": "FLOPs ratio", "peak_mem_mb": "Peak mem (MiB)",
                 "fd_clip": "FD-CLIP", "fid": "FID", "clip_score": "CLIP score",
                 "nsfw_ratio": "NSFW ratio", "concept_ratio": "Concept ratio", "psnr": "PSNR",
                 "ssim": "SSIM"}
LATEX_SPECIAL = {"\\": r"\textbackslash{}", "_": r"\_", "%": r"\%", "&": r"\&", "#": r"\#",
                 "{": r"\{", "}": r"\}", "$": r"\$", "~": r"\textasciitilde{}",
                 "^": r"\textasciicircum{}"}
GRID_IMAGES, TILE_MIN, TILE_MAX = 8, 64, 256


# --- values ------------------------------------------------------------------------------
def number(value: Any) -> float | None:
    """The float of a CSV cell, None for empty / non-numeric / NaN."""
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(x) else x


def text(row: Row, column: str) -> str:
    value = row.get(column)
    return "" if value is None else str(value)


def with_ci(row: Row, column: str, pm: str = "±") -> str:
    """"value ± half-width" when the row has `<column>_ci_lo/_ci_hi`, else the value as is."""
    value = text(row, column)
    lo, hi = number(row.get(f"{column}_ci_lo")), number(row.get(f"{column}_ci_hi"))
    if not value or lo is None or hi is None:
        return value
    decimals = len(value.split(".")[1]) if "." in value else 0
    return f"{value} {pm} {(hi - lo) / 2:.{decimals}f}"


def higher_is_better(column: str) -> bool | None:
    """A column's direction: the metric class's `higher_is_better`, else a fixed table."""
    name = METRIC_OF.get(column)
    if name:
        try:
            from harness.metric import METRICS

            found = METRICS.get(name).higher_is_better
        except (DiffbenchError, ImportError):
            found = None
        if found is not None:
            return found
    return HIGHER_FALLBACK.get(column)


def best_rows(rows: Sequence[Row], column: str, higher: bool | None) -> set[int]:
    """Indices of the rows holding the column's best value (ties: all); none when the
    direction is unknown, fewer than two rows have a value, or all values are equal."""
    values = {i: number(r.get(column)) for i, r in enumerate(rows)}
    values = {i: v for i, v in values.items() if v is not None}
    if higher is None or len(values) < 2 or len(set(values.values())) == 1:
        return set()
    target = max(values.values()) if higher else min(values.values())
    return {i for i, v in values.items() if v == target}


def present(rows: Sequence[Row], columns: Sequence[str]) -> list[str]:
    """The columns with a value in at least one row."""
    return [c for c in columns if any(text(r, c) for r in rows)]


def varying(rows: Sequence[Row], columns: Sequence[str] = SETTINGS) -> list[str]:
    """The setting columns whose value differs between rows."""
    return [c for c in columns if len({text(r, c) for r in rows}) > 1]


def short_value(value: Any) -> str:
    return json.dumps(value, separators=(",", ":")) if isinstance(value, (dict, list)) \
        else str(value).lower() if isinstance(value, bool) else str(value)


def row_labels(rows: Sequence[Row], defaults: dict[str, dict[str, Any]] | None = None
               ) -> list[str]:
    """Short labels: the method, its params that differ from the method's defaults or between
    rows of that method, and the settings that vary between the rows (in brackets)."""
    defaults = defaults or {}
    parsed = [json.loads(text(r, "params") or "{}") for r in rows]
    changing: dict[str, set[str]] = {}
    for method in {text(r, "method") for r in rows}:
        mine = [p for r, p in zip(rows, parsed) if text(r, "method") == method]
        keys = set().union(*mine)
        changing[method] = {k for k in keys if len({short_value(p.get(k)) for p in mine}) > 1}
    settings = varying(rows)
    labels = []
    for r, p in zip(rows, parsed):
        method, base = text(r, "method"), defaults.get(text(r, "method"), {})
        shown = [f"{k}={short_value(v)}" for k, v in sorted(p.items())
                 if k in changing[method] or k not in base or base[k] != v]
        extra = [f"{c}={text(r, c)}" for c in settings]
        labels.append(" ".join([method, ",".join(shown), f"[{','.join(extra)}]" if extra else ""])
                      .replace("  ", " ").strip())
    return labels


def method_defaults(methods: Sequence[str]) -> dict[str, dict[str, Any]]:
    """The registered default params of each method (unknown methods: none)."""
    from harness.method import METHODS

    out = {}
    for name in methods:
        try:
            out[name] = {f.name: f.default for f in METHODS.get(name).fields()}
        except DiffbenchError:
            continue
    return out


def by_model(rows: Sequence[Row]) -> dict[str, list[Row]]:
    groups: dict[str, list[Row]] = {}
    for r in rows:
        groups.setdefault(text(r, "model"), []).append(r)
    return groups


def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "model"


def pareto_front(points: Sequence[tuple[float, float]], higher_y: bool) -> list[int]:
    """Indices of the points no other point dominates (x: higher is better; y: as given),
    sorted by x."""
    sign = 1.0 if higher_y else -1.0

    def dominates(a: tuple[float, float], b: tuple[float, float]) -> bool:
        return a[0] >= b[0] and sign * a[1] >= sign * b[1] and a != b

    front = [i for i, p in enumerate(points) if not any(dominates(q, p) for q in points)]
    return sorted(front, key=lambda i: (points[i][0], sign * points[i][1]))


# --- Markdown ----------------------------------------------------------------------------
def arrow(column: str) -> str:
    return {True: " ↑", False: " ↓"}.get(higher_is_better(column), "")


def markdown_table(rows: Sequence[Row], metrics: Sequence[str]) -> str:
    """Method, params, steps, varying settings and the metric columns; best in bold."""
    settings = varying(rows)
    bold = {c: best_rows(rows, c, higher_is_better(c)) for c in metrics}
    header = ["method", "params", "steps", *settings, *(c + arrow(c) for c in metrics)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for i, r in enumerate(rows):
        params = text(r, "params").replace("|", "\\|")
        cells = [text(r, "method"), f"`{params}`" if params else "", text(r, "steps"),
                 *(text(r, c) for c in settings)]
        for c in metrics:
            value = with_ci(r, c)
            cells.append(f"**{value}**" if i in bold[c] and value else value)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def failed_list(rows: Sequence[Row]) -> str:
    return "\n".join(f"- {text(r, 'method')} `{text(r, 'params')}`: "
                     f"{text(r, 'error') or text(r, 'status')}".replace("|", "\\|")
                     for r in rows)


def environment_card(rows: Sequence[Row]) -> str:
    """Every environment column with its distinct values across rows."""
    lines = ["| field | value |", "|---|---|"]
    for c in ENVIRONMENT:
        values = list(dict.fromkeys(text(r, c) for r in rows if text(r, c)))
        lines.append(f"| {c} | {', '.join(values) or '-'} |")
    return "\n".join(lines)


def model_section(model: str, rows: Sequence[Row], metrics: Sequence[str],
                  grids: dict[str, str]) -> str:
    ok = [r for r in rows if text(r, "status") == "ok"]
    failed = [r for r in rows if text(r, "status") != "ok"]
    parts = [f"## {model}", markdown_table(ok, present(ok, metrics)) if ok else "No finished cell."]
    if failed:
        parts.append("Failed cells (left out of the other outputs):\n\n" + failed_list(failed))
    shown = present(ok, metrics)
    notes = dict.fromkeys([*(text(r, "note") for r in ok if text(r, "note")),
                           *(f"{c}: {text(r, c + '_warning')}" for r in ok for c in shown
                             if text(r, c + "_warning"))])
    if notes:
        parts.append("Notes: " + "; ".join(notes))
    if model in grids:
        parts.append(f"![images: {model}]({grids[model]})")
    return "\n\n".join(parts)


def markdown_report(title: str, rows: Sequence[Row], metrics: Sequence[str],
                    grids: dict[str, str], pareto: str) -> str:
    """The whole report.md text; `pareto`: the plot's file name or why there is none."""
    failed = sum(text(r, "status") != "ok" for r in rows)
    intro = (f"# diffbench report: {title}\n\n{len(rows)} cells ({failed} failed). "
             "Values are the leaderboard's; `± h` is half the width of the 95% bootstrap "
             "interval; best per column in bold (↑ higher is better, ↓ lower is better). "
             "LaTeX tables: [table.tex](table.tex).")
    sections = [model_section(m, g, metrics, grids) for m, g in by_model(rows).items()]
    plot = f"![speedup vs quality]({pareto})" if pareto.endswith(".png") else pareto
    return "\n\n".join([intro, *sections, "## Speed vs quality", plot,
                        "## Environment", environment_card(rows)]) + "\n"


# --- LaTeX -------------------------------------------------------------------------------
def latex_escape(value: str) -> str:
    return "".join(LATEX_SPECIAL.get(ch, ch) for ch in value)


def latex_header(column: str) -> str:
    mark = {True: r" $\uparrow$", False: r" $\downarrow$"}.get(higher_is_better(column), "")
    return LATEX_HEADERS.get(column, latex_escape(column)) + mark


def latex_table(model: str, rows: Sequence[Row], metrics: Sequence[str],
                labels: Sequence[str]) -> str:
    """One booktabs table: method label, steps, metric columns (mean $\\pm$ CI), best bold."""
    bold = {c: best_rows(rows, c, higher_is_better(c)) for c in metrics}
    header = ["Method", "Steps", *(latex_header(c) for c in metrics)]
    body = []
    for i, (r, label) in enumerate(zip(rows, labels)):
        cells = [latex_escape(label), latex_escape(text(r, "steps"))]
        for c in metrics:
            value = latex_escape(with_ci(r, c, pm="PLUSMINUS")).replace("PLUSMINUS", r"$\pm$")
            cells.append(rf"\textbf{{{value}}}" if i in bold[c] and value else value)
        body.append(" & ".join(cells) + r" \\")
    name = latex_escape(model)
    return "\n".join([
        r"\begin{table}[t]", r"\centering",
        rf"\caption{{{name}: mean $\pm$ half-width of the 95\% bootstrap interval; "
        r"best per column in bold.}",
        rf"\label{{tab:{slug(model)}}}",
        rf"\begin{{tabular}}{{l{'r' * (len(header) - 1)}}}", r"\toprule",
        " & ".join(header) + r" \\", r"\midrule", *body, r"\bottomrule", r"\end{tabular}",
        r"\end{table}"])


def latex_document(rows: Sequence[Row], metrics: Sequence[str],
                   defaults: dict[str, dict[str, Any]] | None = None) -> str:
    """Every model's table (finished cells only); needs \\usepackage{booktabs}."""
    tables = ["% diffbench report: \\usepackage{booktabs} in the preamble"]
    for model, group in by_model(rows).items():
        ok = [r for r in group if text(r, "status") == "ok"]
        if ok:
            tables.append(latex_table(model, ok, present(ok, metrics), row_labels(ok, defaults)))
    return "\n\n".join(tables) + "\n"


# --- figures -----------------------------------------------------------------------------
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


# --- command -----------------------------------------------------------------------------
def load_rows(run_dir: str | Path) -> list[Row]:
    """The run's leaderboard rows (built from the cell files when the CSV is missing)."""
    from harness.run.leaderboard import read_csv, render_csv
    from harness.run.store import CellStore

    run = Path(run_dir)
    if not run.is_dir():
        raise DiffbenchError(f"run folder not found: {run_dir}")
    csv_path = run / "leaderboard.csv"
    if csv_path.is_file():
        rows = read_csv(csv_path)
    elif (run / "cells").is_dir():
        rows = list(csv.DictReader(io.StringIO(render_csv(CellStore(run).records()))))
    else:
        raise DiffbenchError(f"{run_dir} is not a diffbench run folder (no leaderboard.csv "
                             "or cells/ inside)")
    if not rows:
        raise DiffbenchError(f"the leaderboard of {run_dir} is empty: nothing to report")
    return rows


def check_columns(rows: Sequence[Row], columns: Sequence[str]) -> None:
    known = set().union(*[r.keys() for r in rows])
    unknown = [c for c in columns if c not in known]
    if unknown:
        raise DiffbenchError(f"--columns: unknown column {unknown[0]!r}; the leaderboard has "
                             f"{', '.join(c for c in (*SPEED, *QUALITY) if c in known)}, ...")


def grids(run_dir: Path, groups: dict[str, list[Row]], out: Path,
          defaults: dict[str, dict[str, Any]]) -> dict[str, str]:
    """Write grid-<model>.png for every model with finished cells; model -> file name."""
    import numpy as np

    written = {}
    for model, rows in groups.items():
        cached = [run_dir / "images" / f"{text(r, 'config_hash')}.npy" for r in rows]
        images = [np.load(p, mmap_mode="r") if p.is_file() else None for p in cached]
        name = f"grid-{slug(model)}.png"
        image_grid(list(zip(row_labels(rows, defaults), images)), out / name)
        written[model] = name
    return written


def report(run_dir: str | Path, out_dir: str | Path | None = None, quality: str | None = None,
           columns: Sequence[str] | None = None) -> Path:
    """Write report.md, table.tex, pareto.png (when a quality column exists) and the grids."""
    rows = load_rows(run_dir)
    if columns:
        check_columns(rows, columns)
    metrics = list(columns or (*SPEED, *QUALITY))
    out = Path(out_dir) if out_dir else Path(run_dir) / "report"
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DiffbenchError(f"cannot create report folder {out}: {exc.strerror}") from None
    ok = [r for r in rows if text(r, "status") == "ok"]
    groups = by_model(ok)
    defaults = method_defaults(sorted({text(r, "method") for r in rows}))
    column = pareto_column(ok, quality)
    (out / "pareto.png").unlink(missing_ok=True)
    if column:
        pareto_plot(groups, column, out / "pareto.png", defaults)
    pareto = "pareto.png" if column else ("No quality column in this run (toy model or random "
                                          "weights): no speed-quality plot.")
    written = grids(Path(run_dir), groups, out, defaults)
    (out / "table.tex").write_text(latex_document(rows, metrics, defaults))
    path = out / "report.md"
    path.write_text(markdown_report(Path(run_dir).resolve().name, rows, metrics, written, pareto))
    return path


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("report", help="Markdown / LaTeX tables, Pareto plot and image "
                                             "grids of a run")
    p.add_argument("run_dir", help="output folder of a run")
    p.add_argument("--out", help="report folder (default: RUN_DIR/report)")
    p.add_argument("--quality", metavar="COLUMN",
                   help=f"y axis of the Pareto plot (default: first of {', '.join(PARETO_QUALITY)}"
                        " with values)")
    p.add_argument("--columns", nargs="+", metavar="COLUMN",
                   help=f"metric columns of the tables (default: {' '.join((*SPEED, *QUALITY))})")
    return p


def run(args: argparse.Namespace) -> int:
    path = report(args.run_dir, args.out, args.quality, args.columns)
    print(f"report: {path}")
    return 0
