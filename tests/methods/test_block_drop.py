import pytest
import torch

from harness.errors import DiffbenchError
from harness.method import METHODS
from harness.steps import StepContext
from methods.block_drop import drop_count, unet_units
from tests.methods.contract import PROMPTS, MethodContract, run
from tests.methods.dit_fixtures import (
    count_calls,
    flops_of,
    generate_latents,
    module_flops,
    on_model,
    plain_call,
)


def _apply(pipe, params, ctx):
    spec = METHODS.get("block_drop")
    return spec.apply(pipe, spec.config(params), ctx)


class TestBlockDropOnUNet(MethodContract):
    """The contract on the tiny SD UNet (conftest's tiny_pipe)."""

    method = "block_drop"
    identity_params = {"drop_max": 0}
    active_params = {"drop_max": 3, "until": 0.7}


class TestBlockDropOnDiT(TestBlockDropOnUNet):
    active_params = {"drop_max": 2}

    @pytest.fixture()
    def tiny_pipe(self, dit_pipe):
        return dit_pipe

    @pytest.fixture()
    def tiny_spec(self, dit_spec):
        return dit_spec


class TestBlockDropOnPixArt(TestBlockDropOnDiT):
    @pytest.fixture()
    def tiny_pipe(self, pixart_pipe):
        return pixart_pipe

    @pytest.fixture()
    def tiny_spec(self, pixart_spec):
        return pixart_spec


@pytest.mark.parametrize("schedule,drop_max,until,expected", [
    ("linear", 2, 0.5, [2, 2, 2, 1, 1, 0, 0, 0, 0, 0]),
    ("linear", 4, 1.0, [4, 4, 4, 3, 3, 2, 2, 2, 1, 1]),
    ("step", 3, 0.3, [3, 3, 3, 0, 0, 0, 0, 0, 0, 0]),
    ("step", 3, 0.0, [0] * 10),
    ("linear", 0, 1.0, [0] * 10),
])
def test_drop_schedule(schedule, drop_max, until, expected):
    assert [drop_count(s, 10, drop_max, schedule, until) for s in range(10)] == expected


def test_drop_count_never_increases_and_is_zero_outside_a_generation():
    counts = [drop_count(s, 50, 7, "linear", 0.8) for s in range(50)]
    assert counts[0] == 7 and counts[-1] == 0
    assert all(a >= b for a, b in zip(counts, counts[1:]))
    assert drop_count(50, 50, 7, "step", 1.0) == 0 and drop_count(0, 0, 7, "step", 1.0) == 0


@pytest.mark.parametrize("pipe_name", ["dit", "pixart"])
def test_last_blocks_skipped_per_schedule(request, pipe_name):
    pipe = request.getfixturevalue(f"{pipe_name}_pipe")
    spec = request.getfixturevalue(f"{pipe_name}_spec")
    probes = {i: b.attn1.to_q for i, b in enumerate(pipe.transformer.transformer_blocks)}
    steps, ctx = 10, StepContext()
    with _apply(pipe, {"drop_max": 3, "schedule": "linear", "until": 0.6}, ctx):
        with count_calls(probes) as counts:
            generate_latents(pipe, spec, ctx, steps)
    ks = [drop_count(s, steps, 3, "linear", 0.6) for s in range(steps)]
    assert ks == [3, 3, 2, 2, 1, 1, 0, 0, 0, 0]
    # block i runs on the steps where it is not among the last k
    assert dict(counts) == {i: sum(i < 4 - k for k in ks) for i in range(4)}


def test_dit_flops_saved_equal_the_dropped_blocks(dit_pipe, dit_spec):
    per_block = module_flops(dit_pipe, dit_spec, ["transformer_blocks.3"])
    steps = 10
    base = flops_of(dit_pipe, dit_spec, StepContext(), steps)
    ctx = StepContext()
    with _apply(dit_pipe, {"drop_max": 2, "schedule": "step", "until": 0.5}, ctx):
        dropped = flops_of(dit_pipe, dit_spec, ctx, steps)
    assert base - dropped == 5 * 2 * per_block > 0


