"""Leaderboard rows as text: values with intervals, best entries, labels, Markdown and LaTeX
tables (pure: rows in, text out)."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
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
             "Values are the leaderboard's; `± h` is half the width of the 95% interval "
             "(bootstrap over images for quality, order statistics over paired rounds for "
             "speed); best per column in bold (↑ higher is better, ↓ lower is better). "
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
        rf"\caption{{{name}: value $\pm$ half-width of the 95\% interval (bootstrap for "
        r"quality, paired rounds for speed); "
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
