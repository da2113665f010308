import pytest
import torch

from harness.errors import DiffbenchError
from harness.method import METHODS
from harness.steps import StepContext
from methods.delta_dit import cached_range
from tests.methods.contract import MethodContract
from tests.methods.dit_fixtures import (
    count_calls,
    flops_of,
    generate_latents,
    module_flops,
    on_model,
    plain_call,
)

DEPTH = 4  # blocks of the tiny DiT / PixArt


def _apply(pipe, params, ctx):
    spec = METHODS.get("delta_dit")
    return spec.apply(pipe, spec.config(params), ctx)


class TestDeltaDiT(MethodContract):
    method = "delta_dit"
    identity_params = {"interval": 1}
    active_params = {"interval": 2, "num_blocks": 2}

    @pytest.fixture()
    def tiny_pipe(self, dit_pipe):
        return dit_pipe

    @pytest.fixture()
    def tiny_spec(self, dit_spec):
        return dit_spec

    @pytest.mark.parametrize("switch", [0.0, 1.0])
    def test_front_only_and_rear_only_change_output(self, tiny_pipe, tiny_spec, baseline_images,
                                                    switch):
        type(self).active_params = {"interval": 3, "num_blocks": 1, "switch": switch}
        try:
            self.test_active_setting_changes_output(tiny_pipe, tiny_spec, baseline_images)
        finally:
            type(self).active_params = {"interval": 2, "num_blocks": 2}


class TestDeltaDiTOnPixArt(TestDeltaDiT):
    @pytest.fixture()
    def tiny_pipe(self, pixart_pipe):
        return pixart_pipe

    @pytest.fixture()
    def tiny_spec(self, pixart_spec):
        return pixart_spec


def test_rear_blocks_cached_early_front_blocks_late():
    """Sec. 3 stage-adaptive rule: before b the rear N_c blocks, from b on the front ones."""
    ranges = [cached_range(s, 10, 3, 28, 0.4) for s in range(10)]
    assert ranges == [(25, 28)] * 4 + [(0, 3)] * 6
    assert {cached_range(s, 10, 3, 28, 1.0) for s in range(10)} == {(25, 28)}
    assert {cached_range(s, 10, 3, 28, 0.0) for s in range(10)} == {(0, 3)}


def _block_probes(pipe):
    """Per block, a submodule that runs only when the block itself is computed."""
    return {i: block.attn1.to_q for i, block in enumerate(pipe.transformer.transformer_blocks)}


@pytest.mark.parametrize("pipe_name", ["dit", "pixart"])
def test_cached_range_skipped_on_non_key_steps(request, pipe_name):
    pipe = request.getfixturevalue(f"{pipe_name}_pipe")
    spec = request.getfixturevalue(f"{pipe_name}_spec")
    steps, interval, ctx = 8, 2, StepContext()
    with _apply(pipe, {"interval": interval, "num_blocks": 1, "switch": 0.5}, ctx):
        with count_calls(_block_probes(pipe)) as counts:
            generate_latents(pipe, spec, ctx, steps)
    # non-key steps 1, 3 skip the rear block 3; non-key steps 5, 7 skip the front block 0
    assert dict(counts) == {0: steps - 2, 1: steps, 2: steps, 3: steps - 2}


def test_skipped_range_output_is_input_plus_cached_delta(dit_pipe, dit_spec):
    """On a non-key step the range's output is its current input plus the key step's delta."""
    blocks = dit_pipe.transformer.transformer_blocks
    seen = {"in": [], "out": []}
    hooks = [blocks[2].register_forward_hook(lambda m, a, out: seen["in"].append(out)),
             blocks[3].register_forward_hook(lambda m, a, out: seen["out"].append(out))]
    ctx = StepContext()
    try:
        with _apply(dit_pipe, {"interval": 3, "num_blocks": 1, "switch": 1.0}, ctx):
            generate_latents(dit_pipe, dit_spec, ctx, 3)
    finally:
        for h in hooks:
            h.remove()
    delta = seen["out"][0] - seen["in"][0]
    assert not torch.equal(seen["in"][1], seen["in"][0])  # the input moved on
    for step in (1, 2):
        assert torch.equal(seen["out"][step], seen["in"][step] + delta)


def test_flops_saved_equal_the_skipped_blocks(dit_pipe, dit_spec):
    per_block = module_flops(dit_pipe, dit_spec, ["transformer_blocks.0"])
    assert per_block == module_flops(dit_pipe, dit_spec, ["transformer_blocks.3"]) > 0
    steps = 8
    base = flops_of(dit_pipe, dit_spec, StepContext(), steps)
    for interval, num_blocks in ((2, 1), (2, 3), (4, 2)):
        ctx = StepContext()
        with _apply(dit_pipe, {"interval": interval, "num_blocks": num_blocks}, ctx):
            cached = flops_of(dit_pipe, dit_spec, ctx, steps)
        skipped_steps = steps - len(range(0, steps, interval))
        assert base - cached == skipped_steps * num_blocks * per_block


def test_plain_call_while_applied_is_exact(dit_pipe, dit_spec):
    expected = plain_call(dit_pipe, dit_spec)
    ctx = StepContext()
    with _apply(dit_pipe, {"interval": 2}, ctx):
        generate_latents(dit_pipe, dit_spec, ctx, 5)
        assert torch.equal(plain_call(dit_pipe, dit_spec), expected)


def test_num_blocks_beyond_depth_names_allowed_range(dit_pipe):
    with pytest.raises(DiffbenchError, match=rf"num_blocks=5 .*allowed \[1, {DEPTH}\]$"):
        _apply(dit_pipe, {"num_blocks": 5}, StepContext())


def test_unet_pipeline_is_refused_in_one_line(tiny_pipe):
    with pytest.raises(DiffbenchError) as err:
        _apply(tiny_pipe, {}, StepContext())
    assert str(err.value) == ("delta_dit needs a transformer denoiser (pipe.transformer); "
                              "StableDiffusionPipeline has none")


def test_switch_out_of_range_is_refused():
    with pytest.raises(DiffbenchError, match=r"delta_dit.switch=1.5 is out of range"):
        METHODS.get("delta_dit").config({"switch": "1.5"})


TestDeltaDiTOnMiniSD3 = on_model(TestDeltaDiT, "sd3")

TestDeltaDiTOnTinyFlux = on_model(TestDeltaDiT, "flux")

TestDeltaDiTOnTinySD3 = on_model(TestDeltaDiT, "tiny_sd3")
