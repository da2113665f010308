import pytest

from harness.errors import DiffbenchError
from harness.method import METHODS
from methods.deepcache import deep_modules, key_steps
from tests.methods.contract import MethodContract


class TestDeepCache(MethodContract):
    method = "deepcache"
    identity_params = {"interval": 1}
    active_params = {"interval": 3}

    def test_quadratic_schedule_also_changes_output(self, tiny_pipe, tiny_spec, baseline_images):
        type(self).active_params = {"interval": 2, "schedule": "quadratic"}
        try:
            self.test_active_setting_changes_output(tiny_pipe, tiny_spec, baseline_images)
        finally:
            type(self).active_params = {"interval": 3}

    def test_branch_out_of_range_names_allowed_range(self, tiny_pipe):
        with pytest.raises(DiffbenchError, match=r"deepcache.branch=6 .* allowed \[0, 5\]$"):
            self.apply(tiny_pipe, {"branch": 6})  # 2 down blocks: ids 3 x block + layer < 6

    def test_interval_zero_is_refused_with_range(self):
        with pytest.raises(DiffbenchError, match=r"deepcache.interval=0 is out of range"):
            METHODS.get("deepcache").config({"interval": "0"})

    def test_deep_modules_of_sd_layout(self, tiny_pipe):
        """Branch 0: only conv_in, the last layer of the last up block and conv_out stay live;
        branch 2 (= 3 x 0 + 2) keeps the whole first down/up pair but its downsampler."""
        names = lambda branch: [n for n, _ in deep_modules(tiny_pipe.unet, branch)]  # noqa: E731
        assert names(0) == ["down_blocks.0", "down_blocks.1", "mid_block", "up_blocks.0",
                            "up_blocks.1.resnets.0", "up_blocks.1.attentions.0"]
        assert names(2) == ["down_blocks.0.downsamplers.0", "down_blocks.1", "mid_block",
                            "up_blocks.0"]
        assert names(3) == ["down_blocks.1", "mid_block", "up_blocks.0.resnets.0"]


@pytest.mark.parametrize("steps,interval", [(50, 3), (10, 3), (25, 5), (7, 1), (20, 20)])
@pytest.mark.parametrize("schedule", ["uniform", "quadratic"])
def test_key_steps_count_and_start(steps, interval, schedule):
    keys = key_steps(steps, interval, schedule)
    assert 0 in keys and all(0 <= k < steps for k in keys)
    assert len(keys) == -(-steps // interval)


def test_quadratic_keys_are_denser_near_centre():
    keys = sorted(key_steps(50, 3, "quadratic", center=0.3))
    gaps = {k: b - a for k, a, b in zip(keys[1:], keys, keys[1:])}
    near = [g for k, g in gaps.items() if 10 <= k <= 20]
    far = [g for k, g in gaps.items() if k >= 40]
    assert max(near) < min(far)


def test_flops_saved_equal_skipped_deep_modules(tiny_pipe, tiny_spec):
    """FLOPs(baseline) - FLOPs(DeepCache N) = (T - K) x FLOPs of the deep modules per UNet call."""
    from torch.utils.flop_counter import FlopCounterMode

    from harness.run.generate import call_kwargs
    from harness.steps import StepContext
    from metrics.flops import count_flops, register_attention_formulas

    register_attention_formulas()
    kw = lambda steps: call_kwargs(tiny_spec, ["a red circle"], [1], steps, 5.0, 32, {})  # noqa
    with FlopCounterMode(display=False) as counter:
        StepContext().generate(tiny_pipe, **kw(1))
    counts = counter.get_flop_counts()
    deep = sum(sum(counts[f"UNet2DConditionModel.{name}"].values())
               for name, _ in deep_modules(tiny_pipe.unet, 0))
    steps, interval = 20, 3
    base = count_flops(lambda: StepContext().generate(tiny_pipe, **kw(steps)))
    spec, ctx = METHODS.get("deepcache"), StepContext()
    with spec.apply(tiny_pipe, spec.config({"interval": interval}), ctx):
        cached = count_flops(lambda: ctx.generate(tiny_pipe, **kw(steps)))
    skipped = steps - len(key_steps(steps, interval))
    assert base - cached == skipped * deep


def test_call_outside_step_context_never_reuses(tiny_pipe, tiny_spec):
    """A plain pipe(...) call is not counted by the runner's context: DeepCache stays exact."""
    import torch

    from harness.run.generate import call_kwargs, to_uint8
    from harness.steps import StepContext

    def plain():
        kw = call_kwargs(tiny_spec, ["a red circle"], [3], 6, 5.0, 32, {})
        with torch.inference_mode():
            return to_uint8(tiny_pipe(**kw).images)

    expected = plain()
    spec, ctx = METHODS.get("deepcache"), StepContext()
    with spec.apply(tiny_pipe, spec.config({"interval": 3}), ctx):
        ctx.generate(tiny_pipe, **call_kwargs(tiny_spec, ["x"], [1], 6, 5.0, 32, {}))
        assert torch.equal(plain(), expected)
