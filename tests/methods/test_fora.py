import pytest
import torch

from harness.errors import DiffbenchError
from harness.method import METHODS
from harness.steps import StepContext
from methods.fora import is_key_step
from tests.methods.contract import MethodContract
from tests.methods.dit_fixtures import (
    count_calls,
    flops_of,
    generate_latents,
    module_flops,
    on_model,
    plain_call,
)


def _apply(pipe, params, ctx):
    spec = METHODS.get("fora")
    return spec.apply(pipe, spec.config(params), ctx)


class TestFora(MethodContract):
    method = "fora"
    identity_params = {"interval": 1}
    active_params = {"interval": 3}

    @pytest.fixture()
    def tiny_pipe(self, dit_pipe):
        return dit_pipe

    @pytest.fixture()
    def tiny_spec(self, dit_spec):
        return dit_spec

    def test_start_step_also_changes_output(self, tiny_pipe, tiny_spec, baseline_images):
        type(self).active_params = {"interval": 2, "start_step": 2}
        try:
            self.test_active_setting_changes_output(tiny_pipe, tiny_spec, baseline_images)
        finally:
            type(self).active_params = {"interval": 3}


class TestForaOnPixArt(TestFora):
    """The same contract on PixArt-alpha (adaLN-single blocks with cross-attention)."""

    @pytest.fixture()
    def tiny_pipe(self, pixart_pipe):
        return pixart_pipe

    @pytest.fixture()
    def tiny_spec(self, pixart_spec):
        return pixart_spec


@pytest.mark.parametrize("interval,start,expected", [
    (1, 0, [0, 1, 2, 3, 4, 5, 6, 7]), (3, 0, [0, 3, 6]), (2, 3, [0, 1, 2, 3, 5, 7]),
    (10, 0, [0])])
def test_key_steps(interval, start, expected):
    assert [s for s in range(8) if is_key_step(s, interval, start)] == expected


def _layer_probes(pipe):
    """Per cached layer, a submodule that runs only when the layer is computed (not cached)."""
    probes = {}
    for i, block in enumerate(pipe.transformer.transformer_blocks):
        probes[f"{i}.attn1"], probes[f"{i}.ff"] = block.attn1.to_q, block.ff.net[0]
        if block.attn2 is not None:
            probes[f"{i}.attn2"] = block.attn2.to_q
    return probes


@pytest.mark.parametrize("pipe_name", ["dit", "pixart"])
@pytest.mark.parametrize("interval,start", [(3, 0), (2, 3)])
def test_layers_run_only_on_key_steps(request, pipe_name, interval, start):
    pipe = request.getfixturevalue(f"{pipe_name}_pipe")
    spec = request.getfixturevalue(f"{pipe_name}_spec")
    probes = _layer_probes(pipe)
    steps, ctx = 8, StepContext()
    keys = sum(is_key_step(s, interval, start) for s in range(steps))
    with _apply(pipe, {"interval": interval, "start_step": start}, ctx):
        with count_calls(probes) as counts:
            generate_latents(pipe, spec, ctx, steps)
    assert keys < steps
    assert dict(counts) == {name: keys for name in probes}  # one call per key step (CFG batch)


def test_cached_outputs_are_reused_not_recomputed(dit_pipe, dit_spec):
    """On a non-key step every cached layer returns the very tensor it returned on the key step."""
    block = dit_pipe.transformer.transformer_blocks[0]
    seen = []
    hook = block.attn1.register_forward_hook(lambda m, a, out: seen.append(out))
    ctx = StepContext()
    try:
        with _apply(dit_pipe, {"interval": 3}, ctx):
            generate_latents(dit_pipe, dit_spec, ctx, 6)
    finally:
        hook.remove()
    assert len(seen) == 6
    assert seen[1] is seen[0] and seen[2] is seen[0] and seen[4] is seen[3]
    assert seen[3] is not seen[0] and not torch.equal(seen[3], seen[0])


@pytest.mark.parametrize("pipe_name", ["dit", "pixart"])
def test_flops_saved_equal_the_cached_layers(request, pipe_name):
    """FLOPs(baseline) - FLOPs(FORA) = non-key steps x FLOPs of every attention/MLP per call."""
    pipe = request.getfixturevalue(f"{pipe_name}_pipe")
    spec = request.getfixturevalue(f"{pipe_name}_spec")
    names = [f"transformer_blocks.{name}" for name in _layer_probes(pipe)]
    layers = module_flops(pipe, spec, names)
    steps, interval = 8, 3
    base = flops_of(pipe, spec, StepContext(), steps)
    ctx = StepContext()
    with _apply(pipe, {"interval": interval}, ctx):
        cached = flops_of(pipe, spec, ctx, steps)
    skipped = steps - sum(is_key_step(s, interval) for s in range(steps))
    assert skipped == 5 and layers > 0
    assert base - cached == skipped * layers


def test_plain_call_while_applied_is_exact(dit_pipe, dit_spec):
    """A pipeline call outside StepContext.generate never reads the cache."""
    expected = plain_call(dit_pipe, dit_spec)
    ctx = StepContext()
    with _apply(dit_pipe, {"interval": 3}, ctx):
        generate_latents(dit_pipe, dit_spec, ctx, 5)
        assert torch.equal(plain_call(dit_pipe, dit_spec), expected)


def test_unet_pipeline_is_refused_in_one_line(tiny_pipe):
    with pytest.raises(DiffbenchError) as err:
        _apply(tiny_pipe, {"interval": 3}, StepContext())
    message = str(err.value)
    assert "\n" not in message
    assert message == ("fora needs a transformer denoiser (pipe.transformer); "
                       "StableDiffusionPipeline has none")


def test_interval_zero_is_refused_with_range():
    with pytest.raises(DiffbenchError, match=r"fora.interval=0 is out of range; allowed \[1, "):
        METHODS.get("fora").config({"interval": 0})


TestForaOnMiniSD3 = on_model(TestFora, "sd3")

TestForaOnTinyFlux = on_model(TestFora, "flux")

TestForaOnTinySD3 = on_model(TestFora, "tiny_sd3")
