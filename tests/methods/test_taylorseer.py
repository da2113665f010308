import copy

import pytest
import torch

from harness.method import METHODS
from harness.steps import StepContext
from methods.taylorseer import forecast, is_full_step, updated
from tests.methods.contract import MethodContract, one_line_error
from tests.methods.dit_fixtures import count_calls, generate_latents, on_model, pipe_kwargs


class TaylorSeerContract(MethodContract):
    """TaylorSeer on every block's attention and MLP branches."""

    method = "taylorseer"
    identity_params = {"interval": 1}
    active_params = {"interval": 3, "order": 2, "warmup": 2}

    def test_branches_run_only_on_full_steps(self, tiny_pipe, tiny_spec):
        block = tiny_pipe.transformer.transformer_blocks[0]
        attn = getattr(block, "attn", None) or block.attn1
        probes = {"attn": attn.to_q, "norm": block.norm1}
        ctx, steps = StepContext(), 9
        with self.apply(tiny_pipe, self.active_params, ctx), count_calls(probes) as counts:
            generate_latents(tiny_pipe, tiny_spec, ctx, steps=steps)
        full = [s for s in range(steps) if is_full_step(s, 3, 2)]
        assert full == [0, 1, 4, 7]
        assert counts["attn"] == len(full) and counts["norm"] == steps  # the block still runs


for prefix in ("dit", "sd3", "flux", "tiny_sd3", "pixart"):
    globals()[f"TestTaylorSeerOn{prefix.title().replace('_', '')}"] = on_model(
        TaylorSeerContract, prefix)


@pytest.mark.parametrize("interval,warmup,expected", [
    (5, 3, [0, 1, 2, 7]), (2, 3, [0, 1, 2, 4, 6]), (3, 1, [0, 3, 6]), (1, 1, list(range(8)))])
def test_full_steps(interval, warmup, expected):
    assert [s for s in range(8) if is_full_step(s, interval, warmup)] == expected


def test_factors_are_backward_divided_differences():
    """Order 2 on F(s) = a + b s + c s^2 at full steps s = 0, 2, 4: D1 = (F(4) - F(2)) / 2 =
    b + 6c, D2 = 2c, and the forecast one step on is F(4) + D1 + D2 / 2."""
    a, b, c = torch.tensor(1.0), torch.tensor(-0.5), torch.tensor(0.25)
    f = lambda s: a + b * s + c * s * s  # noqa: E731
    factors = None
    for s, last in ((0, None), (2, 0), (4, 2)):
        factors = updated(factors, f(s), s - last if last is not None else 0, 2)
    assert [x.item() for x in factors] == pytest.approx([f(4).item(), (b + 6 * c).item(),
                                                          (2 * c).item()])
    assert forecast(factors, 1).item() == pytest.approx((f(4) + b + 6 * c + c).item())
    assert len(updated(None, f(0), 0, 2)) == 1  # the first full step: order 0 only


@pytest.mark.parametrize("order", [0, 1, 2])
def test_equals_diffusers_taylorseer_where_schedules_agree(flux_pipe, flux_spec, order):
    """diffusers' TaylorSeerCache (attention layers, float32 factors) on a copy of tiny-flux:
    bit-identical at interval 2 with warm-up 3, where its schedule (full at s < 3 and
    (s - 4) % N == 0) and ours (s < 3 and (s - 2) % N == 0) pick the same steps."""
    from diffusers.hooks import TaylorSeerCacheConfig

    reference = copy.deepcopy(flux_pipe)
    reference.transformer.enable_cache(TaylorSeerCacheConfig(
        cache_interval=2, disable_cache_before_step=3, max_order=order,
        taylor_factors_dtype=torch.float32))
    with torch.inference_mode():
        expected = torch.as_tensor(reference(**pipe_kwargs(flux_spec, steps=12)).images)
    method, ctx = METHODS.get("taylorseer"), StepContext()
    config = method.config({"interval": 2, "warmup": 3, "order": order, "targets": "attention"})
    with method.apply(flux_pipe, config, ctx):
        ours = generate_latents(flux_pipe, flux_spec, ctx, steps=12)
    assert (ours - expected).abs().max().item() == 0.0


def test_unet_pipeline_is_refused_in_one_line(tiny_pipe):
    method = METHODS.get("taylorseer")
    with one_line_error("transformer"):
        method.apply(tiny_pipe, method.config({}), StepContext())
