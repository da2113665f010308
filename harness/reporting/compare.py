"""Regression gate: compare a new leaderboard with a reference, column by column, within bands."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from harness.errors import DiffbenchError
from harness.run.leaderboard import read_csv


@dataclass(frozen=True)
class Tolerance:
    """Allowed change of a column: `direction` says which way is a regression.

    "lower": lower is better, regression when new > ref * (1 + rel) + abs;
    "higher": higher is better, regression when new < ref * (1 - rel) - abs;
    "both": any drift beyond abs + rel * |ref| is a regression (MLPerf-style accuracy band).
    """

    direction: str
    rel: float = 0.0
    abs: float = 0.0

    def regressed(self, new: float, ref: float) -> bool:
        band = self.abs + self.rel * abs(ref)
        if self.direction == "lower":
            return new > ref + band
        if self.direction == "higher":
            return new < ref - band
        return abs(new - ref) > band


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
class Difference:
    config_hash: str
    label: str
    column: str
    ref: str
    new: str
    change: str
    regression: bool


def parse_tolerances(items: Mapping[str, str]) -> dict[str, Tolerance]:
    """CLI `--tol column=REL` or `column=DIRECTION:REL[:ABS]` on top of the defaults."""
    out = dict(DEFAULT_TOLERANCES)
    for column, text in items.items():
        parts = text.split(":")
        base = out.get(column, Tolerance("both"))
        try:
            if parts[0] in ("lower", "higher", "both"):
                rel = float(parts[1]) if len(parts) > 1 else base.rel
                abs_ = float(parts[2]) if len(parts) > 2 else base.abs
                out[column] = Tolerance(parts[0], rel, abs_)
            else:
                out[column] = dataclasses.replace(base, rel=float(parts[0]))
        except (ValueError, IndexError):
            raise DiffbenchError(f"tolerance '{column}={text}' must be REL or "
                                 "lower|higher|both:REL[:ABS]") from None
    return out


def _number(text: str) -> float | None:
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def compare(new_path: str | Path, ref_path: str | Path,
            tolerances: Mapping[str, Tolerance] = DEFAULT_TOLERANCES) -> list[Difference]:
    """Every checked column of every reference row; missing or failed rows are regressions."""
    new = {r["config_hash"]: r for r in read_csv(new_path)}
    diffs = []
    for ref_row in read_csv(ref_path):
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
            diffs.append(Difference(key, label, column, ref_row[column], row[column], change,
                                    tol.regressed(new_v, ref_v)))
    return diffs


def render(diffs: list[Difference], only_changes: bool = False) -> str:
    """A plain-text table of the compared values; regressions marked."""
    shown = [d for d in diffs if d.regression or not only_changes]
    if not shown:
        return "no differences"
    head = ("", "cell", "column", "reference", "new", "change")
    rows = [("REGRESSION" if d.regression else "ok", f"{d.config_hash} {d.label}"[:60], d.column,
             d.ref, d.new, d.change) for d in shown]
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    lines = ["  ".join(str(v).ljust(w) for v, w in zip(r, widths)).rstrip() for r in [head, *rows]]
    return "\n".join(lines)
