import importlib.util
import sys

import pytest
import torch

from harness.errors import DiffbenchError
from harness.method import METHODS
from harness.stack import resolve_method
from harness.steps import StepContext
from methods._common.quant import TOUCHES
from tests.methods.contract import (
    PROMPTS,
    DiTLike,
    MethodContract,
    assert_same_state,
    one_line_error,
    run,
    state_fingerprint,
)
from tests.methods.dit_fixtures import on_model

NO_TORCHAO = "torchao is not installed (pip install --no-deps torchao==0.18.0)"
needs_torchao = pytest.mark.skipif(importlib.util.find_spec("torchao") is None, reason=NO_TORCHAO)


@pytest.fixture()
def ao():
    return pytest.importorskip("torchao.quantization", reason=NO_TORCHAO)


def linears(pipe) -> list[torch.nn.Linear]:
    denoiser = getattr(pipe, "unet", None) or pipe.transformer
    return [m for m in denoiser.modules() if isinstance(m, torch.nn.Linear)]


def apply(pipe, params: dict):
    spec = METHODS.get("torchao")
    return spec.apply(pipe, spec.config(params), StepContext())


def image_error(pipe, spec, baseline, params: dict) -> tuple[float, float]:
    """(mean, max) |image - baseline| in uint8 levels with the method applied."""
    with apply(pipe, params) as handle:
        images = run(pipe, spec, handle, PROMPTS[:2])
    diff = (images.float() - baseline.float()).abs()
    return diff.mean().item(), diff.max().item()


@needs_torchao
class TorchAOContract(MethodContract):
    """torchao int8 weights on every Linear of the denoiser; quantising none is the identity."""

    method = "torchao"
    identity_params = {"min_features": 1 << 20}  # no Linear is that wide: nothing quantised
    active_params = {"mode": "int8_weight_only"}


TestTorchAO = TorchAOContract
TestTorchAOOnFlux = on_model(TorchAOContract, "flux")
TestTorchAOOnSd3 = on_model(TorchAOContract, "sd3")


@needs_torchao
@pytest.mark.parametrize("mode, mean_bound, max_bound", [
    ("int8_weight_only", 0.15, 2),  # measured 0.063 / 1; 6-bit per-row weights give 0.254 / 2
    ("int8_dynamic", 0.4, 3),  # measured 0.147 / 1 (int8 activations per token too)
])
def test_int8_weights_are_torchao_tensors_and_images_stay_close(
        tiny_pipe, tiny_spec, ao, mode, mean_bound, max_bound):
    baseline = run(tiny_pipe, tiny_spec, None, PROMPTS[:2])
    with apply(tiny_pipe, {"mode": mode}):
        assert all(isinstance(m.weight, ao.Int8Tensor) for m in linears(tiny_pipe))
        assert all("extra_repr" in m.__dict__ for m in linears(tiny_pipe))
    mean, worst = image_error(tiny_pipe, tiny_spec, baseline, {"mode": mode})
    assert 0 < mean < mean_bound and worst <= max_bound, (mean, worst)


@needs_torchao
def test_int8_weights_are_per_row_steps_of_max_over_127_5(tiny_pipe, ao):
    """Symmetric int8 per output row on the full grid [-128, 127]: s = max|w| / 127.5, and each
    dequantised weight is within half a step of the original."""
    originals = {m: m.weight.detach().clone() for m in linears(tiny_pipe)}
    with apply(tiny_pipe, {"mode": "int8_weight_only"}):
        for m, w in originals.items():
            q = m.weight
            assert q.qdata.dtype == torch.int8 and q.qdata.shape == w.shape
            torch.testing.assert_close(q.scale.flatten(), w.abs().amax(dim=1) / 127.5)
            assert ((q.dequantize() - w).abs() <= q.scale * (0.5 + 1e-4)).all()


@needs_torchao
def test_remove_restores_the_same_parameters_and_images(tiny_pipe, tiny_spec, ao):
    baseline = run(tiny_pipe, tiny_spec, None, PROMPTS[:2])
    weights = {m: (m.weight, m.bias) for m in linears(tiny_pipe)}
    handle = apply(tiny_pipe, {"mode": "int8_dynamic"})
    run(tiny_pipe, tiny_spec, handle, PROMPTS[:2])
    handle.remove()
    assert all(m.weight is w and m.bias is b for m, (w, b) in weights.items())
    assert not any("extra_repr" in m.__dict__ for m in weights)
    assert torch.equal(run(tiny_pipe, tiny_spec, None, PROMPTS[:2]), baseline)


