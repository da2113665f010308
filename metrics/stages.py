"""Per-stage wall time of one pipeline call: text encoders, denoising loop, VAE decode, and the
median time of one denoising step (one denoiser forward, timed with CUDA events on a GPU)."""

from __future__ import annotations

import contextlib
import dataclasses
import statistics
import time
from collections.abc import Callable, Iterator
from typing import Any

from harness.metric import Metric, Observation, register_metric
from metrics.latency import DeviceClock, synchronize

STAGES = ("text_encoder", "denoise", "decode")


def text_encoders(pipe: Any) -> list[Any]:
    """Every text encoder of the pipeline (text_encoder, text_encoder_2, ...), in name order."""
    components = getattr(pipe, "components", None) or {}
    return [module for name, module in sorted(components.items())
            if name.startswith("text_encoder") and module is not None]


def denoiser(pipe: Any) -> Any:
    """The denoising network: `pipe.unet` or `pipe.transformer`, whichever exists."""
    for name in ("unet", "transformer"):
        module = getattr(pipe, name, None)
        if module is not None:
            return module
    raise AttributeError(f"{type(pipe).__name__} has neither a unet nor a transformer")


@dataclasses.dataclass
class StageClock:
    """What `stage_timer` yields: `seconds[stage]`, filled while the call runs."""

    seconds: dict[str, float] = dataclasses.field(
        default_factory=lambda: dict.fromkeys(STAGES, 0.0))
    marks: list[tuple[Any, Any]] = dataclasses.field(default_factory=list)
    clock: DeviceClock | None = None

    @property
    def step_seconds(self) -> list[float]:
        """Seconds of each denoiser forward, from device-timeline marks (read after the call)."""
        return [self.clock.seconds(a, b) for a, b in self.marks] if self.clock else []


@contextlib.contextmanager
def stage_timer(pipe: Any, device: str) -> Iterator[StageClock]:
    """Yield a StageClock whose `seconds` fill while ONE pipeline call runs inside the block.

    text_encoder: sum over every text-encoder forward; denoise: from the start of the first
    denoiser forward to the end of the last one (scheduler work between calls included);
    decode: sum over `vae.decode` calls. The device is synchronised at every boundary. Hooks
    are removed and the `vae.decode` wrapper (an instance attribute) deleted on exit.
    """
    clock = StageClock(clock=DeviceClock(device))
    times = clock.seconds
    step_start: list[Any] = []
    denoise_start: list[float] = []
    started: list[float] = []

    def now() -> float:
        synchronize(device)
        return time.perf_counter()

    def encoder_pre(module: Any, args: Any) -> None:
        started.append(now())

    def encoder_post(module: Any, args: Any, output: Any) -> None:
        times["text_encoder"] += now() - started.pop()

    def denoise_pre(module: Any, args: Any) -> None:
        if not denoise_start:
            denoise_start.append(now())
        step_start.append(clock.clock.mark())

    def denoise_post(module: Any, args: Any, output: Any) -> None:
        clock.marks.append((step_start.pop(), clock.clock.mark()))
        times["denoise"] = now() - denoise_start[0]

    handles = []
    for module in text_encoders(pipe):
        handles.append(module.register_forward_pre_hook(encoder_pre))
        handles.append(module.register_forward_hook(encoder_post))
    net = denoiser(pipe)
    handles.append(net.register_forward_pre_hook(denoise_pre))
    handles.append(net.register_forward_hook(denoise_post))
    vae = getattr(pipe, "vae", None)
    restore = _wrap_decode(vae, times, now) if vae is not None else (lambda: None)
    try:
        yield clock
    finally:
        for handle in handles:
            handle.remove()
        restore()


def _wrap_decode(vae: Any, times: dict[str, float], now: Callable[[], float]) -> Callable[[], None]:
    """Time `vae.decode` through an instance attribute; return the function that removes it."""
    had_own = "decode" in vae.__dict__
    original = vae.__dict__.get("decode")
    bound = vae.decode
    depth = [0]

    def decode(*args: Any, **kwargs: Any) -> Any:
        depth[0] += 1
        start = now() if depth[0] == 1 else 0.0
        try:
            return bound(*args, **kwargs)
        finally:
            depth[0] -= 1
            if depth[0] == 0:
                times["decode"] += now() - start

    vae.decode = decode

    def restore() -> None:
        if had_own:
            vae.decode = original
        else:
            del vae.decode

    return restore


@register_metric("stages")
class StageTimes(Metric):
    """Mean seconds per call of each stage (text encoders, denoising loop, VAE decode); `step_ms`,
    the median milliseconds of one denoiser forward (one denoising step)."""

    higher_is_better = False

    def __init__(self) -> None:
        super().__init__()
        for stage in STAGES:
            self.add_state(f"sum_{stage}", 0.0, reduce="sum")
        self.add_state("calls", 0, reduce="sum")
        self.add_state("step_seconds", [], reduce="cat")

    def update(self, obs: Observation) -> None:
        if obs.stage_seconds is None:
            return
        for stage in STAGES:
            name = f"sum_{stage}"
            setattr(self, name, getattr(self, name) + float(obs.stage_seconds.get(stage, 0.0)))
        self.calls += 1
        self.step_seconds.extend(float(s) for s in obs.step_seconds or ())

    def compute(self) -> dict[str, float | None]:
        out = {f"t_{stage}_s": getattr(self, f"sum_{stage}") / self.calls if self.calls else None
               for stage in STAGES}
        out["step_ms"] = (1000 * statistics.median(self.step_seconds) if self.step_seconds
                          else None)
        return out
