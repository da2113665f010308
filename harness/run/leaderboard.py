"""CSV leaderboards built from cell records: fixed columns, fixed float formats, stable order."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from harness.files import atomic_write

ATTACK_IDENTITY = ("attack", "attack_params")
IDENTITY = ("model", "weights", "method", "params", "config_hash", "prompts", "n_images", "steps",
            "guidance", "resolution", "seed", "dtype", "batch_size", "device", "compile")
ENVIRONMENT = ("device_name", "device_count", "cuda", "driver", "torch", "diffusers",
               "transformers", "python", "diffbench", "git_sha")
# Known metric columns in display order, with their fixed formats.
FORMATS: dict[str, str] = {
    "speedup": "{:.4f}", "speedup_ci_lo": "{:.4f}", "speedup_ci_hi": "{:.4f}",
    "latency_s": "{:.6f}", "latency_ci_lo": "{:.6f}", "latency_ci_hi": "{:.6f}",
    "images_per_s": "{:.4f}", "cpu_s_per_image": "{:.6f}", "rounds": "{:d}",
    "rounds_rejected": "{:d}", "timing_stop": "{}", "warmup_calls": "{:d}", "timing_s": "{:.1f}",
    "threads": "{:d}", "compile_s": "{:.2f}", "graphs": "{:d}", "recompiles": "{:d}",
    "graph_breaks": "{:d}", "step_ms": "{:.4f}",
    "t_text_encoder_s": "{:.6f}", "t_denoise_s": "{:.6f}", "t_decode_s": "{:.6f}",
    "peak_mem_mb": "{:.1f}", "flops_per_image": "{:.0f}", "flops_ratio": "{:.4f}",
    "tflops_achieved": "{:.6f}", "mfu": "{:.6f}",
    "fid": "{:.4f}", "fid_ci_lo": "{:.4f}", "fid_ci_hi": "{:.4f}",
    "fd_clip": "{:.6f}", "fd_clip_ci_lo": "{:.6f}", "fd_clip_ci_hi": "{:.6f}",
    **{f"{c}{part}": "{:.6g}" for c in ("kid", "kd_clip", "cmmd_clip")
       for part in ("", "_std", "_ci_lo", "_ci_hi") if (c, part) != ("cmmd_clip", "_std")},
    "clip_score": "{:.4f}", "clip_score_ci_lo": "{:.4f}", "clip_score_ci_hi": "{:.4f}",
    "nsfw_ratio": "{:.4f}", "nsfw_ratio_ci_lo": "{:.4f}", "nsfw_ratio_ci_hi": "{:.4f}",
    **{f"adherence{a}{part}": "{:.4f}" for a in ("", "_colour", "_shape", "_size", "_heldout")
       for part in ("", "_ci_lo", "_ci_hi")},
    "concept_ratio": "{:.4f}", "concept_ratio_ci_lo": "{:.4f}", "concept_ratio_ci_hi": "{:.4f}",
    "attack_success": "{:.4f}", "attack_success_ci_lo": "{:.4f}", "attack_success_ci_hi": "{:.4f}",
    "attack_s": "{:.1f}", "attack_objective": "{:.4g}",
    "psnr": "{:.4f}", "psnr_ci_lo": "{:.4f}", "psnr_ci_hi": "{:.4f}", "psnr_identical": "{:d}",
    "ssim": "{:.6f}", "ssim_ci_lo": "{:.6f}", "ssim_ci_hi": "{:.6f}", "nsfw_threshold": "{:.2f}",
    "train_s": "{:.1f}",
}
TRAILER = ("images_sha", "status", "error", "note")
# Columns that vary from run to run on the same machine (everything else must be identical).
MEASURED = ("speedup", "speedup_ci_lo", "speedup_ci_hi", "latency_s", "latency_ci_lo",
            "latency_ci_hi", "images_per_s", "cpu_s_per_image", "rounds", "rounds_rejected",
            "timing_stop", "warmup_calls", "timing_s", "compile_s", "graphs", "recompiles",
            "graph_breaks", "step_ms", "t_text_encoder_s", "t_denoise_s", "t_decode_s",
            "peak_mem_mb", "tflops_achieved", "mfu", "train_s")


def fmt(column: str, value: Any) -> str:
    """Fixed text form of a value: empty for missing, the column's format for numbers."""
    if value is None or value == "":
        return ""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int) and column not in FORMATS:
        return str(value)  # counts (bytes, layers) in full, never as 1.51349e+06
    if isinstance(value, (int, float)):
        spec = FORMATS.get(column, "{:.6g}")
        if spec == "{:d}":
            return str(int(value))
        return spec.format(value)
    return str(value)


