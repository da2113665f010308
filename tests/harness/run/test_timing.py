"""The paired timing protocol on scripted arms and a virtual clock: ABBA order, fastest of the
arm's calls, stall rejection with re-runs, the three stopping rules, warm-up until agreement,
and the thread setting; then one real paired cell and one compiled cell on tiny-sd."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from harness.run.config import Timing
from harness.run.timing import Arm, fixed_threads, paired_rounds, warm_up


class VirtualClock:
    """A CPU-style DeviceClock whose time only moves when a scripted call runs."""

    cuda, device = False, "cpu"

    def __init__(self) -> None:
        self.t = 0.0

    def mark(self) -> float:
        return self.t

    def seconds(self, start: float, end: float) -> float:
        return end - start

    def now(self) -> float:
        return self.t


def scripted(clock: VirtualClock, name: str, durations, log: list) -> Arm:
    """An arm whose n-th call takes durations(n) virtual seconds; calls are logged."""
    count = [0]

    def call() -> None:
        clock.t += durations(count[0])
        count[0] += 1
        log.append(name)

    return Arm(name, lambda: log.append(f"enter {name}"), call)


FAST = Timing(calls=1, min_rounds=8, max_rounds=40, warmup=0, warmup_max=3, budget_s=1e9)


def test_rounds_alternate_abba_and_the_method_is_left_applied():
    clock, log = VirtualClock(), []
    base = scripted(clock, "b", lambda n: 1.0, log)
    meth = scripted(clock, "m", lambda n: 0.5, log)
    paired = paired_rounds(base, meth, FAST, clock, clock.now)
    calls = [x for x in log if not x.startswith("enter")][4:]  # after 2 warm-up calls per arm
    assert calls[:8] == ["b", "m", "m", "b", "b", "m", "m", "b"]
    assert log[-1] == "enter m"
    assert paired.stop == "converged" and len(paired.baseline) == 8
    assert [b.wall / m.wall for b, m in zip(paired.baseline, paired.method)] == [2.0] * 8


def test_each_arm_keeps_its_fastest_call_so_a_stall_inside_a_round_is_absorbed():
    clock, log = VirtualClock(), []
    base = scripted(clock, "b", lambda n: 10.0 if n == 7 else 1.0, log)
    meth = scripted(clock, "m", lambda n: 1.0, log)
    paired = paired_rounds(base, meth, dataclasses.replace(FAST, calls=3), clock, clock.now)
    assert {b.wall for b in paired.baseline} == {1.0} and not any(paired.rejected)


def test_a_stalled_round_is_rejected_and_another_round_is_run():
    clock, log = VirtualClock(), []
    jitter = [1.0, 1.01, 0.99, 1.02, 0.98, 1.0, 1.01, 0.99, 1.0, 1.01, 0.99]
    base = scripted(clock, "b", lambda n: 1.0, log)
    meth = scripted(clock, "m", lambda n: 12.0 if n == 6 else jitter[n % len(jitter)], log)
    timing = dataclasses.replace(FAST, target=0.05)
    paired = paired_rounds(base, meth, timing, clock, clock.now)
    assert sum(paired.rejected) == 1 and paired.rejected[4]  # method call 6 = round 4
    assert len(paired.baseline) - 1 >= timing.min_rounds and paired.stop == "converged"


@pytest.mark.parametrize("budget,expected", [(1e9, "max_rounds"), (30.0, "budget")])
def test_noisy_rounds_stop_at_the_budget_or_the_round_limit(budget, expected):
    clock, log = VirtualClock(), []
    base = scripted(clock, "b", lambda n: 1.0, log)
    meth = scripted(clock, "m", lambda n: (0.5, 1.0, 1.6, 0.8, 1.3)[n % 5], log)
    timing = dataclasses.replace(FAST, budget_s=budget, max_rounds=20)
    paired = paired_rounds(base, meth, timing, clock, clock.now)
    assert paired.stop == expected
    n = len(paired.baseline)
    assert (n == 20) if expected == "max_rounds" else (timing.min_rounds <= n < 20)


def test_warm_up_runs_until_two_calls_agree_and_reports_the_excess():
    clock, log = VirtualClock(), []
    arm = scripted(clock, "a", lambda n: (9.0, 3.0, 1.5, 1.0, 1.02, 1.0)[min(n, 5)], log)
    calls, excess = warm_up(arm, Timing(warmup=1, warmup_max=10, agree=0.05), clock)
    assert calls == 5  # 9 (untimed), 3, 1.5, 1.0, 1.02: 1.0 and 1.02 agree
    assert excess == pytest.approx(9 + 3 + 1.5 + 1.0 + 1.02 - 5 * 1.02)
    calls, _ = warm_up(scripted(clock, "c", lambda n: 1.0 + n, log),
                       Timing(warmup=0, warmup_max=4), clock)
    assert calls == 4  # never agrees: stops at warmup_max


def test_fixed_threads_sets_and_restores():
    before = torch.get_num_threads()
    with fixed_threads(1) as n:
        assert n == 1 == torch.get_num_threads()
    assert torch.get_num_threads() == before
    with fixed_threads(0) as n:
        assert n == before


SUITE = """
name = "t"
[defaults]
model = "tiny-sd"
weights = "none"
prompts = "shapes"
n_images = 2
batch_size = 2
steps = 3
device = "cpu"
compile = {compile}
[timing]
calls = 1
min_rounds = 3
max_rounds = 3
warmup = 0
warmup_max = 4
flops = "off"
[[methods]]
name = "deepcache"
params = {{ interval = 2 }}
"""


def _run(tmp_path, compile_mode):
    from harness.run import job
    from harness.run.config import load_suite
    from harness.run.leaderboard import read_csv
    from harness.run.store import CellStore

    path = tmp_path / f"{compile_mode}.toml"
    path.write_text(SUITE.format(compile=f'"{compile_mode}"'))
    out = tmp_path / compile_mode
    (row,) = read_csv(job.run(load_suite(path), out, progress=False))
    return row, CellStore(out).load_images(row["config_hash"])


def test_a_compiled_cell_on_tiny_sd_reports_compile_columns_and_matches_eager(tmp_path):
    """deepcache under `compile = "denoiser"`: both arms compiled, warm-up until no new graph,
    counters in the row, images within rounding of the eager cell's, and a key of its own."""
    import numpy as np

    from harness.run.compile import dynamo_counts

    torch._dynamo.reset()
    torch.compile(torch.nn.Linear(2, 2))(torch.ones(1, 2))  # counters already above zero
    assert dynamo_counts()[0] >= 1
    eager, eager_images = _run(tmp_path, "off")
    row, images = _run(tmp_path, "denoiser")
    assert row["status"] == "ok", row["error"]
    assert row["compile"] == "denoiser" and row["config_hash"] != eager["config_hash"]
    assert float(row["compile_s"]) > 0 and int(row["graphs"]) >= 2  # one per arm at least
    assert int(row["recompiles"]) == 0 and int(row["graph_breaks"]) >= 0
    assert eager.get("compile_s", "") == ""
    assert int(eager["rounds"]) + int(eager["rounds_rejected"]) == 3
    diff = np.abs(images.astype(int) - eager_images.astype(int))
    assert diff.max() <= 2, diff.max()


