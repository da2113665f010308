"""FLOP counting: analytic counts, CPU SDPA, int8 matmuls, fake tensors equal to real."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils import flop_counter

from harness.metric import METRICS, Observation
from metrics.flops import (
    Flops,
    achieved_tflops,
    count_flops,
    count_flops_fake,
    mfu,
    register_attention_formulas,
)
from tests.metrics.contract import MetricContract


def test_linear_is_2mnk():
    m, k, n = 7, 33, 19
    layer, x = nn.Linear(k, n), torch.randn(m, k)
    assert count_flops(lambda: layer(x)) == 2 * m * n * k
    assert count_flops_fake(lambda: layer(x)) == 2 * m * n * k


def test_conv_is_2_times_output_times_kernel_volume():
    conv, x = nn.Conv2d(3, 8, kernel_size=3, padding=1), torch.randn(2, 3, 10, 10)
    assert count_flops(lambda: conv(x)) == 2 * (2 * 8 * 10 * 10) * (3 * 3 * 3)


def test_cpu_sdpa_counted_like_explicit_attention():
    q, k, v = torch.randn(2, 4, 16, 8), torch.randn(2, 4, 24, 8), torch.randn(2, 4, 24, 8)
    fused = count_flops(lambda: nn.functional.scaled_dot_product_attention(q, k, v))
    explicit = count_flops(lambda: (q @ k.transpose(-1, -2) * 8**-0.5).softmax(-1) @ v)
    assert fused == explicit == 2 * 2 * 4 * 16 * 24 * (8 + 8)
    register_attention_formulas()  # idempotent
    assert torch.ops.aten._scaled_dot_product_flash_attention_for_cpu in flop_counter.flop_registry


def test_int_mm_counted_like_mm():
    # M > 16 and K, N multiples of 8: the shapes torch._int_mm takes on every backend (CUDA)
    m, k, n = 32, 24, 40
    a = torch.randint(-128, 128, (m, k), dtype=torch.int8)
    b = torch.randint(-128, 128, (k, n), dtype=torch.int8)
    assert count_flops(lambda: torch._int_mm(a, b)) == 2 * m * n * k
    assert count_flops_fake(lambda: torch._int_mm(a, b)) == 2 * m * n * k
    assert count_flops(lambda: a.float() @ b.float()) == 2 * m * n * k
    assert torch.ops.aten._int_mm in flop_counter.flop_registry


def test_torchao_int8_dynamic_counts_like_float():
    pytest.importorskip("torchao", reason="torchao is not installed (pip install torchao)")
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 32))
    x = torch.randn(2, 24, 64)
    float_flops = count_flops(lambda: model(x))
    quantize_(model, Int8DynamicActivationInt8WeightConfig(set_inductor_config=False))
    assert type(model[0].weight) is not nn.Parameter  # torchao's int8 tensor subclass
    quant_flops = count_flops(lambda: model(x))
    assert float_flops == 2 * 2 * 24 * (64 * 128 + 128 * 32)
    assert quant_flops == pytest.approx(float_flops, rel=0.01)


def test_fake_mode_allocates_nothing():
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode(allow_non_fake_inputs=True)
    with mode:
        layer = nn.Linear(100_000, 100_000, bias=False)  # 40 GB if it were real
    flops = count_flops_fake(lambda: layer(torch.randn(8, 100_000)), mode=mode)
    assert flops == 2 * 8 * 100_000 * 100_000


@pytest.fixture(scope="module")
def pipe():
    from harness.models import MODELS, load_pipeline

    return load_pipeline(MODELS.get("tiny-sd"), "none", torch.float32, "cpu")


def _call(pipe):
    from harness.models import text_to_image_kwargs

    return lambda: pipe(**text_to_image_kwargs(["a red circle"], 10, 5.0, 32,
                                               [torch.Generator().manual_seed(0)]))


def test_fake_equals_real_on_whole_tiny_sd_call(pipe):
    reference = _call(pipe)().images
    real = count_flops(_call(pipe))
    fake = count_flops_fake(_call(pipe), pipe=pipe)
    assert fake == real > 0
    assert not {"step", "set_timesteps", "scale_model_input"} & set(pipe.scheduler.__dict__)
    assert torch.equal(_call(pipe)().images, reference)


def test_fake_under_the_step_context(pipe):
    from harness.models import text_to_image_kwargs
    from harness.steps import StepContext

    ctx = StepContext()
    kwargs = text_to_image_kwargs(["a red circle"], 10, 5.0, 32, [torch.Generator().manual_seed(0)])
    fake = count_flops_fake(lambda: ctx.generate(pipe, **kwargs), pipe=pipe)
    assert fake == count_flops(_call(pipe)) and ctx.step == 10
    assert "step" not in pipe.scheduler.__dict__


def test_fake_without_scheduler_patch_fails_on_timestep_branches(pipe):
    from torch._subclasses.fake_tensor import DataDependentOutputException

    with pytest.raises(DataDependentOutputException):
        count_flops_fake(_call(pipe))


def test_metric_and_helpers():
    obs = [Observation(n_images=1, flops=10), Observation(n_images=3, flops=50),
           Observation(n_images=1)]
    whole, a, b = Flops(), Flops(), Flops()
    for o in obs:
        whole.update(o)
    a.update(obs[0])
    b.update(obs[1])
    a.merge(b)
    assert whole.compute() == a.compute() == {"flops_per_image": 15.0}
    assert Flops().compute() == {"flops_per_image": None}
    assert METRICS.get("flops") is Flops
    assert achieved_tflops(3e12, 2.0) == 1.5
    assert mfu(3e12, 2.0, 15.0) == pytest.approx(0.1)


class TestFlopsContract(MetricContract):
    metric_name = "flops"

    def make_metric(self):
        return Flops()

    def observations(self):
        return [Observation(n_images=1, flops=1001), Observation(n_images=2, seconds=0.5),
                Observation(n_images=2, flops=3000)]