def _ratios(record: dict[str, Any], by_key: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """FLOPs ratio against the matching baseline cell (speedup is measured paired, in the cell
    itself: metrics/latency.py)."""
    base = by_key.get(record.get("baseline_key", ""))
    if not base or base.get("status") != "ok" or record.get("status") != "ok":
        return {}
    mine, ref = record["metrics"], base["metrics"]
    out = {}
    if mine.get("flops_per_image") and ref.get("flops_per_image"):
        out["flops_ratio"] = mine["flops_per_image"] / ref["flops_per_image"]
    return out


def row(record: dict[str, Any], by_key: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """One leaderboard row (raw values) of a cell record."""
    cell = dict(record["cell"])
    cell["config_hash"] = record["key"]
    if record.get("effective_steps"):
        cell["steps"] = record["effective_steps"]
    values = {**cell, **record.get("environment", {}), **record.get("metrics", {})}
    values.update(_ratios(record, by_key))
    values.update({k: record.get(k, "") for k in TRAILER})
    return values


def columns_of(rows: Iterable[dict[str, Any]]) -> list[str]:
    """Identity, environment, known metrics in order, other metrics sorted, then the trailer."""
    present = set().union(*[r.keys() for r in rows]) if rows else set()
    attack = [c for c in ATTACK_IDENTITY if c in present]  # only in runs with attacked cells
    fixed = set(IDENTITY) | set(ATTACK_IDENTITY) | set(ENVIRONMENT) | set(TRAILER)
    known = [c for c in FORMATS if c in present]
    extra = sorted(present - fixed - set(known))
    return [*IDENTITY, *attack, *ENVIRONMENT, *known, *extra, *TRAILER]


def sort_key(r: dict[str, Any]) -> tuple:
    """Stable order: settings first, the baseline before other methods, then method and params."""
    return (r["model"], r["weights"], r["prompts"], r["resolution"], r["dtype"], r["device"],
            r["seed"], r["n_images"], r["guidance"], r["method"] != "baseline", r["method"],
            r["params"], r.get("attack", "none") != "none", r.get("attack", ""),
            r.get("attack_params", ""), r["config_hash"])


def build_rows(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    by_key = {r["key"]: r for r in records}
    return sorted((row(r, by_key) for r in records), key=sort_key)


def render_csv(records: list[dict[str, Any]]) -> str:
    """The leaderboard CSV text for these cell records."""
    rows = build_rows(records)
    cols = columns_of(rows)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(cols)
    for r in rows:
        writer.writerow([fmt(c, r.get(c)) for c in cols])
    return buf.getvalue()


def write_leaderboard(records: list[dict[str, Any]], path: str | Path) -> Path:
    """Write the CSV atomically."""
    return atomic_write(path, render_csv(records))


def read_csv(path: str | Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


REQUIRED = ("model", "method", "params", "config_hash", "status")  # what readers key rows by


def read_leaderboard(path: str | Path) -> list[dict[str, str]]:
    """A diffbench leaderboard's rows; a file that is not one (missing, not UTF-8 CSV, without
    the identity columns, a row of the wrong length) is a one-line error naming it."""
    from harness.errors import DiffbenchError

    try:
        text = Path(path).read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise DiffbenchError(f"leaderboard not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        why = getattr(exc, "strerror", None) or "not UTF-8 text"
        raise DiffbenchError(f"cannot read leaderboard {path}: {why}") from None
    try:
        reader = csv.DictReader(io.StringIO(text, newline=""), strict=True)
        rows = list(reader)
    except csv.Error as exc:
        raise DiffbenchError(f"{path} is not a CSV file ({exc})") from None
    missing = [c for c in REQUIRED if c not in (reader.fieldnames or ())]
    if missing:
        raise DiffbenchError(f"{path} is not a diffbench leaderboard: no "
                             f"{', '.join(missing)} column")
    short = next((i for i, r in enumerate(rows) if None in r.values() or None in r), None)
    if short is not None:
        raise DiffbenchError(f"{path}:{short + 2}: row has another number of fields than the "
                             "header")
    return rows
