"""Peak memory of a block: CUDA allocator peak on GPU, process resident high-water mark on CPU."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import resource
import sys
from collections.abc import Iterator
from typing import Any

import torch

from harness.metric import REDUCTIONS, Metric, Observation, register_metric

CLEAR_REFS = "/proc/self/clear_refs"
STATUS = "/proc/self/status"


@dataclasses.dataclass
class MemoryReading:
    """Result of `peak_memory`: filled when the block exits."""

    peak_bytes: int | None = None
    kind: str = ""  # "cuda_allocated", "rss_peak" (this block) or "rss_lifetime" (process)


def _reset_rss_peak() -> bool:
    """Reset the kernel's resident high-water mark (proc(5): clear_refs value 5)."""
    try:
        with open(CLEAR_REFS, "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _vm_hwm_bytes() -> int | None:
    """VmHWM (peak resident set size, kB) from /proc/self/status, proc(5)."""
    try:
        with open(STATUS) as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _maxrss_bytes() -> int:
    """getrusage(2) ru_maxrss: kB on Linux, bytes on macOS."""
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss if sys.platform == "darwin" else maxrss * 1024


@contextlib.contextmanager
def peak_memory(device: str) -> Iterator[MemoryReading]:
    """Measure the peak memory of the block; the yielded object is filled on exit."""
    result = MemoryReading()
    if str(device).startswith("cuda"):
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        yield result
        torch.cuda.synchronize(device)
        result.peak_bytes, result.kind = torch.cuda.max_memory_allocated(device), "cuda_allocated"
        return
    resettable = _reset_rss_peak()
    yield result
    hwm = _vm_hwm_bytes() if resettable else None
    if hwm is None:
        result.peak_bytes, result.kind = _maxrss_bytes(), "rss_lifetime"
    else:
        result.peak_bytes, result.kind = hwm, "rss_peak"


@register_metric("memory")
class PeakMemory(Metric):
    """Largest peak memory over the calls, in MiB, and `memory_kind`: what was measured.

    States: `peak_bytes` (merged by max) and `kind` (merged by "same": shards that measured
    memory must have measured the same kind, since a maximum over a CUDA allocator peak and a
    process RSS would mean nothing; shards that measured nothing leave it empty).
    """

    higher_is_better = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("peak_bytes", None, reduce="max")
        self.add_state("kind", "", reduce="same")

    def update(self, obs: Observation) -> None:
        if obs.peak_bytes is None:
            return
        value = int(obs.peak_bytes)
        self.peak_bytes = value if self.peak_bytes is None else max(self.peak_bytes, value)
        kind = obs.memory_kind or self.kind or _default_kind(obs.device)
        self.kind = REDUCTIONS["same"](self.kind, kind)

    def compute(self) -> dict[str, Any]:
        if self.peak_bytes is None:
            return {"peak_mem_mb": None}
        return {"peak_mem_mb": round(self.peak_bytes / 2**20, 1), "memory_kind": self.kind}


def _default_kind(device: str) -> str:
    """The kind `peak_memory` gives on this device when /proc allows a per-block peak."""
    if str(device).startswith("cuda"):
        return "cuda_allocated"
    return "rss_peak" if os.access(CLEAR_REFS, os.W_OK) else "rss_lifetime"
