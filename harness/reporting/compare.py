"""Regression gate: compare a new leaderboard with a reference, column by column, within bands.

A column with a measured interval in the new row (`INTERVALS`) regresses only when the whole
interval lies beyond the band edge, so run-to-run noise does not fail the gate while a real
loss with a tight interval still does; without the interval columns the point value is judged.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from harness.errors import DiffbenchError
from harness.run.leaderboard import fmt, read_leaderboard

DIRECTIONS = ("lower", "higher", "both")


def _problem(direction: str, rel: float, abs_: float) -> str | None:
    """What is wrong with a tolerance, or None."""
    if direction not in DIRECTIONS:
        return f"direction '{direction}' must be one of {', '.join(DIRECTIONS)}"
    for name, value in (("REL", rel), ("ABS", abs_)):
        if not math.isfinite(value) or value < 0:
            return f"{name} must be a finite number >= 0, not {value}"
    return None


@dataclass(frozen=True)
class Tolerance:
    """Allowed change of a column: `direction` says which way is a regression.

    "lower": lower is better, regression when new > ref * (1 + rel) + abs;
    "higher": higher is better, regression when new < ref * (1 - rel) - abs;
    "both": any drift beyond abs + rel * |ref| is a regression (MLPerf-style accuracy band).
    With an interval [lo, hi] of the new value, the whole interval must be beyond the edge:
    "lower": lo > edge; "higher": hi < edge; "both": lo above or hi below the band.
    """

    direction: str
    rel: float = 0.0
    abs: float = 0.0

    def __post_init__(self) -> None:
        problem = _problem(self.direction, self.rel, self.abs)
        if problem:
            raise DiffbenchError(f"tolerance: {problem}")

    def regressed(self, new: float, ref: float,
                  interval: tuple[float, float] | None = None) -> bool:
        band = self.abs + self.rel * abs(ref)
        lo, hi = interval if interval is not None else (new, new)
        if self.direction == "lower":
            return lo > ref + band
        if self.direction == "higher":
            return hi < ref - band
        return lo > ref + band or hi < ref - band


DEFAULT_TOLERANCES: dict[str, Tolerance] = {
    "latency_s": Tolerance("lower", rel=0.10),
    "images_per_s": Tolerance("higher", rel=0.10),
    "speedup": Tolerance("higher", rel=0.10),
    "peak_mem_mb": Tolerance("lower", rel=0.10, abs=16.0),
    "flops_per_image": Tolerance("both", rel=1e-6),
    "flops_ratio": Tolerance("both", rel=1e-6),
    # quality: MLPerf-style accuracy bands around the reference (same weights, other hardware)
    "fid": Tolerance("both", rel=0.02),
    "fd_clip": Tolerance("both", rel=0.05, abs=0.005),
    "clip_score": Tolerance("both", abs=0.2),
    "psnr": Tolerance("higher", abs=0.5),
    "ssim": Tolerance("higher", abs=0.005),
    "nsfw_ratio": Tolerance("lower", abs=0.02),
    "concept_ratio": Tolerance("lower", abs=0.02),
}


@dataclass(frozen=True)
class Interval:
    """Where a column's measured interval lies in a row: its `lo` and `hi` columns, or, with
    `reciprocal`, the interval of 1 / x from x's bounds (lo = 1 / row[lo], hi = 1 / row[hi])."""

    lo: str
    hi: str
    reciprocal: bool = False


# Columns judged by their measured interval (run-to-run timing noise). Quality columns' `_ci_`
# bounds are deliberately absent: they measure the spread over the prompt set, which the same
# seeds reproduce, not run-to-run noise. images_per_s is 1 / latency_s (metrics/latency.py).
INTERVALS: dict[str, Interval] = {
    "speedup": Interval("speedup_ci_lo", "speedup_ci_hi"),
    "latency_s": Interval("latency_ci_lo", "latency_ci_hi"),
    "images_per_s": Interval("latency_ci_hi", "latency_ci_lo", reciprocal=True),
}


@dataclass(frozen=True)
class Difference:
    config_hash: str
    label: str
    column: str
    ref: str
    new: str
    change: str
    regression: bool


def _unknown_column(column: str) -> str:
    names = sorted(DEFAULT_TOLERANCES)
    close = difflib.get_close_matches(column, names, n=1, cutoff=0.5)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return f"--tol: unknown tolerance column '{column}'{hint} (columns: {', '.join(names)})"


