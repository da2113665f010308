import types

import pytest
import torch

from harness.errors import DiffbenchError
from harness.method import METHODS
from harness.run.generate import call_kwargs, generate, to_uint8
from harness.steps import StepContext
from methods.tgate import phase_of
from tests.methods.contract import PROMPTS, MethodContract, run

STEPS = 6  # the contract's step count


def record(pipe, spec, params, guidance=5.0):
    """Steps of computed attn1 / attn2 (to_q calls), UNet batch sizes and predictions;
    params None runs the baseline."""
    method, ctx = METHODS.get("baseline" if params is None else "tgate"), StepContext()
    log = {"attn1": [], "attn2": [], "batch": [], "pred": []}
    hooks = [pipe.unet.conv_in.register_forward_hook(
        lambda m, a, o: log["batch"].append((ctx.step, a[0].shape[0])))]
    hooks.append(pipe.unet.register_forward_hook(
        lambda m, a, o: log["pred"].append((ctx.step, o[0]))))
    for name, mod in pipe.unet.named_modules():
        for kind in ("attn1", "attn2"):
            if name.endswith(kind):
                hooks.append(mod.to_q.register_forward_hook(
                    lambda m, a, o, k=kind: log[k].append(ctx.step)))
    try:
        with method.apply(pipe, method.config(params), ctx) as handle:
            kw = call_kwargs(spec, PROMPTS[:2], [1, 2], STEPS, guidance, 32, handle.call_kwargs)
            log["images"] = generate(pipe, ctx, kw)
    finally:
        for h in hooks:
            h.remove()
    return log


def per_step(steps):
    return [steps.count(s) for s in range(STEPS)]


class TestTGate(MethodContract):
    method = "tgate"
    identity_params = {"gate_step": 1000}
    active_params = {"gate_step": 2}

    def test_attn2_not_computed_after_gate(self, tiny_pipe, tiny_spec):
        base = per_step(record(tiny_pipe, tiny_spec, None)["attn2"])
        gated = per_step(record(tiny_pipe, tiny_spec, {"gate_step": 2})["attn2"])
        assert base[0] > 0 and base == [base[0]] * STEPS
        assert gated == base[:2] + [0] * (STEPS - 2)

    def test_unet_batch_is_halved_after_gate_and_prediction_duplicated(self, tiny_pipe,
                                                                       tiny_spec):
        log = record(tiny_pipe, tiny_spec, {"gate_step": 2})
        assert log["batch"] == [(s, 4 if s < 2 else 2) for s in range(STEPS)]
        for step, pred in log["pred"]:
            uncond, cond = pred.chunk(2)
            assert pred.shape[0] == 4 and torch.equal(uncond, cond) == (step >= 2)

    def test_without_guidance_batch_stays_and_attn2_is_still_cached(self, tiny_pipe, tiny_spec):
        log = record(tiny_pipe, tiny_spec, {"gate_step": 3}, guidance=1.0)
        assert [b for _, b in log["batch"]] == [2] * STEPS
        assert per_step(log["attn2"])[3:] == [0, 0, 0]
        base = record(tiny_pipe, tiny_spec, None, guidance=1.0)
        assert not torch.equal(log["images"], base["images"])

    def test_self_attention_interval_reuses_attn1(self, tiny_pipe, tiny_spec):
        plain = record(tiny_pipe, tiny_spec, {"gate_step": 2})
        cached = record(tiny_pipe, tiny_spec, {"gate_step": 2, "self_attn_interval": 2})
        n = per_step(plain["attn1"])[0]
        assert per_step(plain["attn1"]) == [n] * STEPS
        assert per_step(cached["attn1"]) == [n, n, n, 0, n, 0]  # fresh at steps % 2 == 0
        assert not torch.equal(plain["images"], cached["images"])

    def test_gate_at_step_count_is_identity_one_before_is_not(self, tiny_pipe, tiny_spec,
                                                              baseline_images):
        for gate, same in ((STEPS, True), (STEPS - 1, False)):
            ctx = StepContext()
            with self.apply(tiny_pipe, {"gate_step": gate}, ctx) as handle:
                images = run(tiny_pipe, tiny_spec, handle, PROMPTS[:2], ctx=ctx)
            assert torch.equal(images, baseline_images) == same, gate

    def test_call_outside_step_context_is_unchanged(self, tiny_pipe, tiny_spec):
        def plain():
            kw = call_kwargs(tiny_spec, ["a red circle"], [3], STEPS, 5.0, 32, {})
            with torch.inference_mode():
                return to_uint8(tiny_pipe(**kw).images)

        expected, ctx = plain(), StepContext()
        with self.apply(tiny_pipe, {"gate_step": 1}, ctx) as handle:
            run(tiny_pipe, tiny_spec, handle, PROMPTS[:1], ctx=ctx)
            assert torch.equal(plain(), expected)

    def test_pipeline_without_unet_is_refused(self):
        with pytest.raises(DiffbenchError, match="needs a UNet"):
            self.apply(types.SimpleNamespace(transformer=object()), {"gate_step": 2})

    def test_gate_step_zero_names_range(self):
        with pytest.raises(DiffbenchError, match=r"tgate.gate_step=0 is out of range"):
            METHODS.get("tgate").config({"gate_step": 0})


def test_phases():
    assert [phase_of(s, 6, 2) for s in range(6)] == ["plan", "gate"] + ["reuse"] * 4
    assert [phase_of(s, 6, 6) for s in range(6)] == ["plan"] * 6
    assert phase_of(7, 6, 2) == "plan"  # outside the runner's generation: untouched