def test_unet_units_deepest_first(tiny_pipe):
    names = [name for name, *_ in unet_units(tiny_pipe.unet)]
    assert names == ["mid_block", "down_blocks.0.attentions.0", "down_blocks.0.resnets.0",
                     "up_blocks.1.attentions.0", "up_blocks.1.attentions.1"]


def test_unet_drops_mid_block_first_then_deeper_layers(tiny_pipe, tiny_spec):
    unet = tiny_pipe.unet
    probes = {"mid": unet.mid_block.resnets[0].conv1,
              "down_attn": unet.down_blocks[0].attentions[0].proj_in,
              "down_resnet": unet.down_blocks[0].resnets[0].conv1,
              "up_attn0": unet.up_blocks[1].attentions[0].proj_in}
    ctx = StepContext()
    with _apply(tiny_pipe, {"drop_max": 3, "schedule": "step", "until": 0.5}, ctx):
        with count_calls(probes) as counts:
            run(tiny_pipe, tiny_spec, None, PROMPTS[:1], ctx=ctx, steps=6)
    # 3 of 6 steps drop the mid block and the two down-block layers; up_blocks.1 always runs
    assert dict(counts) == {"mid": 3, "down_attn": 3, "down_resnet": 3, "up_attn0": 6}


def test_unet_flops_drop(tiny_pipe, tiny_spec):
    from metrics.flops import count_flops

    def flops(ctx, handle=None):
        return count_flops(lambda: run(tiny_pipe, tiny_spec, handle, PROMPTS[:1], ctx=ctx))

    base = flops(StepContext())
    ctx = StepContext()
    with _apply(tiny_pipe, {"drop_max": 1}, ctx) as handle:
        mid_only = flops(ctx, handle)
    ctx = StepContext()
    with _apply(tiny_pipe, {"drop_max": 5}, ctx) as handle:
        more = flops(ctx, handle)
    assert more < mid_only < base


def test_plain_call_while_applied_is_exact(dit_pipe, dit_spec):
    expected = plain_call(dit_pipe, dit_spec)
    ctx = StepContext()
    with _apply(dit_pipe, {"drop_max": 3}, ctx):
        generate_latents(dit_pipe, dit_spec, ctx, 5)
        assert torch.equal(plain_call(dit_pipe, dit_spec), expected)


@pytest.mark.parametrize("pipe_name,drop_max,message", [
    ("dit_pipe", 4, r"drop_max=4 is out of range for this transformer; allowed \[0, 3\]$"),
    ("tiny_pipe", 6, r"drop_max=6 is out of range for this UNet; allowed \[0, 5\]$"),
])
def test_drop_max_beyond_the_denoiser_names_allowed_range(request, pipe_name, drop_max, message):
    pipe = request.getfixturevalue(pipe_name)
    with pytest.raises(DiffbenchError, match=r"^block_drop\." + message):
        _apply(pipe, {"drop_max": drop_max}, StepContext())


def test_pipeline_without_denoiser_is_refused_in_one_line():
    class Pipe:
        pass

    with pytest.raises(DiffbenchError) as err:
        _apply(Pipe(), {"drop_max": 1}, StepContext())
    assert "\n" not in str(err.value) and str(err.value).endswith("Pipe has neither")


def test_bad_schedule_names_choices():
    with pytest.raises(DiffbenchError, match=r"block_drop.schedule='cosine' is not allowed"):
        METHODS.get("block_drop").config({"schedule": "cosine"})


TestBlockDropOnMiniSD3 = on_model(TestBlockDropOnDiT, "sd3")

TestBlockDropOnTinyFlux = on_model(TestBlockDropOnDiT, "flux")

TestBlockDropOnTinySD3 = on_model(TestBlockDropOnDiT, "tiny_sd3")
