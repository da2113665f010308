"""`diffbench report RUN_DIR`: a page to read, paper-ready tables, Pareto plots and image
grids of a run.

Writes into REPORT_DIR (default RUN_DIR/report): `report.html` (one self-contained page: the
sortable tables, plots and grids inline, how to read the columns, the environment card),
`report.md` (the same as Markdown), `table.tex` (booktabs tables, mean $\\pm$ half-width of the
95% interval, best entry per column in bold), `pareto-<model>-<column>.png` (speedup against
each main quality column, numbered points, a legend table, the Pareto front) and
`grid-<model>.png` (the first cached images of every row, baseline first; `--diff` adds
`diff-<model>.png`). Rows are numbered the same in every output.
"""

from __future__ import annotations

import argparse
import csv
import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from harness.errors import DiffbenchError
from harness.reporting import html
from harness.reporting.grids import grids
from harness.reporting.pareto import pareto_columns, pareto_plots
from harness.reporting.tables import (
    PARETO_QUALITY,
    QUALITY,
    SPEED,
    Row,
    baseline_first,
    by_model,
    latex_document,
    markdown_report,
    method_defaults,
    text,
)


def load_rows(run_dir: str | Path) -> list[Row]:
    """The run's leaderboard rows (built from the cell files when the CSV is missing)."""
    from harness.run.leaderboard import read_leaderboard, render_csv
    from harness.run.store import CellStore

    run = Path(run_dir)
    if not run.is_dir():
        raise DiffbenchError(f"run folder not found: {run_dir}")
    csv_path = run / "leaderboard.csv"
    if csv_path.is_file():
        rows = read_leaderboard(csv_path)
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


def report(run_dir: str | Path, out_dir: str | Path | None = None, quality: str | None = None,
           columns: Sequence[str] | None = None, diff: bool = False) -> Path:
    """Write report.html, report.md, table.tex, the Pareto plots (when a quality column exists)
    and the grids; returns report.md's path."""
    rows = load_rows(run_dir)
    if columns:
        check_columns(rows, columns)
    metrics = list(columns or (*SPEED, *QUALITY, "train_s"))
    out = Path(out_dir) if out_dir else Path(run_dir) / "report"
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DiffbenchError(f"cannot create report folder {out}: {exc.strerror}") from None
    if not os.access(out, os.W_OK):
        raise DiffbenchError(f"report folder {out} is not writable (--out elsewhere?)")
    groups = {m: baseline_first(g) for m, g in
              by_model([r for r in rows if text(r, "status") == "ok"]).items()}
    ordered = [r for g in groups.values() for r in g] + \
        [r for r in rows if text(r, "status") != "ok"]
    defaults = method_defaults(sorted({text(r, "method") for r in rows}))
    for old in [*out.glob("pareto*.png"), *out.glob("grid-*.png"), *out.glob("diff-*.png")]:
        old.unlink()  # a re-made report keeps no figure of an earlier run
    plots = pareto_plots(groups, pareto_columns(ordered, quality), out, defaults)
    images = grids(Path(run_dir), groups, out, defaults, diff)
    title = Path(run_dir).resolve().name
    figures = {m: [*plots.get(m, []), *images.get(m, [])] for m in groups}
    missing = "" if plots else ("No quality column in this run (toy model or random weights): "
                                "no speed-quality plot.")
    (out / "table.tex").write_text(latex_document(ordered, metrics, defaults))
    (out / "report.html").write_text(html.page(
        title, ordered, list(columns or (*html.SPEED, *QUALITY, "train_s")), defaults, groups,
        {m: [(n, (out / n).read_bytes()) for n in names] for m, names in plots.items()},
        {m: [(n, (out / n).read_bytes()) for n in names] for m, names in images.items()}))
    path = out / "report.md"
    path.write_text(markdown_report(title, ordered, metrics, figures, missing))
    return path


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("report", help="an HTML page, Markdown / LaTeX tables, Pareto "
                                             "plots and image grids of a run")
    p.add_argument("run_dir", help="output folder of a run")
    p.add_argument("--out", help="report folder (default: RUN_DIR/report)")
    p.add_argument("--quality", metavar="COLUMN",
                   help="y axis of the Pareto plot (default: one plot for each of "
                        f"{', '.join(PARETO_QUALITY)} with values)")
    p.add_argument("--columns", nargs="+", metavar="COLUMN",
                   help="metric columns of the tables (default: "
                        f"{' '.join((*SPEED, *QUALITY, 'train_s'))}, those with values)")
    p.add_argument("--diff", action="store_true",
                   help="also diff-<model>.png: |method - baseline| per pixel (x4)")
    return p