def parse_tolerances(items: Mapping[str, str]) -> dict[str, Tolerance]:
    """CLI `--tol column=REL` or `column=DIRECTION:REL[:ABS]` on top of the defaults.

    Unknown columns (with a did-you-mean), unparsable specs and NaN, infinite or negative
    REL / ABS are one-line DiffbenchErrors.
    """
    out = dict(DEFAULT_TOLERANCES)
    for column, text in items.items():
        if column not in DEFAULT_TOLERANCES:
            raise DiffbenchError(_unknown_column(column))
        base, parts = out[column], text.split(":")
        try:
            if parts[0] in DIRECTIONS and len(parts) <= 3:
                direction = parts[0]
                rel = float(parts[1]) if len(parts) > 1 else base.rel
                abs_ = float(parts[2]) if len(parts) > 2 else base.abs
            elif len(parts) == 1:
                direction, rel, abs_ = base.direction, float(parts[0]), base.abs
            else:
                raise ValueError(text)
        except ValueError:
            raise DiffbenchError(f"tolerance '{column}={text}' must be REL or "
                                 "lower|higher|both:REL[:ABS]") from None
        problem = _problem(direction, rel, abs_)
        if problem:
            raise DiffbenchError(f"tolerance '{column}={text}': {problem}")
        out[column] = Tolerance(direction, rel, abs_)
    return out


def _number(text: str | None) -> float | None:
    try:
        value = float(text)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _interval(row: Mapping[str, str], column: str) -> tuple[float, float] | None:
    """The row's measured interval of `column`, or None (no, partial or inverted bounds)."""
    spec = INTERVALS.get(column)
    if spec is None:
        return None
    lo, hi = _number(row.get(spec.lo)), _number(row.get(spec.hi))
    if spec.reciprocal and lo is not None and hi is not None:
        lo, hi = (1.0 / lo, 1.0 / hi) if lo > 0 and hi > 0 else (None, None)
    if lo is None or hi is None or lo > hi:
        return None
    return lo, hi


def _shown(row: Mapping[str, str], column: str) -> str:
    """The value as the CSV writes it, with its interval when the row has one."""
    interval, spec = _interval(row, column), INTERVALS.get(column)
    if interval is None or spec is None:
        return row[column]
    if spec.reciprocal:
        return f"{row[column]} [{fmt(column, interval[0])}, {fmt(column, interval[1])}]"
    return f"{row[column]} [{row[spec.lo]}, {row[spec.hi]}]"


def compare(new_path: str | Path, ref_path: str | Path,
            tolerances: Mapping[str, Tolerance] = DEFAULT_TOLERANCES) -> list[Difference]:
    """Every checked column of every reference row; missing or failed rows are regressions.

    Raises DiffbenchError when nothing at all could be compared (an empty reference, or no
    tolerance column that is a number in both leaderboards), so the gate never passes vacuously.
    """
    new = {r["config_hash"]: r for r in read_leaderboard(new_path)}
    ref_rows = read_leaderboard(ref_path)
    if not ref_rows:
        raise DiffbenchError(f"nothing was compared: reference {ref_path} has no rows")
    if not any(r["config_hash"] in new for r in ref_rows):
        raise DiffbenchError(f"no row of reference {ref_path} is in {new_path} (no config_hash "
                             "in common: another grid or other settings?)")
    diffs = []
    for ref_row in ref_rows:
        key = ref_row["config_hash"]
        label = f"{ref_row['model']} {ref_row['method']} {ref_row['params']}"
        row = new.get(key)
        if row is None:
            diffs.append(Difference(key, label, "row", "present", "missing", "", True))
            continue
        if ref_row.get("status") == "ok" and row.get("status") != "ok":
            diffs.append(Difference(key, label, "status", "ok", row.get("status", ""),
                                    row.get("error", ""), True))
            continue
        for column, tol in tolerances.items():
            ref_v, new_v = _number(ref_row.get(column, "")), _number(row.get(column, ""))
            if ref_v is None or new_v is None:
                continue
            change = f"{(new_v / ref_v - 1) * 100:+.1f}%" if ref_v else f"{new_v - ref_v:+g}"
            diffs.append(Difference(key, label, column, _shown(ref_row, column),
                                    _shown(row, column), change,
                                    tol.regressed(new_v, ref_v, _interval(row, column))))
    if not diffs:
        raise DiffbenchError(f"nothing was compared: reference {ref_path} has {len(ref_rows)} "
                             f"row(s) and no value of {', '.join(tolerances)} that is a number "
                             "in both leaderboards")
    return diffs


def render(diffs: list[Difference], only_changes: bool = False) -> str:
    """A plain-text table of the compared values (with intervals where measured); regressions
    marked."""
    shown = [d for d in diffs if d.regression or not only_changes]
    if not shown:
        return "no differences"
    head = ("", "cell", "column", "reference", "new", "change")
    rows = [("REGRESSION" if d.regression else "ok", f"{d.config_hash} {d.label}"[:60], d.column,
             d.ref, d.new, d.change) for d in shown]
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    lines = ["  ".join(str(v).ljust(w) for v, w in zip(r, widths)).rstrip() for r in [head, *rows]]
    return "\n".join(lines)
