"""torchao weight quantisation (PyTorch AO, github.com/pytorch/ao): real low-bit Linear weights.

Every nn.Linear of the denoiser (pipe.unet or pipe.transformer; with `min_features`, those
whose in- and out-features are both at least that) gets its weight replaced by torchao's
`quantize_(denoiser, config, filter_fn)` with one of torchao 0.18's workflow configs:

  int8_weight_only  Int8WeightOnlyConfig: int8 weights, symmetric per output row on the full
                    grid [-128, 127] (scale s = max|w| / 127.5, fp32, and an int8 zero point of
                    0 a row); activations stay floating point, y = (x @ q^T) * s.
  int8_dynamic      Int8DynamicActivationInt8WeightConfig: the same weights, and each input
                    quantised per token to int8 at run time (symmetric); an int8 x int8 ->
                    int32 matmul (torch._int_mm), rescaled by both scales.
  fp8_weight_only   Float8WeightOnlyConfig: float8 e4m3 weights per row; the matmul runs in
                    the activations' precision (storage only, no fp8 kernel).
  fp8_dynamic       Float8DynamicActivationFloat8WeightConfig: e4m3 weights and activations,
                    one scale a tensor, torch._scaled_mm; torchao leaves layers whose features
                    are not multiples of 16 alone (`quantized_layers` counts the others).

Only Linear weights: a UNet's convolutions (and every norm, the text encoder and the VAE) stay
in floating point. The fp8 modes need a CUDA GPU of compute capability >= 8.9 (Ada, Hopper and
later); elsewhere apply refuses in one line (torchao would run fp8_weight_only on a CPU too, by
upcasting the weights every call, which measures no float8 hardware). Int4 weight-only is not
offered: torchao 0.18's Int4WeightOnlyConfig needs the mslk kernels (plain packing) or CUDA and
bf16 (tinygemm's tile-packed format), so it runs on no CPU.
torchao's `set_inductor_config` is off: it would set process-wide torch._inductor options
that remove() could not undo (compile runs keep the harness's own settings).

quantize_ sets `module.weight` to a new Parameter wrapping a torchao tensor subclass
(Int8Tensor / Float8Tensor: `qdata` and `scale`, and Int8Tensor's int8 `zero_point`) and an
instance `extra_repr`; both are recorded through the handle first, so remove() puts back the
very Parameter objects (bit-identical weights) and drops the `extra_repr`. The fp weights are
kept alive meanwhile (no copy of the denoiser), so peak memory still holds them; the report's
`weight_bytes_quantized` (the subclasses' inner tensors, as stored) against `weight_bytes_fp`
(the weights they replaced) is the storage the quantised denoiser needs. Inference only.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

import torch

from harness.errors import DiffbenchError
from harness.method import MethodHandle, register_method
from harness.params import param
from harness.steps import StepContext
from methods._common.quant import TOUCHES
from methods._common.unet import require_denoiser

# mode -> (torchao config class, weight bits, activations quantised too, needs fp8 matmul)
MODES: dict[str, tuple[str, int, bool, bool]] = {
    "int8_weight_only": ("Int8WeightOnlyConfig", 8, False, False),
    "int8_dynamic": ("Int8DynamicActivationInt8WeightConfig", 8, True, False),
    "fp8_weight_only": ("Float8WeightOnlyConfig", 8, False, True),
    "fp8_dynamic": ("Float8DynamicActivationFloat8WeightConfig", 8, True, True),
}
FP8_CAPABILITY = (8, 9)


@register_method("torchao", touches=TOUCHES)
@dataclass(frozen=True)
class TorchAOConfig:
    """torchao low-bit Linear weights (int8 / fp8, weight-only or with dynamic activations)."""

    mode: str = param("int8_weight_only", "torchao workflow: int8_weight_only, int8_dynamic "
                      "(int8 activations per token too), fp8_weight_only, fp8_dynamic (fp8: "
                      "CUDA compute capability >= 8.9)", choices=tuple(MODES))
    min_features: int = param(0, "quantise only Linear layers whose in- and out-features are "
                              "both at least this (0: every Linear of the denoiser)",
                              low=0, high=1 << 20)


def import_torchao() -> Any:
    """torchao.quantization, or a one-line error saying how to install it."""
    try:
        return importlib.import_module("torchao.quantization")
    except ImportError as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise DiffbenchError(f"method 'torchao' needs the torchao package ({reason}); "
                             "pip install torchao") from None


def check_fp8_device(mode: str, device: torch.device) -> None:
    """fp8 modes: a CUDA device of compute capability >= 8.9, else a one-line error."""
    if device.type != "cuda":
        raise DiffbenchError(f"torchao mode={mode} needs a CUDA GPU with compute capability >= "
                             f"8.9 (float8 matmul); the denoiser is on {device.type}")
    capability = torch.cuda.get_device_capability(device)
    if capability < FP8_CAPABILITY:
        raise DiffbenchError(f"torchao mode={mode} needs compute capability >= 8.9 (float8 "
                             f"matmul); {torch.cuda.get_device_name(device)} has "
                             f"{capability[0]}.{capability[1]}")


def is_quantized(weight: torch.Tensor) -> bool:
    """The weight is a torchao tensor subclass (torchao left it alone if plain)."""
    return type(weight) not in (torch.Tensor, torch.nn.Parameter)


def selected_layers(denoiser: torch.nn.Module, min_features: int) -> list[torch.nn.Linear]:
    """The denoiser's Linear layers to quantise: not yet quantised, both sides >= min_features
    (torchao's own `_is_linear` also leaves out nn.MultiheadAttention's output Linear)."""
    skip = torch.nn.modules.linear.NonDynamicallyQuantizableLinear
    return [m for m in denoiser.modules()
            if isinstance(m, torch.nn.Linear) and not isinstance(m, skip)
            and not is_quantized(m.weight)
            and min(m.in_features, m.out_features) >= min_features]


def stored_bytes(t: torch.Tensor) -> int:
    """Bytes of a tensor as stored: a tensor subclass's inner tensors (`__tensor_flatten__`:
    qdata, scale, zero_point, ...), recursively; a plain tensor's elements."""
    if is_quantized(t) and hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        return sum(stored_bytes(getattr(t, name)) for name in names)
    return t.numel() * t.element_size()


