"""Latency and paired speedup: device-timed calls, rounds of baseline and method calls on one
pipeline, medians with distribution-free intervals, and the robust rule that rejects stalls."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Sequence
from typing import Any

import torch

from harness.metric import Metric, Observation, register_metric

ALPHA = 0.05
MAD_SCALE = 1.4826  # MAD -> standard deviation of a normal distribution


def synchronize(device: str) -> None:
    """Wait for queued device work (CUDA kernels run asynchronously); no-op on CPU."""
    if str(device).startswith("cuda"):
        torch.cuda.synchronize(device)


class DeviceClock:
    """Marks on the device's own timeline: CUDA events on a GPU (no synchronisation between
    marks), perf_counter on a CPU. `seconds(a, b)` synchronises once, then reads the gap."""

    def __init__(self, device: str) -> None:
        self.device = str(device)
        self.cuda = self.device.startswith("cuda")

    def mark(self) -> Any:
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def seconds(self, start: Any, end: Any) -> float:
        if not self.cuda:
            return end - start
        end.synchronize()
        return start.elapsed_time(end) / 1000.0


def median_ci(values: Sequence[float], alpha: float = ALPHA) -> tuple[float | None, float | None]:
    """Distribution-free (1 - alpha) interval of the median from order statistics.

    The interval [x_(k), x_(n+1-k)] with the largest k for which P(Binomial(n, 1/2) < k) <=
    alpha / 2 (Conover, Practical Nonparametric Statistics, 3rd ed., sec. 3.2). Below six values
    no such k exists; the interval is then [min, max], whose coverage is 1 - 2^(1-n).
    """
    xs = sorted(float(v) for v in values)
    n = len(xs)
    if n == 0:
        return None, None
    k, tail = 0, 0.0
    while True:  # tail = P(B <= k) for B ~ Binomial(n, 1/2)
        tail += math.comb(n, k) / 2.0**n
        if tail > alpha / 2:
            break
        k += 1
    k = max(k, 1)  # k = number of values left out below, plus one
    return xs[k - 1], xs[n - k]


def outliers(values: Sequence[float], k: float) -> list[bool]:
    """True for each value beyond k scaled MADs of the median (Hampel's rule); the scale has a
    floor of 0.5 % of the median so that identical values do not reject the next one."""
    if len(values) < 3:
        return [False] * len(values)
    med = statistics.median(values)
    mad = statistics.median(abs(v - med) for v in values)
    scale = max(MAD_SCALE * mad, 0.005 * abs(med))
    return [abs(v - med) > k * scale for v in values]


def relative_half_width(values: Sequence[float], alpha: float = ALPHA) -> float:
    """Half the width of median_ci over the median: the stopping rule of the paired rounds."""
    lo, hi = median_ci(values, alpha)
    med = statistics.median(values) if values else 0.0
    return math.inf if lo is None or not med else (hi - lo) / 2 / abs(med)


LATENCY_COLUMNS = ("latency_s", "latency_ci_lo", "latency_ci_hi", "images_per_s",
                   "cpu_s_per_image", "speedup", "speedup_ci_lo", "speedup_ci_hi", "rounds",
                   "rounds_rejected")


@register_metric("latency")
class Latency(Metric):
    """Paired rounds: the method's median seconds per image and the speedup over the baseline
    timed in the same rounds (median of per-round ratios), each with a 95 % median interval;
    rejected (stalled) rounds are counted and left out."""

    higher_is_better = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("seconds", [], reduce="cat")
        self.add_state("baseline_seconds", [], reduce="cat")
        self.add_state("cpu_seconds", [], reduce="cat")
        self.add_state("images", [], reduce="cat")
        self.add_state("rejected", [], reduce="cat")

    def update(self, obs: Observation) -> None:
        if obs.seconds is None:
            return
        self.seconds.append(float(obs.seconds))
        base = obs.baseline_seconds
        self.baseline_seconds.append(None if base is None else float(base))
        self.cpu_seconds.append(None if obs.cpu_seconds is None else float(obs.cpu_seconds))
        self.images.append(int(obs.n_images))
        self.rejected.append(bool(obs.rejected))

    def compute(self) -> dict[str, float | None]:
        kept = [i for i, r in enumerate(self.rejected) if not r]
        if not kept:
            return dict.fromkeys(LATENCY_COLUMNS)
        per_image = [self.seconds[i] / self.images[i] for i in kept]
        lo, hi = median_ci(per_image)
        cpu = [self.cpu_seconds[i] / self.images[i] for i in kept
               if self.cpu_seconds[i] is not None]
        out: dict[str, float | None] = {
            "latency_s": statistics.median(per_image), "latency_ci_lo": lo, "latency_ci_hi": hi,
            "images_per_s": 1.0 / statistics.median(per_image),
            "cpu_s_per_image": statistics.median(cpu) if cpu else None,
            "speedup": None, "speedup_ci_lo": None, "speedup_ci_hi": None,
            "rounds": len(kept), "rounds_rejected": len(self.rejected) - len(kept),
        }
        ratios = [self.baseline_seconds[i] / self.seconds[i] for i in kept
                  if self.baseline_seconds[i] is not None and self.seconds[i] > 0]
        if ratios:
            out["speedup"] = statistics.median(ratios)
            out["speedup_ci_lo"], out["speedup_ci_hi"] = median_ci(ratios)
        return out