def test_compiled_context_restores_the_modules_and_regional_picks_outer_blocks():
    from types import SimpleNamespace

    from harness.models import MODELS, load_pipeline
    from harness.run.compile import COMPILERS, compiled

    pipe = load_pipeline(MODELS.get("tiny-sd"), "none", torch.float32, "cpu")
    with compiled(pipe, "denoiser") as state:
        assert pipe.unet._compiled_call_impl is not None and state.modules == 1
    assert pipe.unet._compiled_call_impl is None
    select = COMPILERS["regional"][0]
    blocks = select(pipe.unet)
    names = {type(b).__name__ for b in blocks}  # diffusers declares the UNet's repeated blocks
    assert blocks and names == set(pipe.unet._repeated_blocks) == {"BasicTransformerBlock"}
    assert not any(b is not c and any(m is b for m in c.modules()) for b in blocks for c in blocks)
    with compiled(pipe, "regional"):
        assert all(b._compiled_call_impl is not None for b in blocks)
        assert pipe.unet._compiled_call_impl is None
    assert all(b._compiled_call_impl is None for b in blocks)
    with compiled(SimpleNamespace(), "off") as state:  # off touches nothing
        assert state.modules == 0


def test_the_budget_is_a_hard_cap_even_before_min_rounds():
    """A stalling machine (rounds of minutes) stops at the budget once two rounds are kept."""
    clock, log = VirtualClock(), []
    base = scripted(clock, "b", lambda n: 60.0, log)
    meth = scripted(clock, "m", lambda n: (30.0, 60.0, 45.0)[n % 3], log)
    paired = paired_rounds(base, meth, dataclasses.replace(FAST, budget_s=100.0), clock,
                           clock.now)
    assert paired.stop == "budget" and len(paired.baseline) == 2 < FAST.min_rounds
