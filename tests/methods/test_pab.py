import copy

import pytest
import torch

from harness.method import METHODS
from harness.steps import StepContext
from methods._common.attention_cache import attention_layers
from methods._common.blocks import denoiser_blocks
from methods.pab import Broadcast
from tests.methods.contract import MethodContract, one_line_error
from tests.methods.dit_fixtures import (
    count_calls,
    generate_latents,
    on_model,
    pipe_kwargs,
    plain_call,
)

OTHER = {"spatial_skip_range": 3, "spatial_low": 50, "spatial_high": 950,
         "cross_skip_range": 2, "cross_low": 0, "cross_high": 700}


def _model(request, prefix):
    return request.getfixturevalue(f"{prefix}_pipe"), request.getfixturevalue(f"{prefix}_spec")


def _apply(pipe, params, ctx):
    spec = METHODS.get("pab")
    return spec.apply(pipe, spec.config(params), ctx)


class PABContract(MethodContract):
    """Pyramid Attention Broadcast on a transformer's attention layers (defaults active)."""

    method = "pab"
    identity_params = {"spatial_skip_range": 1, "cross_skip_range": 1}
    active_params = {}


for prefix in ("dit", "pixart", "sd3", "tiny_sd3", "flux"):
    globals()[f"TestPABOn{prefix.title().replace('_', '')}"] = on_model(PABContract, prefix)


@pytest.mark.parametrize("step,t,reuses", [
    (0, 500, False), (1, 500, True), (2, 500, False), (3, 500, True),
    (1, 800, False), (1, 100, False), (1, 799.5, True), (3, 50, False)])
def test_broadcast_decision(step, t, reuses):
    """Reuse at s % k != 0 strictly inside the range (VideoSys `if_broadcast_spatial`)."""
    assert Broadcast(2, 100, 800).reuses(step, t) == reuses
    assert not Broadcast(1, 100, 800).reuses(step, t)


def _timesteps(pipe):
    """A pre-hook list of each denoiser call's timestep in scheduler units (FLUX: t / 1000)."""
    unit = 1000.0 if type(pipe.transformer).__name__ == "FluxTransformer2DModel" else 1.0
    seen = []
    hook = pipe.transformer.register_forward_pre_hook(
        lambda m, a, k: seen.append(float(k["timestep"].reshape(-1)[0]) * unit), with_kwargs=True)
    return seen, hook


@pytest.mark.parametrize("prefix", ["dit", "pixart", "sd3", "tiny_sd3", "flux"])
@pytest.mark.parametrize("params", [{}, OTHER])
def test_attention_runs_only_on_broadcast_key_steps(request, prefix, params):
    """Each attention layer runs (its to_q is called) at step s unless s % k != 0 and
    low < t < high for its role; self- and cross-attention keep their own ranges."""
    pipe, spec = _model(request, prefix)
    config = METHODS.get("pab").config(params)
    ranges = {"self": (config.spatial_skip_range, config.spatial_low, config.spatial_high),
              "cross": (config.cross_skip_range, config.cross_low, config.cross_high)}
    layers = attention_layers(denoiser_blocks(pipe, "pab"))
    ctx, steps = StepContext(), 8
    seen, hook = _timesteps(pipe)
    try:
        with _apply(pipe, params, ctx), count_calls({k: m.to_q for k, _, m in layers}) as counts:
            generate_latents(pipe, spec, ctx, steps)
    finally:
        hook.remove()
    assert len(seen) == steps  # one denoiser call per step (the CFG batch is one call)
    expected = {}
    for key, role, _ in layers:
        k, low, high = ranges[role]
        expected[key] = sum(not (k > 1 and s % k and low < t < high) for s, t in enumerate(seen))
    assert dict(counts) == expected
    assert min(expected.values()) < steps  # something was broadcast


