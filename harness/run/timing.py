"""Paired, interleaved timing: rounds of one baseline and one method arm on the same pipeline.

Each round times both arms back to back (order alternating, ABBA, so linear drift cancels), each
arm `calls` times keeping its fastest call (a stall lengthens a call, it never shortens one);
the round's speedup is baseline seconds / method seconds. A round beyond `reject_k` scaled MADs
of the median is rejected (metrics.latency.outliers) and another is run. Rounds are added until
the median's 95 % interval is within `target` of it (after `min_rounds`), the budget is spent
(a hard cap once two rounds are kept), or `max_rounds`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

from harness.metric import Observation
from harness.run.compile import dynamo_counts
from harness.run.config import Timing
from metrics.latency import DeviceClock, outliers, relative_half_width, synchronize


@dataclasses.dataclass(frozen=True)
class Arm:
    """One side of a pair: `enter()` makes the pipeline this arm's, `call()` runs one batch."""

    name: str
    enter: Callable[[], None]
    call: Callable[[], Any]


@dataclasses.dataclass(frozen=True)
class CallTime:
    wall: float  # device-timed seconds (CUDA events on a GPU)
    cpu: float  # process CPU seconds, all threads


@dataclasses.dataclass
class PairedTiming:
    """The rounds of one cell and why they stopped."""

    baseline: list[CallTime]
    method: list[CallTime]
    rejected: list[bool]
    stop: str  # converged | budget | max_rounds
    warmup_calls: int
    warmup_s: float  # warm-up seconds beyond what the same calls take once warm
    seconds: float  # wall time of warm-up and rounds
    graphs_after_warmup: int  # dynamo's graph count (process total) when the rounds began

    def observations(self, n_images: int, device: str) -> list[Observation]:
        return [Observation(n_images=n_images, seconds=m.wall, baseline_seconds=b.wall,
                            cpu_seconds=m.cpu, rejected=bad, device=device)
                for b, m, bad in zip(self.baseline, self.method, self.rejected, strict=True)]


def time_call(fn: Callable[[], Any], clock: DeviceClock) -> CallTime:
    """One call between two device-timeline marks, with the process CPU time it used."""
    synchronize(clock.device)
    cpu0 = time.process_time()
    start = clock.mark()
    fn()
    end = clock.mark()
    wall = clock.seconds(start, end)
    return CallTime(wall, time.process_time() - cpu0)


def warm_up(arm: Arm, timing: Timing, clock: DeviceClock) -> tuple[int, float]:
    """Calls until two in a row agree within `agree` and compiled no new graph; (calls, excess
    seconds: their total minus that many steady calls, i.e. compile and first-call costs)."""
    arm.enter()
    walls = []
    for _ in range(timing.warmup):
        walls.append(time_call(arm.call, clock).wall)
    previous = None
    for _ in range(timing.warmup_max):
        graphs = dynamo_counts()[0]
        wall = time_call(arm.call, clock).wall
        walls.append(wall)
        fresh = dynamo_counts()[0] == graphs
        if fresh and previous is not None and abs(wall - previous) <= timing.agree * min(
                wall, previous):
            break
        previous = wall if fresh else None
    steady = walls[-1]
    return len(walls), max(0.0, sum(walls) - steady * len(walls))


def _best(arm: Arm, calls: int, clock: DeviceClock) -> CallTime:
    """The arm's fastest of `calls` calls (with that call's CPU time)."""
    arm.enter()
    return min((time_call(arm.call, clock) for _ in range(calls)), key=lambda t: t.wall)


def paired_rounds(baseline: Arm, method: Arm, timing: Timing, clock: DeviceClock,
                  now: Callable[[], float] = time.perf_counter) -> PairedTiming:
    """Warm up both arms, then paired rounds until the stopping rule (module docstring); the
    clock times calls on the device, `now` measures the budget."""
    started = now()
    n_base, excess_base = warm_up(baseline, timing, clock)
    n_method, excess_method = warm_up(method, timing, clock)
    rounds_start, graphs = now(), dynamo_counts()[0]
    base: list[CallTime] = []
    meth: list[CallTime] = []
    rejected: list[bool] = []
    stop = "max_rounds"
    while len(base) < timing.max_rounds:
        order = (baseline, method) if len(base) % 2 == 0 else (method, baseline)
        got = {arm.name: _best(arm, timing.calls, clock) for arm in order}
        base.append(got[baseline.name])
        meth.append(got[method.name])
        ratios = [b.wall / m.wall if m.wall > 0 else float("inf") for b, m in zip(base, meth)]
        rejected = outliers(ratios, timing.reject_k)
        kept = [r for r, bad in zip(ratios, rejected) if not bad]
        if len(kept) >= timing.min_rounds and relative_half_width(kept) <= timing.target:
            stop = "converged"
            break
        if len(kept) >= 2 and now() - rounds_start >= timing.budget_s:
            stop = "budget"  # a hard cap: on a stalling machine even before min_rounds
            break
    method.enter()  # leave the pipeline with the method applied
    return PairedTiming(base, meth, rejected, stop, n_base + n_method,
                        excess_base + excess_method, now() - started, graphs)


@contextlib.contextmanager
def fixed_threads(threads: int) -> Iterator[int]:
    """torch's intra-op CPU threads set to `threads` (0: keep the current count) for the block;
    yields the count in force, restores the previous one after."""
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(previous)