@needs_torchao
@pytest.mark.parametrize("mode, act_bits", [("int8_weight_only", 32), ("int8_dynamic", 8)])
def test_report_gives_int8_bytes_about_a_quarter_of_fp32(tiny_pipe, ao, mode, act_bits):
    """int8 data, and per row an fp32 scale and an int8 zero point, against fp32 weights."""
    layers = linears(tiny_pipe)
    fp = sum(4 * m.weight.numel() for m in layers)
    stored = sum(m.weight.numel() + 5 * m.out_features for m in layers)
    with apply(tiny_pipe, {"mode": mode}) as handle:
        report = dict(handle.report)
    assert report == {"weight_bits": 8, "act_bits": act_bits, "weight_bytes_quantized": stored,
                      "weight_bytes_fp": fp, "quantized_layers": len(layers)}
    assert 0.25 < stored / fp < 0.3


@needs_torchao
def test_min_features_leaves_narrow_layers_in_floating_point(tiny_pipe, ao):
    wide = [m for m in linears(tiny_pipe) if min(m.in_features, m.out_features) >= 64]
    assert 0 < len(wide) < len(linears(tiny_pipe))
    with apply(tiny_pipe, {"min_features": 64}) as handle:
        assert {m for m in linears(tiny_pipe) if isinstance(m.weight, ao.Int8Tensor)} == set(wide)
        assert handle.report["quantized_layers"] == len(wide)
        assert handle.report["weight_bytes_fp"] == sum(4 * m.weight.numel() for m in wide)


@needs_torchao
@pytest.mark.parametrize("mode", ["fp8_weight_only", "fp8_dynamic"])
def test_fp8_modes_on_a_cpu_are_refused_before_any_change(tiny_pipe, mode):
    before = state_fingerprint(tiny_pipe)
    with one_line_error(f"torchao mode={mode} needs a CUDA GPU with compute capability >= 8.9"):
        apply(tiny_pipe, {"mode": mode})
    assert_same_state(before, state_fingerprint(tiny_pipe))
    apply(tiny_pipe, {"mode": "int8_weight_only"}).remove()  # not left marked as applied


@needs_torchao
def test_a_failing_quantize_leaves_the_pipeline_as_it_was(tiny_pipe, ao, monkeypatch):
    real = ao.quantize_

    def quantize_then_fail(*args, **kwargs):
        real(*args, **kwargs)
        raise RuntimeError("kernel missing")

    before = state_fingerprint(tiny_pipe)
    monkeypatch.setattr(ao, "quantize_", quantize_then_fail)
    with pytest.raises(RuntimeError, match="kernel missing"):
        apply(tiny_pipe, {"mode": "int8_weight_only"})
    assert_same_state(before, state_fingerprint(tiny_pipe))
    assert not any(type(m.weight) is not torch.nn.Parameter for m in linears(tiny_pipe))
    monkeypatch.undo()
    apply(tiny_pipe, {"mode": "int8_weight_only"}).remove()


def test_listed_without_torchao_and_refused_in_one_line(tiny_pipe, monkeypatch):
    """Registration needs no torchao; apply names the package to install."""
    monkeypatch.setitem(sys.modules, "torchao", None)
    monkeypatch.setitem(sys.modules, "torchao.quantization", None)
    spec = METHODS.get("torchao")
    assert spec.doc and spec.config({"mode": "int8_dynamic"}).mode == "int8_dynamic"
    before = state_fingerprint(tiny_pipe)
    with one_line_error("method 'torchao' needs the torchao package .*pip install torchao"):
        apply(tiny_pipe, {})
    assert_same_state(before, state_fingerprint(tiny_pipe))


def test_int4_is_not_a_mode():
    with pytest.raises(DiffbenchError, match="torchao.mode"):
        METHODS.get("torchao").config({"mode": "int4_weight_only"})


def test_shares_the_weight_part_with_the_other_quantisers():
    assert METHODS.get("torchao").touches == frozenset(TOUCHES)
    with pytest.raises(DiffbenchError, match="cannot be stacked"):
        resolve_method("torchao+ptq_minmax")


def test_pipeline_without_a_denoiser_is_refused():
    with one_line_error("torchao needs a transformer .* or a UNet .*; DiTLike has"):
        apply(DiTLike(), {})
