from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from harness.errors import DiffbenchError
from harness.method import METHODS
from harness.prepare import PrepareData
from harness.steps import StepContext
from methods._common.quant import fake_quant, grad_scale, qmax, quant_layers, weight_steps
from methods._common.quant_train import (
    QuantStudent,
    act_grad_scales,
    calibrate,
    distill_loss,
    lsq_optimizer,
    static_act_steps,
)
from tests.methods.contract import (
    PROMPTS,
    DiTLike,
    MethodContract,
    one_line_error,
    run,
)
from tests.methods.dit_fixtures import on_model

TINY_CALIB = {"calib_prompts": 2, "calib_steps": 2}
DATA = PrepareData(model="tiny-sd@none", prompts=tuple(PROMPTS), log=lambda _: None)


def image_error(contract: MethodContract, pipe, spec, baseline, params: dict) -> float:
    """Mean |image - baseline| in uint8 levels with the method applied."""
    ctx = StepContext()
    with contract.apply(pipe, params, ctx) as handle:
        images = run(pipe, spec, handle, PROMPTS[:2], ctx=ctx)
    return (images.float() - baseline.float()).abs().mean().item()


class QuantContract(MethodContract):
    """Quantisation: the 16-bit identity is within tolerance, not bit-exact."""

    identity_params = None
    base_params: dict = TINY_CALIB

    def test_16_bit_is_close_and_4_bit_is_not(self, tiny_pipe, tiny_spec, baseline_images):
        """Calibrated on the generation's 6 steps; what is left at 16 bits is clipping of values
        beyond the calibrated ranges (other seeds), well under one uint8 level on average."""
        params = {**self.base_params, "calib_steps": 6}
        high = image_error(self, tiny_pipe, tiny_spec, baseline_images,
                           {**params, "w_bits": 16, "a_bits": 16})
        low = image_error(self, tiny_pipe, tiny_spec, baseline_images,
                          {**params, "w_bits": 4, "a_bits": 4})
        assert high < 1.0, high
        assert low > 8 * max(high, 0.1), (high, low)

    def test_report_gives_bits_and_weight_bytes(self, tiny_pipe):
        denoiser = getattr(tiny_pipe, "unet", None) or tiny_pipe.transformer
        weights = [m.weight for m in denoiser.modules()
                   if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
        packed = sum(math.ceil(4 * w.numel() / 8) + 4 * w.shape[0] for w in weights)
        with self.apply(tiny_pipe, {**self.base_params, "w_bits": 4, "a_bits": 8}) as handle:
            report = dict(handle.report)
        assert report["weight_bits"] == 4 and report["act_bits"] == 8
        assert report["weight_bytes_fp"] == 4 * sum(w.numel() for w in weights)
        assert report["weight_bytes_quantized"] == packed
        assert report["quantized_layers"] == len(weights)

    def test_bits_out_of_range_names_field(self):
        with pytest.raises(DiffbenchError, match=rf"{self.method}.w_bits=1 is out of range"):
            METHODS.get(self.method).config({"w_bits": 1})
        with pytest.raises(DiffbenchError, match=r"allowed \[2, 16\]"):
            METHODS.get(self.method).config({"a_bits": 17})

    def test_pipeline_without_a_denoiser_is_refused(self):
        spec = METHODS.get(self.method)
        with one_line_error(f"{self.method} needs a transformer .* or a UNet .*; DiTLike has"):
            spec.apply(DiTLike(), spec.config(self.active_params), StepContext(), {
                self.method: {"a_step": torch.ones(1)}})

    def test_calibration_is_deterministic(self, tiny_pipe):
        spec = METHODS.get(self.method)
        config = spec.config(self.active_params)
        data = self.prepare_data()
        a, b = spec.prepare(tiny_pipe, config, data), spec.prepare(tiny_pipe, config, data)
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a)


class PTQMinMaxContract(QuantContract):
    method = "ptq_minmax"
    active_params = {**TINY_CALIB, "w_bits": 4, "a_bits": 4}