def test_broadcast_returns_the_key_steps_output(dit_pipe, dit_spec):
    """On a broadcast step the layer returns the very tensor its last computed step returned."""
    attn = dit_pipe.transformer.transformer_blocks[0].attn1
    outputs = []
    hook = attn.register_forward_hook(lambda m, a, out: outputs.append(out))
    ctx = StepContext()
    try:
        with _apply(dit_pipe, {}, ctx):
            generate_latents(dit_pipe, dit_spec, ctx, 8)  # t = 875, 750, ..., 125, 0
    finally:
        hook.remove()
    # inside (100, 800): steps 1..6; odd ones broadcast the step before
    assert outputs[1] is outputs[0] and outputs[3] is outputs[2] and outputs[5] is outputs[4]
    assert all(outputs[s] is not outputs[s - 1] for s in (2, 4, 6, 7))


def _reference(pipe, spec, params, steps):
    """diffusers' PAB hook on a copy of the pipeline, its timestep callback fed the scheduler's
    t: the pipeline's `current_timestep` (FLUX) or the timestep the transformer is called with."""
    from diffusers.hooks import PyramidAttentionBroadcastConfig, apply_pyramid_attention_broadcast

    config = METHODS.get("pab").config(params)
    reference = copy.deepcopy(pipe)
    seen = {}
    reference.transformer.register_forward_pre_hook(
        lambda m, a, k: seen.update(t=k["timestep"].reshape(-1)[0]), with_kwargs=True)
    current = ((lambda: reference.current_timestep) if hasattr(type(reference), "current_timestep")
               else (lambda: seen["t"]))
    apply_pyramid_attention_broadcast(reference.transformer, PyramidAttentionBroadcastConfig(
        spatial_attention_block_skip_range=config.spatial_skip_range,
        spatial_attention_timestep_skip_range=(config.spatial_low, config.spatial_high),
        cross_attention_block_skip_range=(config.cross_skip_range
                                          if config.cross_skip_range > 1 else None),
        cross_attention_timestep_skip_range=(config.cross_low, config.cross_high),
        current_timestep_callback=current))
    with torch.inference_mode():
        return torch.as_tensor(reference(**pipe_kwargs(spec, steps=steps)).images)


@pytest.mark.parametrize("prefix", ["flux", "sd3", "pixart"])
@pytest.mark.parametrize("params", [{}, OTHER])
def test_equals_diffusers_pyramid_attention_broadcast(request, prefix, params):
    """diffusers' hook (`apply_pyramid_attention_broadcast`: SD3's and PixArt's transformers
    lack `enable_cache`) on a copy: the same latents, bit for bit (PixArt's cross-attention
    included)."""
    pipe, spec = _model(request, prefix)
    expected = _reference(pipe, spec, params, 8)
    ctx = StepContext()
    with _apply(pipe, params, ctx):
        ours = generate_latents(pipe, spec, ctx, steps=8)
    assert (ours - expected).abs().max().item() == 0.0
    assert not torch.equal(ours, generate_latents(pipe, spec, StepContext(), steps=8))


def test_plain_call_while_applied_is_exact(dit_pipe, dit_spec):
    """A pipeline call outside StepContext.generate never reads the cache."""
    expected = plain_call(dit_pipe, dit_spec)
    ctx = StepContext()
    with _apply(dit_pipe, {}, ctx):
        generate_latents(dit_pipe, dit_spec, ctx, 5)
        assert torch.equal(plain_call(dit_pipe, dit_spec), expected)


def test_unet_pipeline_is_refused_in_one_line(tiny_pipe):
    with one_line_error("pab needs a transformer denoiser .pipe.transformer.; "
                        "StableDiffusionPipeline has none"):
        _apply(tiny_pipe, {}, StepContext())


@pytest.mark.parametrize("params,pattern", [
    ({"spatial_low": 900, "spatial_high": 100}, r"pab.spatial_low=900 is above pab.spatial_high"),
    ({"cross_low": 950}, r"pab.cross_low=950 is above pab.cross_high=900"),
    ({"spatial_skip_range": 0}, r"pab.spatial_skip_range=0 is out of range; allowed \[1, ")])
def test_bad_settings_are_one_line_errors(params, pattern):
    with one_line_error(pattern):
        METHODS.get("pab").config(params)
