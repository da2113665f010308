"""Recorded pipeline calls of transformer denoisers: quantiser calibration through them, replay."""

from __future__ import annotations

import copy

import pytest
import torch

from harness.method import METHODS
from harness.prepare import PrepareData
from harness.run.generate import model_call
from methods._common.calls import replay_loss
from methods._common.quant import quant_layers
from methods._common.quant_train import calibrate_by_call
from tests.methods.contract import PROMPTS, one_line_error

STEPS = 3


def calibration(pipe, spec, prompts=PROMPTS):
    config = METHODS.get("ptq_minmax").config({"calib_prompts": len(prompts),
                                               "calib_steps": STEPS})
    data = PrepareData(model=f"{spec.name}@none", prompts=tuple(prompts), log=lambda _: None,
                       call_kwargs=model_call(spec))
    return calibrate_by_call(pipe, pipe.transformer, config, data, list(prompts), "ptq_minmax")


@pytest.fixture(params=["sd3", "flux"])
def model(request):
    return (request.getfixturevalue(f"{request.param}_pipe"),
            request.getfixturevalue(f"{request.param}_spec"))


def test_records_one_call_per_step_and_every_layer_at_every_step(model):
    pipe, spec = model
    calib = calibration(pipe, spec)
    assert [c.step for c in calib.calls] == list(range(STEPS))  # 3 prompts: one batch
    assert calib.timesteps.shape == (STEPS,)
    assert torch.equal(calib.timesteps, pipe.scheduler.timesteps.float())
    layers = quant_layers(pipe.transformer)
    assert calib.ranges.shape == (len(layers), STEPS) and (calib.ranges > 0).all()
    assert not pipe.transformer._forward_hooks and not pipe.transformer._forward_pre_hooks


def test_replaying_a_call_through_the_fp_copy_reproduces_its_output(model):
    """Every argument the pipeline passed was recorded (shared ids, batched rows sliced right):
    the unquantised copy on any subset of rows gives the recorded output."""
    pipe, spec = model
    calib = calibration(pipe, spec)
    student = copy.deepcopy(pipe.transformer).float()
    rows = calib.calls[0].rows
    assert rows == (2 * len(PROMPTS) if spec.name == "mini-sd3" else len(PROMPTS))  # CFG or not
    for seed in range(3):
        loss = replay_loss(student, calib.calls, 2, torch.Generator().manual_seed(seed))
        assert loss.item() < 1e-10


def test_the_input_range_is_that_of_the_pipeline_call(sd3_pipe, sd3_spec):
    """The patch embedding's input range at step k is max |latents| the pipeline fed at k."""
    seen: list[float] = []
    conv = sd3_pipe.transformer.pos_embed.proj
    hook = conv.register_forward_pre_hook(lambda m, args: seen.append(args[0].abs().max().item()))
    try:
        calib = calibration(sd3_pipe, sd3_spec)
    finally:
        hook.remove()
    index = [m for _, m in quant_layers(sd3_pipe.transformer)].index(conv)
    assert calib.ranges[index].tolist() == pytest.approx(seen)


def test_without_the_models_call_it_is_a_one_line_error(sd3_pipe):
    config = METHODS.get("tdq").config({"calib_prompts": 1, "calib_steps": 2})
    data = PrepareData(model="mini-sd3@none", prompts=tuple(PROMPTS))
    with one_line_error("tdq: training on SD3Transformer2DModel runs the model's pipeline call"):
        calibrate_by_call(sd3_pipe, sd3_pipe.transformer, config, data, ["x"], "tdq")
