from __future__ import annotations

import pytest
import torch

from harness.errors import DiffbenchError
from harness.method import METHODS
from harness.run.generate import call_kwargs
from harness.steps import StepContext
from methods.frdiff import mix_weight, reused_modules
from tests.methods.contract import DiTLike, MethodContract, one_line_error


class TestFRDiff(MethodContract):
    method = "frdiff"
    identity_params = {"keyframe": 1, "mix": False}
    active_params = {"keyframe": 3}

    def test_pure_feature_reuse_also_changes_output(self, tiny_pipe, tiny_spec, baseline_images):
        type(self).active_params = {"keyframe": 2, "mix": False}
        try:
            self.test_active_setting_changes_output(tiny_pipe, tiny_spec, baseline_images)
        finally:
            type(self).active_params = {"keyframe": 3}

    def test_keyframe_zero_is_refused_with_range(self):
        with one_line_error(r"frdiff.keyframe=0 is out of range"):
            METHODS.get("frdiff").config({"keyframe": "0"})

    def test_b_out_of_range_names_field(self):
        with pytest.raises(DiffbenchError, match=r"frdiff.b=1.5 is out of range; allowed \[0.0"):
            METHODS.get("frdiff").config({"b": 1.5})

    def test_transformer_pipeline_is_refused(self):
        with one_line_error("frdiff needs a UNet pipeline"):
            self.apply(DiTLike(), {"keyframe": 3})


def _generate(pipe, spec, params, steps=6):
    ctx = StepContext()
    method = METHODS.get("frdiff")
    kw = call_kwargs(spec, ["a red circle"], [1], steps, 5.0, 32, {})
    with method.apply(pipe, method.config(params), ctx), torch.inference_mode():
        ctx.generate(pipe, **kw)


def _count_calls(module: torch.nn.Module, attr: str, monkeypatch) -> list[int]:
    """Count real calls of `module.<attr>` (an inner function the cached path never reaches)."""
    calls = [0]
    inner = getattr(module, attr)

    def counted(*args, **kwargs):
        calls[0] += 1
        return inner(*args, **kwargs)

    monkeypatch.setattr(module, attr, counted)
    return calls


def test_residual_branches_run_only_on_keyframes(tiny_pipe, tiny_spec, monkeypatch):
    """6 steps, M = 3, no mixing: attention and conv1 run on keyframes 0 and 3 only."""
    unet = tiny_pipe.unet
    attn = _count_calls(unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1,
                        "forward", monkeypatch)
    conv1 = _count_calls(unet.mid_block.resnets[0].conv1, "_conv_forward", monkeypatch)
    conv2 = _count_calls(unet.mid_block.resnets[0].conv2, "_conv_forward", monkeypatch)
    _generate(tiny_pipe, tiny_spec, {"keyframe": 3, "mix": False})
    assert (attn[0], conv1[0], conv2[0]) == (2, 2, 6)  # conv2 (not reused) runs every step


def test_jump_steps_skip_the_unet(tiny_pipe, tiny_spec, monkeypatch):
    """b = 1: lambda = 0 on every non-key step, which reuses the keyframe score (reduced NFE)."""
    conv_in = _count_calls(tiny_pipe.unet.conv_in, "_conv_forward", monkeypatch)
    _generate(tiny_pipe, tiny_spec, {"keyframe": 3, "b": 1.0})
    assert conv_in[0] == 2


def test_default_schedule_jumps_early_and_reuses_late(tiny_pipe, tiny_spec, monkeypatch):
    """b = 0.5 over 6 steps, M = 3: steps 1, 2 jump (no UNet), 4, 5 reuse features."""
    unet = tiny_pipe.unet
    conv_in = _count_calls(unet.conv_in, "_conv_forward", monkeypatch)
    conv1 = _count_calls(unet.mid_block.resnets[0].conv1, "_conv_forward", monkeypatch)
    _generate(tiny_pipe, tiny_spec, {"keyframe": 3, "b": 0.5})
    assert (conv_in[0], conv1[0]) == (4, 2)


