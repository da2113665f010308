"""diffbench's T-GATE against the reference code (tgate 1.0.0, TgateSDLoader) on the same
pipeline and seeds: its default configuration (self-attention cached before and after the gate)
and the gate alone."""

from __future__ import annotations

import copy

import pytest
import torch

from harness.method import METHODS
from harness.run.generate import call_kwargs
from harness.steps import StepContext
from tests.methods.dit_fixtures import model_fixtures

tgate = pytest.importorskip("tgate", reason="reference tgate 1.0.0 not installed "
                            "(pip install --no-deps tgate==1.0.0)")

STEPS = 15
minisd_spec, minisd_pipe = model_fixtures("minisd", "mini-sd")

SETTINGS = {  # ours -> the reference's tgate() arguments
    "defaults": ({"gate_step": 10, "plan_self_attn_interval": 5, "warm_up": 2},
                 {"gate_step": 10, "sp_interval": 5, "fi_interval": 1, "warm_up": 2}),
    "gate only": ({"gate_step": 6}, {"gate_step": 6, "sp_interval": 1, "fi_interval": 1,
                                     "warm_up": 0}),
    "both phases": ({"gate_step": 8, "plan_self_attn_interval": 3, "warm_up": 1,
                     "self_attn_interval": 2},
                    {"gate_step": 8, "sp_interval": 3, "fi_interval": 2, "warm_up": 1}),
}


def arguments(spec):
    kw = call_kwargs(spec, ["a red circle on a blue background", "a small green star"], [1, 2],
                     STEPS, 5.0, 32, {})
    return {**kw, "output_type": "latent"}


@pytest.mark.parametrize("setting", list(SETTINGS))
@pytest.mark.parametrize("model", ["tiny", "minisd"])
def test_equals_the_reference(request, model, setting):
    pipe, spec = (request.getfixturevalue(f"{model}_{part}") for part in ("pipe", "spec"))
    ours_params, reference_params = SETTINGS[setting]
    method, ctx = METHODS.get("tgate"), StepContext()
    with method.apply(pipe, method.config(ours_params), ctx), torch.inference_mode():
        ours = ctx.generate(pipe, **arguments(spec)).images
    # the reference replaces every Attention forward for good: it gets its own copy
    reference_pipe = tgate.TgateSDLoader(copy.deepcopy(pipe))
    with torch.inference_mode():
        expected = reference_pipe.tgate(**arguments(spec), **reference_params).images
    assert (ours - expected).abs().max().item() == 0.0  # the same arithmetic: bit-identical


def test_plan_phase_schedule_by_hand():
    """gate 10, interval 5, warm-up 2: compute at 0-1, store at 2, reuse 3-4, store 5, reuse
    6-8 (step 9 is the gate step, not the plan phase)."""
    from methods.tgate import plan_action

    config = METHODS.get("tgate").config({"plan_self_attn_interval": 5, "warm_up": 2})
    assert [plan_action(s, config)[0] for s in range(9)] == list("ccsrrsrrr")
    off = METHODS.get("tgate").config({})
    assert {plan_action(s, off) for s in range(9)} == {"compute"}
