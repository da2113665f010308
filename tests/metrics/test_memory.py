"""Peak memory: per-block RSS high-water mark on CPU, CUDA allocator peak, max-merged metric."""

from __future__ import annotations

import pytest
import torch

import metrics.memory as memory
from harness.metric import METRICS, Observation
from metrics.memory import PeakMemory, peak_memory
from tests.metrics.contract import MetricContract

MIB = 2**20


def test_cpu_peak_sees_a_touched_256_mib_tensor():
    with peak_memory("cpu") as empty:
        pass
    with peak_memory("cpu") as full:
        x = torch.ones(256 * MIB // 4)  # float32, every page written
        del x
    if full.kind != "rss_peak":
        pytest.skip("/proc/self/clear_refs is not writable here")
    assert empty.kind == "rss_peak"
    assert full.peak_bytes - empty.peak_bytes >= 200 * MIB


def test_fallback_without_clear_refs(monkeypatch, tmp_path):
    monkeypatch.setattr(memory, "CLEAR_REFS", str(tmp_path / "missing" / "clear_refs"))
    with peak_memory("cpu") as reading:
        pass
    assert reading.kind == "rss_lifetime" and reading.peak_bytes > 0


def test_cuda_path_uses_allocator_peak(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append("sync"))
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats",
                        lambda device=None: calls.append("reset"))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 123 * MIB)
    with peak_memory("cuda:0") as reading:
        calls.append("body")
    assert calls == ["sync", "reset", "body", "sync"]
    assert reading.peak_bytes == 123 * MIB and reading.kind == "cuda_allocated"


def test_metric_max_mib_and_merge():
    obs = [Observation(n_images=1, peak_bytes=b) for b in (100 * MIB, 300 * MIB + MIB // 3)]
    whole, a, b = PeakMemory(), PeakMemory(), PeakMemory()
    for o in [*obs, Observation(n_images=1)]:
        whole.update(o)
    a.update(obs[1])
    b.update(obs[0])
    a.merge(b)
    assert whole.compute() == a.compute() == {"peak_mem_mb": 300.3, "memory_kind": whole.kind}
    assert whole.kind in ("rss_peak", "rss_lifetime")
    assert PeakMemory().compute() == {"peak_mem_mb": None}
    cuda = PeakMemory()
    cuda.update(Observation(n_images=1, peak_bytes=1, device="cuda"))
    assert cuda.kind == "cuda_allocated"
    assert METRICS.get("memory") is PeakMemory


def test_kind_is_a_state_merged_into_a_fresh_metric():
    """The runner merges shard states into a fresh metric: `memory_kind` survives, a shard
    that measured nothing leaves it alone, two different kinds refuse to merge."""
    measured = PeakMemory()
    measured.update(Observation(n_images=1, peak_bytes=5 * MIB, memory_kind="rss_lifetime"))
    fresh = PeakMemory()
    fresh.merge_state(measured.state())
    fresh.merge_state(PeakMemory().state())
    assert fresh.compute() == {"peak_mem_mb": 5.0, "memory_kind": "rss_lifetime"}
    cuda = PeakMemory()
    cuda.update(Observation(n_images=1, peak_bytes=MIB, memory_kind="cuda_allocated"))
    with pytest.raises(ValueError, match="'rss_lifetime' and 'cuda_allocated'"):
        fresh.merge_state(cuda.state())
    with pytest.raises(ValueError, match="'rss_lifetime' and 'cuda_allocated'"):
        measured.update(Observation(n_images=1, peak_bytes=MIB, memory_kind="cuda_allocated"))


def test_runner_columns_carry_memory_kind():
    """compute_metrics (harness.run.cell) gets `memory_kind` from compute(), shards merged."""
    from harness.run.cell import compute_metrics, metric_states

    obs = [Observation(n_images=1, peak_bytes=7 * MIB, memory_kind="rss_peak")]
    shards = [metric_states(("memory",), obs, None), metric_states(("memory",), [], None)]
    assert compute_metrics(("memory",), shards, None) == {"peak_mem_mb": 7.0,
                                                          "memory_kind": "rss_peak"}


class TestPeakMemoryContract(MetricContract):
    metric_name = "memory"

    def make_metric(self):
        return PeakMemory()

    def observations(self):
        return [Observation(n_images=1, peak_bytes=100 * MIB, memory_kind="rss_peak"),
                Observation(n_images=1, seconds=0.5),
                Observation(n_images=1, peak_bytes=300 * MIB + 7, memory_kind="rss_peak"),
                Observation(n_images=2, peak_bytes=200 * MIB, memory_kind="rss_peak")]
