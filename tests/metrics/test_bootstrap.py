"""Bootstrap intervals: deterministic from the seed, cover the mean, edge cases."""

import numpy as np
import pytest

from metrics.bootstrap import bootstrap_ci, ci_columns, quality_skip_reason, warning_text


def test_deterministic_and_seed_dependent():
    v = np.random.default_rng(0).normal(size=50)
    assert bootstrap_ci(v, seed=0) == bootstrap_ci(v, seed=0)
    assert bootstrap_ci(v, seed=0) != bootstrap_ci(v, seed=1)


def test_interval_brackets_mean_and_matches_normal_theory():
    v = np.random.default_rng(1).normal(10.0, 2.0, size=400)
    lo, hi = bootstrap_ci(v, n_boot=2000)
    assert lo < v.mean() < hi
    half = 1.96 * v.std(ddof=1) / np.sqrt(len(v))
    assert (hi - lo) / 2 == pytest.approx(half, rel=0.15)


def test_custom_statistic_over_rows():
    rows = np.arange(20.0).reshape(10, 2)
    lo, hi = bootstrap_ci(rows, statistic=lambda x: float(x[:, 1].max()), n_boot=200)
    assert lo <= hi <= 19.0


def test_edge_cases():
    assert bootstrap_ci([]) == (None, None)
    assert bootstrap_ci([3.0]) == (3.0, 3.0)
    assert bootstrap_ci([2.0] * 5) == (2.0, 2.0)


def test_columns_and_warning():
    out = ci_columns("x", [1.0, 2.0, 3.0], needed=100, what="wide interval", n_boot=100)
    assert out["x"] == 2.0 and out["x_ci_lo"] <= 2.0 <= out["x_ci_hi"]
    assert out["x_warning"] == "n=3 < 100: wide interval"
    assert warning_text(100, 100, "w") == ""
    assert ci_columns("x", [], 10, "w")["x"] is None


def test_quality_skip_reason():
    from types import SimpleNamespace as NS

    assert quality_skip_reason(NS(spec=NS(has_quality=False), cell=NS(weights="x")))
    assert "random" in quality_skip_reason(NS(spec=NS(has_quality=True), cell=NS(weights="none")))
    assert quality_skip_reason(NS(spec=NS(has_quality=True), cell=NS(weights="a/b"))) == ""


def test_bias_correction_centres_a_biased_statistic():
    v = np.random.default_rng(2).normal(size=(30, 20))
    # the number of distinct rows: every resample has fewer than the 30 originals (biased low)

    def distinct(x):
        return float(len(np.unique(x, axis=0)))

    lo, hi = bootstrap_ci(v, distinct, n_boot=200)
    assert hi < 30
    lo_c, hi_c = bootstrap_ci(v, distinct, n_boot=200, bias_correct=True)
    assert lo_c <= 30 <= hi_c
