"""Stage timer: per-stage seconds of one call, pipeline left exactly as before; StageTimes math."""

from __future__ import annotations

import time

import pytest
import torch

from harness.metric import METRICS, Observation
from metrics.stages import STAGES, StageTimes, denoiser, stage_timer, text_encoders
from tests.metrics.contract import MetricContract

HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs",
              "_forward_hooks_always_called", "_forward_pre_hooks_with_kwargs",
              "_backward_hooks", "_backward_pre_hooks")


@pytest.fixture(scope="module")
def pipe():
    from harness.models import MODELS, load_pipeline

    return load_pipeline(MODELS.get("tiny-sd"), "none", torch.float32, "cpu")


def _kwargs(steps: int = 4) -> dict:
    from harness.models import text_to_image_kwargs

    generators = [torch.Generator().manual_seed(0)]
    return text_to_image_kwargs(["a red circle"], steps, 5.0, 32, generators)


def _snapshot(pipe) -> dict:
    """Hook tables of every submodule and the instance dicts of the hooked objects."""
    modules = [*text_encoders(pipe), denoiser(pipe), pipe.vae]
    hooks = {(i, name, attr): dict(getattr(sub, attr)) for i, m in enumerate(modules)
             for name, sub in m.named_modules() for attr in HOOK_DICTS}
    return {"hooks": hooks, "vae": dict(pipe.vae.__dict__), "pipe": dict(pipe.__dict__)}


def test_stages_cover_the_call_and_leave_pipeline_exact(pipe):
    reference = pipe(**_kwargs()).images
    before = _snapshot(pipe)
    start = time.perf_counter()
    with stage_timer(pipe, "cpu") as clock:
        images = pipe(**_kwargs()).images
    wall = time.perf_counter() - start
    assert set(clock.seconds) == set(STAGES)
    assert all(clock.seconds[s] > 0 for s in STAGES)
    assert sum(clock.seconds.values()) <= wall
    assert _snapshot(pipe) == before and "decode" not in pipe.vae.__dict__
    assert torch.equal(images, reference)
    assert torch.equal(pipe(**_kwargs()).images, reference)


def test_restored_when_the_call_raises(pipe):
    before = _snapshot(pipe)
    with pytest.raises(RuntimeError), stage_timer(pipe, "cpu"):
        raise RuntimeError("boom")
    assert _snapshot(pipe) == before


def test_cuda_device_synchronises_at_every_boundary(pipe, monkeypatch):
    calls, events = [], []

    class Event:  # torch.cuda.Event on a CPU: records its creation order as its time
        def __init__(self, enable_timing: bool = False) -> None:
            self.t = len(events)
            events.append(self)

        def record(self) -> None:
            pass

        def synchronize(self) -> None:
            calls.append("event")

        def elapsed_time(self, end: Event) -> float:
            return float(end.t - self.t)  # milliseconds

    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append(device))
    monkeypatch.setattr(torch.cuda, "Event", Event)
    steps = 3
    with stage_timer(pipe, "cuda") as clock:
        pipe(**_kwargs(steps))
    encoder_calls = 2  # prompt and the empty negative prompt (guidance)
    # encoders: start + end of each call; denoise: first start + end of every call; decode: 2
    assert len(calls) == 2 * encoder_calls + (1 + steps) + 2
    assert set(calls) == {"cuda"}
    assert len(events) == 2 * steps  # one event pair around each denoiser forward
    assert clock.step_seconds == [0.001] * steps  # read off the events, ms -> s


def test_stage_times_mean_and_merge():
    obs = [Observation(n_images=1, stage_seconds={"text_encoder": 0.25, "denoise": 2.0,
                                                  "decode": 0.5}),
           Observation(n_images=1, stage_seconds={"text_encoder": 0.75, "denoise": 4.0,
                                                  "decode": 1.5}),
           Observation(n_images=1)]
    obs[0].step_seconds, obs[1].step_seconds = [0.25, 0.5], [0.125]
    whole, a, b = StageTimes(), StageTimes(), StageTimes()
    for o in obs:
        whole.update(o)
    a.update(obs[0])
    b.update(obs[1])
    a.merge(b)
    expected = {"t_text_encoder_s": 0.5, "t_denoise_s": 3.0, "t_decode_s": 1.0, "step_ms": 250.0}
    assert whole.compute() == expected and a.compute() == expected
    assert set(StageTimes().compute().values()) == {None}
    assert METRICS.get("stages") is StageTimes


class TestStageTimesContract(MetricContract):
    metric_name = "stages"

    def make_metric(self):
        return StageTimes()

    def observations(self):
        calls = [(0.25, 1.5, 0.125), (0.5, 2.0, 0.25), (0.125, 1.25, 0.5)]
        return [Observation(n_images=1, stage_seconds=dict(zip(STAGES, c))) for c in calls] \
            + [Observation(n_images=1, seconds=1.0)]
