"""Shared pieces of the quality metrics: bootstrap confidence intervals, small-n warnings,
per-cell options, and the rule that skips quality on random-weight and toy models.

Bootstrap: percentile method, `n_boot` resamples of the items with replacement, drawn by
numpy's PCG64 generator from `seed`, so the interval is a pure function of (values, seed).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

N_BOOT = 1000
SEED = 0
ALPHA = 0.05


def resample_indices(n: int, n_boot: int = N_BOOT, seed: int = SEED) -> np.ndarray:
    """`n_boot x n` item indices drawn with replacement; the same for the same (n, seed)."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, n, size=(n_boot, n))


def bootstrap_draws(values: Any, statistic: Callable[[Any], float] | None = None,
                    n_boot: int = N_BOOT, seed: int = SEED) -> np.ndarray:
    """The statistic on `n_boot` resamples of the items (first axis), float64."""
    items = np.asarray(values)
    stat = statistic or (lambda x: float(np.mean(x)))
    return np.array([stat(items[idx]) for idx in resample_indices(len(items), n_boot, seed)],
                    dtype=np.float64)


def bootstrap_ci(values: Any, statistic: Callable[[Any], float] | None = None,
                 n_boot: int = N_BOOT, seed: int = SEED, alpha: float = ALPHA,
                 bias_correct: bool = False) -> tuple[float | None, float | None]:
    """Percentile bootstrap (1 - alpha) interval of `statistic` over items (first axis).

    `values`: per-item values (statistic defaults to the mean) or any array of items, e.g.
    feature rows, with a `statistic(items)` that maps a resample to a number.
    `bias_correct`: shift the interval by the bootstrap bias (mean of draws - point value), for
    statistics such as the Frechet distance that resampling with replacement biases upward
    (duplicated images shrink the feature covariance's rank).
    No items: (None, None); one item: the point value twice.
    """
    items = np.asarray(values)
    n = len(items)
    if n == 0:
        return None, None
    stat = statistic or (lambda x: float(np.mean(x)))
    if n == 1:
        v = float(stat(items))
        return v, v
    draws = bootstrap_draws(items, stat, n_boot, seed)
    if np.isnan(draws).all():
        return None, None
    lo, hi = np.nanquantile(draws, [alpha / 2, 1 - alpha / 2])
    if bias_correct:
        shift = float(np.nanmean(draws)) - float(stat(items))
        lo, hi = lo - shift, hi - shift
    return float(lo), float(hi)


def warning_text(n: int, needed: int, what: str) -> str:
    """Empty when n is enough, else one line saying what the small sample does to the value."""
    return "" if n >= needed else f"n={n} < {needed}: {what}"


def ci_columns(col: str, values: Sequence[float], needed: int, what: str,
               point: float | None = None, **boot: Any) -> dict[str, Any]:
    """`col` (the mean, or `point`), `col_ci_lo`, `col_ci_hi` and `col_warning`."""
    arr = np.asarray(values, dtype=np.float64)
    if len(arr) == 0:
        return {col: None, f"{col}_ci_lo": None, f"{col}_ci_hi": None, f"{col}_warning": ""}
    lo, hi = bootstrap_ci(arr, **boot)
    return {col: float(arr.mean()) if point is None else point, f"{col}_ci_lo": lo,
            f"{col}_ci_hi": hi, f"{col}_warning": warning_text(len(arr), needed, what)}


def quality_skip_reason(context: Any) -> str:
    """Why quality is not measured for this cell ("" when it is): toy or random-weight model.

    The runner writes the same reason in the row's note; skipped metrics return no columns.
    """
    spec, cell = getattr(context, "spec", None), getattr(context, "cell", None)
    if spec is not None and not getattr(spec, "has_quality", True):
        return "toy model: quality not meaningful"
    if cell is not None and getattr(cell, "weights", "") == "none":
        return "random weights: quality not measured"
    return ""


def metric_options(context: Any, name: str) -> Mapping[str, Any]:
    """The `[metric_options.<name>]` options of the run for this metric (empty when none).

    Read from `context.options[name]` (MetricContext.options: the suite's
    `[metric_options.<name>]` tables, whose keys load_suite checked against the metric's
    `option_names`); empty when the context carries no options.
    """
    options = getattr(context, "options", None) or {}
    value = options.get(name, {}) if isinstance(options, Mapping) else {}
    return value if isinstance(value, Mapping) else {}


def is_embedded(context: Any) -> bool:
    """A model embedded in diffbench and trained on its world (ModelSpec.embedded): scored with
    its own mini-CLIP, the world's real images and the zero-shot judge."""
    return bool(getattr(getattr(context, "spec", None), "embedded", False))


def images_as_numpy(images: Any) -> np.ndarray:
    """uint8 N x H x W x 3 numpy array from a tensor or array."""
    if hasattr(images, "detach"):
        images = images.detach().cpu().numpy()
    arr = np.asarray(images)
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] != 3:
        raise ValueError(f"expected uint8 N x H x W x 3 images, got {arr.dtype} {arr.shape}")
    return arr
