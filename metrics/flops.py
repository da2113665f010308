"""FLOPs of a whole generation (torch.utils.flop_counter), optionally under fake tensors."""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils import flop_counter
from torch.utils._pytree import tree_map

from harness.metric import Metric, Observation, register_metric

aten = torch.ops.aten

# Fused attention kernels the flop counter of torch 2.13 does not know (counted as 0 otherwise):
# the CPU flash kernel SDPA dispatches to on CPU, and the "overrideable" kernel of other backends.
_ATTENTION_FORWARD = ("_scaled_dot_product_flash_attention_for_cpu",
                      "_scaled_dot_product_fused_attention_overrideable")
_ATTENTION_BACKWARD = tuple(name + "_backward" for name in _ATTENTION_FORWARD)
# Matmuls it does not know either: the int8 x int8 -> int32 matmul of torchao's dynamic int8
# activations (Int8DynamicActivationInt8WeightConfig), counted like mm (2*M*N*K).
_MATMUL = ("_int_mm",)


def _attention_forward(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """Forward SDPA FLOPs: 2*b*h*s_q*s_k*(d_qk + d_v), torch.utils.flop_counter.sdpa_flop_count."""
    return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)


def _attention_backward(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None,
                        **kwargs) -> int:
    """Backward SDPA FLOPs, torch.utils.flop_counter.sdpa_backward_flop_count."""
    return flop_counter.sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape,
                                                 value_shape)


def _matmul(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    """(M, K) x (K, N) matmul FLOPs: 2*M*N*K, torch.utils.flop_counter.mm_flop."""
    return flop_counter.mm_flop(a_shape, b_shape)


def register_attention_formulas() -> None:
    """Register the missing formulas once: fused attention and torch._int_mm (idempotent;
    skips ops torch lacks or already counts, so a torch that learns them keeps its own)."""
    for names, formula in ((_ATTENTION_FORWARD, _attention_forward),
                           (_ATTENTION_BACKWARD, _attention_backward),
                           (_MATMUL, _matmul)):
        ops = [getattr(aten, name) for name in names if hasattr(aten, name)]
        missing = [op for op in ops if op not in flop_counter.flop_registry]
        if missing:
            flop_counter.register_flop_formula(missing)(formula)


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of `fn()` (matmul, torch._int_mm too / conv / attention; elementwise ops count 0),
    run for real."""
    register_attention_formulas()
    with flop_counter.FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def count_flops_fake(fn: Callable[[], Any], pipe: Any = None,
                     mode: torch._subclasses.fake_tensor.FakeTensorMode | None = None) -> int:
    """FLOPs of `fn()` run under fake tensors: shapes only, no real compute or activations.

    A whole diffusers text-to-image call counts unchanged (text encoders, every denoising step,
    VAE decode) when `pipe` is given: its scheduler then runs on real tensors (`real_scheduler`),
    because schedulers branch on timestep values (`prev_t >= 0`, step-index look-ups), which
    fake tensors cannot give. Use output_type "pt" or "latent" ("pil"/"np" convert to numpy).
    Pass `mode` when the model was built inside a FakeTensorMode (weights never allocated).
    Data-dependent code (a method's `.item()` thresholds, a caller's `if x.isfinite().all()`
    on the output) raises DataDependentOutputException: count the bare pipeline call.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    register_attention_formulas()
    mode = mode or FakeTensorMode(allow_non_fake_inputs=True)
    scheduler = getattr(pipe, "scheduler", None)
    patch = real_scheduler(scheduler) if scheduler is not None else contextlib.nullcontext()
    with mode, patch, flop_counter.FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def _real(value: Any) -> Any:
    """Real zeros in place of a fake tensor (same shape, dtype, device); other values unchanged."""
    from torch._subclasses.fake_tensor import FakeTensor

    if isinstance(value, FakeTensor):
        return torch.zeros(value.shape, dtype=value.dtype, device=value.device)
    return value


@contextlib.contextmanager
def real_scheduler(scheduler: Any) -> Iterator[None]:
    """Inside fake mode, run `set_timesteps`, `scale_model_input` and `step` on real tensors.

    `set_timesteps` runs unfaked, so `scheduler.timesteps` holds real values; the other two get
    real zeros of their fake tensors' shapes and, as `timestep`, the real `timesteps[k]` of the
    k-th `step` call (one step per timestep, from the first: text-to-image loops). Wrappers are
    instance attributes deleted on exit, so the class methods are restored exactly.
    """
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    # flow-matching schedulers (SD3, FLUX) have no scale_model_input: wrap what there is
    names = tuple(n for n in ("set_timesteps", "scale_model_input", "step")
                  if hasattr(scheduler, n))
    saved = {name: scheduler.__dict__[name] for name in names if name in scheduler.__dict__}
    bound = {name: getattr(scheduler, name) for name in names}
    steps_done = [0]

    # wraps: pipelines read set_timesteps' signature (FLUX / SD3: does it take `sigmas`?)
    @functools.wraps(bound["set_timesteps"])
    def set_timesteps(*args: Any, **kwargs: Any) -> Any:
        steps_done[0] = 0
        with unset_fake_temporarily():
            return bound["set_timesteps"](*args, **kwargs)

    def with_real_timestep(name: str) -> Callable[..., Any]:
        # the class signature: `bound[name]` may be an earlier (*args, **kwargs) wrapper
        signature = inspect.signature(getattr(type(scheduler), name))

        def call(*args: Any, **kwargs: Any) -> Any:
            with unset_fake_temporarily():
                bound_args = signature.bind(scheduler, *args, **kwargs)
                if "timestep" in bound_args.arguments:
                    bound_args.arguments["timestep"] = scheduler.timesteps[steps_done[0]]
                real_args = tree_map(_real, bound_args.args[1:])
                real_kwargs = tree_map(_real, bound_args.kwargs)
                out = bound[name](*real_args, **real_kwargs)
            steps_done[0] += name == "step"
            return out

        return call

    scheduler.set_timesteps = set_timesteps
    if "scale_model_input" in bound:
        scheduler.scale_model_input = with_real_timestep("scale_model_input")
    scheduler.step = with_real_timestep("step")
    try:
        yield
    finally:
        for name in names:
            if name in saved:
                setattr(scheduler, name, saved[name])
            else:
                scheduler.__dict__.pop(name, None)


def achieved_tflops(flops: float, seconds: float) -> float:
    """Achieved throughput in TFLOP/s: flops / seconds / 1e12."""
    return flops / seconds / 1e12


def mfu(flops: float, seconds: float, peak_tflops: float) -> float:
    """Model FLOPs utilisation: achieved / peak TFLOP/s (PaLM, Chowdhery et al. 2022, App. B)."""
    return achieved_tflops(flops, seconds) / peak_tflops


@register_metric("flops")
class Flops(Metric):
    """FLOPs per image of the counted calls (sum of call FLOPs / sum of images)."""

    higher_is_better = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("flops", 0, reduce="sum")
        self.add_state("images", 0, reduce="sum")

    def update(self, obs: Observation) -> None:
        if obs.flops is None:
            return
        self.flops += int(obs.flops)
        self.images += int(obs.n_images)

    def compute(self) -> dict[str, float | None]:
        if not self.images:
            return {"flops_per_image": None}
        return {"flops_per_image": float(self.flops // self.images)}
