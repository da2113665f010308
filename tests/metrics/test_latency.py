"""Latency metric: device timing, the median interval against the binomial definition, the stall
rule, paired speedup columns, exact shard merge."""

from __future__ import annotations

import itertools
import math
import statistics

import numpy as np
import pytest

from harness.metric import METRICS, Observation
from metrics.latency import Latency, median_ci, outliers, relative_half_width
from tests.metrics.contract import MetricContract


def _fed(observations: list[Observation]) -> Latency:
    metric = Latency()
    for obs in observations:
        metric.update(obs)
    return metric


def _coverage(n: int, k: int) -> float:
    """P(x_(k) <= median <= x_(n+1-k)) for continuous data: 1 - 2 P(Binomial(n, 1/2) < k)."""
    return 1 - 2 * sum(math.comb(n, j) for j in range(k)) / 2**n


@pytest.mark.parametrize("n", range(1, 60))
def test_median_ci_is_the_tightest_order_interval_with_95_percent(n):
    xs = list(range(1, n + 1))
    lo, hi = median_ci(xs[::-1])  # order of the input does not matter
    k = int(lo)
    assert hi == n + 1 - k
    if n >= 6:
        assert _coverage(n, k) >= 0.95 > _coverage(n, k + 1)
    else:
        assert (lo, hi) == (1, n)


def test_median_ci_covers_the_median_at_its_level():
    """Monte-Carlo: over skewed (log-normal) samples the interval holds the true median in at
    least 95 % of draws."""
    rng = np.random.default_rng(0)
    hits = 0
    for _ in range(2000):
        lo, hi = median_ci(rng.lognormal(0.0, 0.5, size=15))
        hits += lo <= 1.0 <= hi
    assert hits / 2000 >= 0.95


def test_outliers_flags_a_stall_only():
    values = [1.00, 1.01, 0.99, 1.02, 0.98, 1.00, 0.09, 1.01]  # one 10x stall in the method arm
    assert outliers(values, 5.0) == [False] * 6 + [True, False]
    assert outliers([1.0] * 8, 5.0) == [False] * 8  # no spread: nothing rejected
    assert outliers([1.0, 5.0], 5.0) == [False, False]  # too few to judge


def test_relative_half_width():
    assert relative_half_width([]) == math.inf
    assert relative_half_width([2.0] * 10) == 0.0
    assert relative_half_width(list(range(1, 11))) == pytest.approx((9 - 2) / 2 / 5.5)


def _rounds(pairs, rejected=()):
    return [Observation(n_images=2, seconds=m, baseline_seconds=b, cpu_seconds=2 * m,
                        rejected=i in rejected) for i, (b, m) in enumerate(pairs)]


def test_paired_columns_against_hand_values():
    pairs = [(4.0, 2.0), (4.0, 1.0), (6.0, 2.0), (8.0, 2.0), (3.0, 1.0), (4.0, 4.0)]
    cols = _fed(_rounds(pairs, rejected={5})).compute()
    ratios = [b / m for b, m in pairs[:5]]
    assert cols["speedup"] == statistics.median(ratios) == 3.0
    assert (cols["speedup_ci_lo"], cols["speedup_ci_hi"]) == (min(ratios), max(ratios))
    assert cols["latency_s"] == statistics.median([m / 2 for _, m in pairs[:5]]) == 1.0
    assert cols["images_per_s"] == 1.0 and cols["cpu_s_per_image"] == 2.0
    assert cols["rounds"] == 5 and cols["rounds_rejected"] == 1


def test_unpaired_calls_have_latency_but_no_speedup_and_empty_is_none():
    cols = _fed([Observation(n_images=1, seconds=s) for s in (1.0, 2.0, 3.0, 10.0)]).compute()
    assert cols["latency_s"] == 2.5 and cols["speedup"] is None and cols["cpu_s_per_image"] is None
    assert set(Latency().compute().values()) == {None}
    everything_rejected = _fed(_rounds([(1.0, 1.0)], rejected={0})).compute()
    assert set(everything_rejected.values()) == {None}


def test_merge_of_shards_equals_one_metric():
    obs = _rounds([(1.0, 0.5), (2.0, 0.5), (1.0, 0.25), (2.0, 1.0)], rejected={2})
    for cut in range(len(obs) + 1):
        a, b = _fed(obs[:cut]), _fed(obs[cut:])
        a.merge(b)
        assert a.compute() == _fed(obs).compute()
    a.reset()
    assert a.seconds == [] and a.rejected == []


def test_registered():
    assert METRICS.get("latency") is Latency and Latency.higher_is_better is False


class TestLatencyContract(MetricContract):
    metric_name = "latency"

    def make_metric(self):
        return Latency()

    def observations(self):
        return _rounds(itertools.islice(itertools.cycle([(1.0, 0.5), (0.75, 0.25), (2.0, 1.0)]),
                                        7), rejected={3})