class TestPTQMinMax(PTQMinMaxContract):

    def test_static_step_is_max_over_all_timesteps(self, tiny_pipe):
        """conv_in's input step = max |latent| over the whole calibration trajectory / Qp."""
        seen: list[torch.Tensor] = []
        hook = tiny_pipe.unet.conv_in.register_forward_pre_hook(
            lambda m, args: seen.append(args[0].abs().max()))
        try:
            spec = METHODS.get(self.method)
            artifact = spec.prepare(tiny_pipe, spec.config({**TINY_CALIB, "a_bits": 8}), DATA)
        finally:
            hook.remove()
        assert len(seen) == 2  # one batch of 2 prompts x 2 steps: one UNet call per step
        assert artifact["a_step"][0].item() == pytest.approx(max(seen).item() / 127)

    def test_quantised_layer_computes_on_the_grid(self, tiny_pipe):
        """Inside the handle a Linear computes F.linear(q(x; s_a), q(W; s_w per channel), b)."""
        spec = METHODS.get(self.method)
        config = spec.config({**TINY_CALIB, "w_bits": 4, "a_bits": 4})
        artifact = spec.prepare(tiny_pipe, config, DATA)
        layers = quant_layers(tiny_pipe.unet)
        index, (name, layer) = next((i, item) for i, item in enumerate(layers)
                                    if isinstance(item[1], torch.nn.Linear))
        x = torch.randn(3, layer.in_features, generator=torch.Generator().manual_seed(0))
        wq = fake_quant(layer.weight, artifact[f"w_step.{name}"], 4)
        levels = (wq / artifact[f"w_step.{name}"]).round()
        assert levels.abs().max() <= qmax(4)
        expected = F.linear(fake_quant(x, artifact["a_step"][index], 4), wq, layer.bias)
        with spec.apply(tiny_pipe, config, StepContext(), {self.method: artifact}):
            out = layer(x)
        assert torch.allclose(out, expected, atol=1e-6)
        assert not torch.allclose(layer(x), expected, atol=1e-4)  # restored: full precision


# LSQ's relative step-size update grows with the bit width: at 16 bits one SGD step at the
# default lr 1e-3 moves weight steps by tens of percent (clipping weights), so tests use 1e-5
QAT_TINY = {"steps": 1, "batch_size": 2, "lr": 1e-5}


class TestLSQ(QuantContract):
    method = "lsq"
    base_params = {**TINY_CALIB, **QAT_TINY}
    active_params = {**base_params, "w_bits": 4, "a_bits": 4}


# the same contracts on the transformer denoisers (calibrated through their pipeline calls)
TestPTQMinMaxOnMiniSD3 = on_model(PTQMinMaxContract, "sd3")

TestPTQMinMaxOnTinyFlux = on_model(PTQMinMaxContract, "flux")

TestPTQMinMaxOnTinySD3 = on_model(PTQMinMaxContract, "tiny_sd3")

TestLSQOnTinyFlux = on_model(TestLSQ, "flux")  # one model: the replay loss is tdq-qat's too


def lsq_setup(pipe, train_weights: bool):
    """A W8A8 quantised student, its static input steps and the fixed-batch loss, as prepare."""
    config = METHODS.get("lsq").config({**TINY_CALIB, "w_bits": 8, "a_bits": 8,
                                        "batch_size": 2, "train_weights": train_weights})
    calib = calibrate(pipe, pipe.unet, config, DATA)
    student = QuantStudent(pipe.unet, config, weight_steps(quant_layers(pipe.unet), 8))
    a_step = torch.nn.Parameter(static_act_steps(calib, 8))
    g = act_grad_scales(calib, 8)

    def loss() -> torch.Tensor:
        return distill_loss(pipe, student, calib, 2, lambda t: grad_scale(a_step, g),
                            torch.Generator().manual_seed(7))

    return student, a_step, loss


@pytest.fixture
def two_threads():
    """torch at 2 intra-op threads for the test: on an Intel host at 1 thread (which an earlier
    test of the suite leaves behind) the straight-through steps below rose instead."""
    from harness.run.timing import fixed_threads

    with fixed_threads(2):
        yield


@pytest.mark.parametrize("train_weights", [False, True])
def test_qat_steps_lower_loss_and_train_only_quantisers(tiny_pipe, train_weights, two_threads):
    student, a_step, loss = lsq_setup(tiny_pipe, train_weights)
    before = {k: v.detach().clone() for k, v in student.denoiser.named_parameters()}
    steps_before = {k: v.detach().clone() for k, v in student.w_steps.items()}
    a_before = a_step.detach().clone()
    # a small lr; a single straight-through step need not descend, so three steps, and the
    # best of them must be below the start
    optimizer = lsq_optimizer([a_step, *student.parameters()], 1e-4)
    first, losses = loss().item(), []
    for _ in range(3):
        optimizer.zero_grad()
        loss().backward()
        optimizer.step()
        student.clamp_steps()
        losses.append(loss().item())
    assert min(losses) < first, (first, losses)
    assert not torch.equal(a_step, a_before)
    assert any(not torch.equal(student.w_steps[k], v) for k, v in steps_before.items())
    quant_weights = {f"{n}.weight" for n, _ in quant_layers(student.denoiser)}
    changed = {k for k, v in student.denoiser.named_parameters() if not torch.equal(v, before[k])}
    assert changed <= quant_weights
    assert bool(changed) == train_weights
    artifact = student.artifact(tiny_pipe.unet)
    assert {k.removeprefix("weight.") for k in artifact if k.startswith("weight.")} == changed


def test_methods_sharing_a_module_get_their_own_description():
    docs = {name: METHODS.get(name).doc for name in ("ptq_minmax", "lsq")}
    assert docs["ptq_minmax"] != docs["lsq"]
    assert "min-max" in docs["ptq_minmax"] and "LSQ" in docs["lsq"]
    assert METHODS.get("tdq").doc.startswith("TDQ")  # one method per module: module docstring