def test_mixed_score_is_lambda_weighted(tiny_pipe):
    """A non-key step returns lambda eps_FR + (1 - lambda) eps_keyframe (paper, Score Mixing)."""
    unet = tiny_pipe.unet
    gen = torch.Generator().manual_seed(0)
    x0, x1 = (torch.randn(2, 4, 8, 8, generator=gen) for _ in range(2))
    text = torch.randn(2, 7, 32, generator=gen)
    method = METHODS.get("frdiff")

    def two_steps(params):
        ctx = StepContext()
        ctx.begin(4, guidance=True)
        with method.apply(tiny_pipe, method.config(params), ctx), torch.inference_mode():
            key = unet(x0, 900, encoder_hidden_states=text, return_dict=False)[0]
            ctx.step = 1
            return key, unet(x1, 700, encoder_hidden_states=text).sample

    key, fr = two_steps({"keyframe": 2, "mix": False})
    lam = mix_weight(1 / 4, 0.3, 10.0)
    assert 0.0 < lam < 1.0
    key2, mixed = two_steps({"keyframe": 2, "b": 0.3, "slope": 10.0})
    assert torch.equal(key, key2)
    assert torch.allclose(mixed, lam * fr + (1 - lam) * key, atol=1e-6)
    with torch.inference_mode():
        full = unet(x1, 700, encoder_hidden_states=text).sample
    assert not torch.allclose(fr, full, atol=1e-4)  # FR really reused stale branches
    assert not torch.allclose(fr, key, atol=1e-4)  # ... and recomputed the rest


def test_flops_saved_equal_reused_branches(tiny_pipe, tiny_spec):
    """FLOPs(baseline) - FLOPs(FR, M) = (T - K) x FLOPs of the cached branches per UNet call."""
    from torch.utils.flop_counter import FlopCounterMode

    from metrics.flops import count_flops, register_attention_formulas

    register_attention_formulas()
    kw = lambda steps: call_kwargs(tiny_spec, ["a red circle"], [1], steps, 5.0, 32, {})  # noqa
    with FlopCounterMode(display=False) as counter:
        StepContext().generate(tiny_pipe, **kw(1))
    counts = counter.get_flop_counts()
    names = [name for name, _, _ in reused_modules(tiny_pipe.unet)]
    branches = sum(sum(counts[f"UNet2DConditionModel.{name}"].values()) for name in names)
    assert branches > 0
    steps, m = 8, 3
    base = count_flops(lambda: StepContext().generate(tiny_pipe, **kw(steps)))
    spec, ctx = METHODS.get("frdiff"), StepContext()
    with spec.apply(tiny_pipe, spec.config({"keyframe": m, "mix": False}), ctx):
        reused = count_flops(lambda: ctx.generate(tiny_pipe, **kw(steps)))
    assert base - reused == (steps - len(range(0, steps, m))) * branches


def test_reused_modules_of_sd_layout(tiny_pipe):
    kinds = [kind for _, _, kind in reused_modules(tiny_pipe.unet)]
    assert kinds.count("transformer") == 4  # down 0, mid, up 1 (x2)
    assert kinds.count("conv1") == 8  # resnets: down 1 + 1, mid 2, up 2 + 2


@pytest.mark.parametrize("r,expected", [(0.0, 0.0), (0.4, 0.0), (0.5, 0.5), (0.6, 1.0),
                                        (1.0, 1.0), (0.5 + 1 / 30, 0.75)])
def test_mix_weight_schedule(r, expected):
    assert mix_weight(r, 0.5, 30.0) == pytest.approx(expected)


def test_call_outside_step_context_is_exact(tiny_pipe, tiny_spec):
    """A plain pipe(...) call is not counted by the runner's context: no reuse, no mixing."""
    from harness.run.generate import to_uint8

    def plain():
        kw = call_kwargs(tiny_spec, ["a red circle"], [3], 6, 5.0, 32, {})
        with torch.inference_mode():
            return to_uint8(tiny_pipe(**kw).images)

    expected = plain()
    spec, ctx = METHODS.get("frdiff"), StepContext()
    with spec.apply(tiny_pipe, spec.config({"keyframe": 3}), ctx):
        ctx.generate(tiny_pipe, **call_kwargs(tiny_spec, ["x"], [1], 6, 5.0, 32, {}))
        assert torch.equal(plain(), expected)
