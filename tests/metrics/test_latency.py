"""Latency metric: synchronised timing, median / min / max math, exact shard merge."""

from __future__ import annotations

import time

import pytest
import torch

from harness.metric import METRICS, Observation
from metrics.latency import Latency, timed_call
from tests.metrics.contract import MetricContract


def _fed(observations: list[Observation]) -> Latency:
    metric = Latency()
    for obs in observations:
        metric.update(obs)
    return metric


def test_timed_call_returns_result_and_seconds():
    result, seconds = timed_call(lambda: time.sleep(0.02) or 7, "cpu")
    assert result == 7 and 0.02 <= seconds < 1.0


def test_timed_call_synchronises_cuda_on_both_ends(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append(device))
    _, seconds = timed_call(lambda: calls.append("fn"), "cuda:1")
    assert calls == ["cuda:1", "fn", "cuda:1"] and seconds >= 0


def test_compute_against_hand_values():
    obs = [Observation(n_images=2, seconds=s) for s in (2.0, 1.0, 4.0)]
    obs.append(Observation(n_images=2, seconds=None))  # not timed: ignored
    cols = _fed(obs).compute()
    assert cols == {"latency_s": 1.0, "latency_min_s": 0.5, "latency_max_s": 2.0,
                    "images_per_s": 1.0, "repeats": 3.0}


def test_even_count_median_and_empty():
    cols = _fed([Observation(n_images=1, seconds=s) for s in (1.0, 2.0, 3.0, 10.0)]).compute()
    assert cols["latency_s"] == 2.5 and cols["images_per_s"] == pytest.approx(1 / 2.5)
    assert set(Latency().compute().values()) == {None}


def test_merge_of_shards_equals_one_metric():
    obs = [Observation(n_images=n, seconds=s) for n, s in ((1, 0.3), (2, 0.5), (1, 0.2), (2, 0.9))]
    a, b = _fed(obs[:2]), _fed(obs[2:])
    a.merge(b)
    assert a.compute() == _fed(obs).compute()
    a.reset()
    assert a.seconds == [] and a.images == []


def test_registered():
    assert METRICS.get("latency") is Latency and Latency.higher_is_better is False


class TestLatencyContract(MetricContract):
    metric_name = "latency"

    def make_metric(self):
        return Latency()

    def observations(self):
        return [Observation(n_images=n, seconds=s)
                for n, s in ((2, 0.5), (1, 0.25), (2, 1.5), (2, 0.75))]