def weight_report(mode: str, originals: dict[torch.nn.Linear, torch.Tensor],
                  act_dtype: torch.dtype) -> dict:
    """Leaderboard columns, named as ptq_minmax's: bits, quantised vs replaced weight bytes."""
    _, w_bits, dynamic, _ = MODES[mode]
    done = [m for m in originals if is_quantized(m.weight)]
    return {"weight_bits": w_bits, "act_bits": 8 if dynamic else torch.finfo(act_dtype).bits,
            "weight_bytes_quantized": sum(stored_bytes(m.weight) for m in done),
            "weight_bytes_fp": sum(stored_bytes(originals[m]) for m in done),
            "quantized_layers": len(done)}


def apply(pipe: Any, config: TorchAOConfig, ctx: StepContext) -> MethodHandle:
    """Quantise the denoiser's Linear weights with torchao; remove() puts the originals back."""
    denoiser = require_denoiser(pipe, "torchao")[1]
    ao = import_torchao()
    reference = next(denoiser.parameters())
    if MODES[config.mode][3]:
        check_fp8_device(config.mode, reference.device)
    ao_config = getattr(ao, MODES[config.mode][0])(set_inductor_config=False)
    layers = selected_layers(denoiser, config.min_features)
    handle = MethodHandle(pipe, "torchao", config)
    originals = {}
    for m in layers:  # record what quantize_ replaces, so that remove() restores it
        originals[m] = m.weight
        handle.swap_attr(m, "weight", m.weight)
        handle.swap_attr(m, "extra_repr", m.extra_repr)
    chosen = {id(m) for m in layers}
    try:
        with torch.no_grad():
            ao.quantize_(denoiser, ao_config, filter_fn=lambda mod, _fqn: id(mod) in chosen)
    except BaseException:
        handle.remove()  # leave the pipeline as it was, then let torchao's error through
        raise
    handle.report.update(weight_report(config.mode, originals, reference.dtype))
    return handle
