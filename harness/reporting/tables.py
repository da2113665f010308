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
from harness.stack import SEP

Row = dict[str, Any]
SPEED = ("latency_s", "images_per_s", "speedup", "flops_ratio", "peak_mem_mb")
QUALITY = ("fd_clip", "fid", "kd_clip", "kid", "cmmd_clip", "cmmd", "clip_score", "adherence",
           "pickscore", "nsfw_ratio", "concept_ratio", "attack_success", "psnr", "ssim")
PARETO_QUALITY = ("fd_clip", "fid", "clip_score", "psnr")
VALUE_CHARS = 24  # a param value in a label is cut after this many characters
# interval columns named after the metric, not the column: latency_s -> latency_ci_lo/_hi
CI_PREFIX = {"latency_s": "latency"}
SETTINGS = ("weights", "prompts", "resolution", "dtype", "device", "seed", "n_images",
            "guidance", "batch_size", "attack")  # shown only when they vary within a model's rows
# column -> registered metric whose class attribute `higher_is_better` gives its direction
METRIC_OF = {"latency_s": "latency", "peak_mem_mb": "memory", "fid": "fid", "fd_clip": "fd_clip",
             "kid": "kid", "kd_clip": "kd_clip", "cmmd": "cmmd", "cmmd_clip": "cmmd_clip",
             "clip_score": "clip_score", "adherence": "adherence", "pickscore": "pickscore",
             "nsfw_ratio": "nsfw", "concept_ratio": "concept", "psnr": "fidelity",
             "ssim": "fidelity"}
HIGHER_FALLBACK = {"speedup": True, "images_per_s": True, "clip_score": True, "psnr": True,
                   "ssim": True, "latency_s": False, "fd_clip": False, "fid": False,
                   "flops_ratio": False, "peak_mem_mb": False, "nsfw_ratio": False,
                   "concept_ratio": False, "mfu": True, "tflops_achieved": True,
                   "kid": False, "kd_clip": False, "cmmd": False, "cmmd_clip": False,
                   "adherence": True, "pickscore": True, "attack_success": False,
                   "train_s": False}
LATEX_HEADERS = {"latency_s": "Latency (s)", "images_per_s": "Images/s", "speedup": "Speedup",
                 "flops_ratio": "FLOPs ratio", "peak_mem_mb": "Peak mem (MiB)",
                 "fd_clip": "FD-CLIP", "fid": "FID", "clip_score": "CLIP score",
                 "nsfw_ratio": "NSFW ratio", "concept_ratio": "Concept ratio", "psnr": "PSNR",
                 "ssim": "SSIM", "kd_clip": "KD-CLIP", "kid": "KID", "cmmd_clip": "CMMD-CLIP",
                 "cmmd": "CMMD", "adherence": "Adherence", "pickscore": "PickScore",
                 "attack_success": "Attack success", "train_s": "Train (s)"}
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
    lo, hi = interval(row, column)
    if not value or lo is None or hi is None:
        return value
    decimals = len(value.split(".")[1]) if "." in value else 0
    return f"{value} {pm} {(hi - lo) / 2:.{decimals}f}"


def interval(row: Row, column: str) -> tuple[float | None, float | None]:
    """The row's 95% interval of a column, (None, None) when it has none."""
    prefix = CI_PREFIX.get(column, column)
    return number(row.get(f"{prefix}_ci_lo")), number(row.get(f"{prefix}_ci_hi"))


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


def flat_params(params: dict[str, Any], stacked: bool) -> dict[str, Any]:
    """A stack's params {member: {key: value}} as {"member.key": value}; others as they are."""
    if not stacked:
        return dict(params)
    return {f"{m}.{k}": v for m, sub in params.items()
            for k, v in (sub.items() if isinstance(sub, dict) else [("", sub)])}


def short_params(method: str, params: dict[str, Any], defaults: dict[str, Any] | None) -> str:
    """`key=value,...` of the params that differ from the method's defaults (all of them when
    the defaults are unknown); a stack's as `member.key=value`; a value longer than
    VALUE_CHARS cut with an ellipsis (the params column has them whole)."""
    stacked = SEP in method
    flat, base = flat_params(params, stacked), flat_params(defaults or {}, stacked)

    def cut(value: Any) -> str:
        shown = short_value(value)
        return shown if len(shown) <= VALUE_CHARS else shown[:VALUE_CHARS - 1] + "…"

    return ",".join(f"{k}={cut(v)}" for k, v in sorted(flat.items())
                    if defaults is None or k not in base or base[k] != v)


