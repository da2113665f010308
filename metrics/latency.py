"""Latency / throughput: device-synchronised wall time of pipeline calls, median and spread."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from harness.metric import Metric, Observation, register_metric


def synchronize(device: str) -> None:
    """Wait for queued device work (CUDA kernels run asynchronously); no-op on CPU."""
    if str(device).startswith("cuda"):
        torch.cuda.synchronize(device)


def timed_call(fn: Callable[[], Any], device: str) -> tuple[Any, float]:
    """`(fn(), seconds)`, with the device synchronised before starting and before stopping."""
    synchronize(device)
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    return result, time.perf_counter() - start


@register_metric("latency")
class Latency(Metric):
    """Median seconds per image over repeated calls, min / max spread, images per second."""

    higher_is_better = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("seconds", [], reduce="cat")
        self.add_state("images", [], reduce="cat")

    def update(self, obs: Observation) -> None:
        if obs.seconds is None:
            return
        self.seconds.append(float(obs.seconds))
        self.images.append(int(obs.n_images))

    def compute(self) -> dict[str, float | None]:
        if not self.seconds:
            return dict.fromkeys(("latency_s", "latency_min_s", "latency_max_s", "images_per_s",
                                  "repeats"))
        per_image = [s / n for s, n in zip(self.seconds, self.images, strict=True)]
        median_call = statistics.median(self.seconds)
        images_per_call = statistics.median(self.images)
        return {
            "latency_s": statistics.median(per_image),
            "latency_min_s": min(per_image),
            "latency_max_s": max(per_image),
            "images_per_s": images_per_call / median_call,
            "repeats": float(len(self.seconds)),
        }
