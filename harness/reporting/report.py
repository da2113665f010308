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
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from harness.errors import DiffbenchError
from harness.reporting.figures import grids, pareto_column, pareto_plot
from harness.reporting.tables import (
    PARETO_QUALITY,
    QUALITY,
    SPEED,
    Row,
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
    if not os.access(out, os.W_OK):
        raise DiffbenchError(f"report folder {out} is not writable (--out elsewhere?)")
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