def row_labels(rows: Sequence[Row], defaults: dict[str, dict[str, Any]] | None = None
               ) -> list[str]:
    """Short labels: the method, its params that differ from its defaults, and the settings
    that vary between the rows (in brackets)."""
    defaults = defaults or {}
    parsed = [json.loads(text(r, "params") or "{}") for r in rows]
    shown = [short_params(text(r, "method"), p, defaults.get(text(r, "method")))
             for r, p in zip(rows, parsed)]
    settings = varying(rows)
    labels = []
    for r, params in zip(rows, shown):
        extra = [f"{c}={text(r, c)}" for c in settings]
        labels.append(" ".join([text(r, "method"), params,
                                f"[{','.join(extra)}]" if extra else ""])
                      .replace("  ", " ").strip())
    return labels


def method_defaults(methods: Sequence[str]) -> dict[str, dict[str, Any]]:
    """The registered default params of each method; a stack's per member (unknown methods:
    none)."""
    from harness.method import METHODS

    def of(name: str) -> dict[str, Any]:
        return {f.name: f.default for f in METHODS.get(name).fields()}

    out: dict[str, dict[str, Any]] = {}
    for name in methods:
        try:
            out[name] = ({m: of(m) for m in name.split(SEP)} if SEP in name else of(name))
        except DiffbenchError:
            continue
    return out


def baseline_first(rows: Sequence[Row]) -> list[Row]:
    """The rows with the baseline ones first, the others in their order."""
    return sorted(rows, key=lambda r: text(r, "method") != "baseline")


def by_model(rows: Sequence[Row]) -> dict[str, list[Row]]:
    groups: dict[str, list[Row]] = {}
    for r in rows:
        groups.setdefault(text(r, "model"), []).append(r)
    return groups


def wrap(label: str, width: int) -> list[str]:
    """A label cut into lines of at most `width` characters at spaces and commas (a longer
    word stays whole)."""
    lines, line = [], ""
    for word in re.split(r"(?<=[ ,])", label):
        if line and len(line) + len(word) > width:
            lines.append(line.rstrip())
            line = ""
        line += word
    return [*lines, line.rstrip()]


def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "model"


# --- Markdown ----------------------------------------------------------------------------
def arrow(column: str) -> str:
    return {True: " ↑", False: " ↓"}.get(higher_is_better(column), "")


def markdown_table(rows: Sequence[Row], metrics: Sequence[str]) -> str:
    """#, method, params, steps, varying settings and the metric columns; best in bold."""
    settings = varying(rows)
    bold = {c: best_rows(rows, c, higher_is_better(c)) for c in metrics}
    header = ["#", "method", "params", "steps", *settings, *(c + arrow(c) for c in metrics)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for i, r in enumerate(rows):
        params = text(r, "params").replace("|", "\\|")
        cells = [str(i + 1), text(r, "method"), f"`{params}`" if params else "", text(r, "steps"),
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
                  figures: Sequence[str]) -> str:
    """A model's heading, table (finished rows), failed cells, notes and figure links."""
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
    parts += [f"![{name.rsplit('.', 1)[0]}]({name})" for name in figures]
    return "\n\n".join(parts)


def markdown_report(title: str, rows: Sequence[Row], metrics: Sequence[str],
                    figures: dict[str, list[str]], missing_plot: str = "") -> str:
    """The whole report.md text; `rows` in display order, `figures`: model -> its plot and grid
    files; `missing_plot`: why there is no speed-quality plot, when there is none."""
    failed = sum(text(r, "status") != "ok" for r in rows)
    intro = (f"# diffbench report: {title}\n\n{len(rows)} cells ({failed} failed). "
             "Values are the leaderboard's; `± h` is half the width of the 95% interval "
             "(bootstrap over images for quality, order statistics over paired rounds for "
             "speed); best per column in bold (↑ higher is better, ↓ lower is better); `#` "
             "numbers the points of the plots and the rows of the grids. "
             "The same on one page: [report.html](report.html); LaTeX tables: "
             "[table.tex](table.tex).")
    sections = [model_section(m, g, metrics, figures.get(m, [])) for m, g in by_model(rows).items()]
    return "\n\n".join([intro, *sections, *([missing_plot] if missing_plot else []),
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
