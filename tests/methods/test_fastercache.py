import copy

import pytest
import torch

from harness.method import METHODS
from harness.steps import StepContext
from methods._common.attention_cache import attention_layers
from methods._common.blocks import denoiser_blocks
from methods.fastercache import extrapolate, join_frequencies, split_frequencies
from tests.methods.contract import MethodContract, one_line_error
from tests.methods.dit_fixtures import (
    count_calls,
    generate_latents,
    on_model,
    pipe_kwargs,
    plain_call,
)

CFG_OTHER = {"uncond_skip_range": 3, "uncond_high": 900, "alpha_low": 1.3, "alpha_high": 0.8,
             "high_freq_high": 600}


def _model(request, prefix):
    return request.getfixturevalue(f"{prefix}_pipe"), request.getfixturevalue(f"{prefix}_spec")


def _apply(pipe, params, ctx):
    spec = METHODS.get("fastercache")
    return spec.apply(pipe, spec.config(params), ctx)


class FasterCacheContract(MethodContract):
    """FasterCache on a transformer (defaults active: attention extrapolation, CFG-Cache where
    the pipeline batches CFG)."""

    method = "fastercache"
    identity_params = {"attention_skip_range": 1, "uncond_skip_range": 1}
    active_params = {}


for prefix in ("dit", "pixart", "sd3", "tiny_sd3", "flux"):
    globals()[f"TestFasterCacheOn{prefix.title().replace('_', '')}"] = on_model(
        FasterCacheContract, prefix)


def test_frequency_bands_split_and_join_the_signal():
    x = torch.randn(2, 8, 16, 16)
    low, high = split_frequencies(x)
    assert torch.allclose(join_frequencies(low, high), x, atol=1e-5)
    assert (low != 0).sum() == 2 * 8 * 29 and torch.equal((low != 0) & (high != 0),
                                                           torch.zeros_like(low, dtype=bool))


def test_extrapolation_by_hand():
    a, b = torch.tensor([1.0, 2.0]), torch.tensor([2.0, 5.0])
    assert torch.equal(extrapolate(a, b, 0.5), torch.tensor([2.5, 6.5]))
    pair = extrapolate((a, None), (b, None), 0.0)
    assert torch.equal(pair[0], b) and pair[1] is None


def _self_attention(pipe):
    return {k: m.to_q for k, role, m in attention_layers(denoiser_blocks(pipe, "x"))
            if role == "self"}


def _batches(pipe):
    """The batch each denoiser call runs on, and its class labels (a hook after FasterCache's)."""
    seen = []
    hook = pipe.transformer.register_forward_pre_hook(
        lambda m, a, k: seen.append((a[0] if a else k["hidden_states"]).shape[0]), with_kwargs=True)
    return seen, hook


def test_dit_schedule_by_hand(dit_pipe, dit_spec):
    """DiT, 8 steps, t = 875, 750, ..., 125, 0; defaults. CFG-Cache: inside t < 641 (steps 2-7)
    the unconditional half runs only at s % 5 == 0 (step 5). Attention: inside t < 681 (steps
    2-7) odd steps extrapolate, except step 5, whose full batch the cached conditional-only
    output of step 4 cannot serve."""
    layers = _self_attention(dit_pipe)
    ctx = StepContext()
    seen, hook = _batches(dit_pipe)
    try:
        with _apply(dit_pipe, {}, ctx), count_calls(layers) as counts:
            generate_latents(dit_pipe, dit_spec, ctx, 8)
    finally:
        hook.remove()
    assert seen == [2, 2, 1, 1, 1, 2, 1, 1]
    assert dict(counts) == {k: 6 for k in layers}  # steps 0, 1, 2, 4, 5, 6


@pytest.mark.parametrize("k,computed", [(2, 6), (3, 5)])
def test_flux_attention_only(flux_pipe, flux_spec, k, computed):
    """Guidance-distilled FLUX: no CFG-Cache, the batch is never split; t * 1000 = 1000, 918,
    827, 727, 615, 489, 347, 186: inside t < 681 (steps 4-7) steps with s % k != 0 extrapolate."""
    layers = _self_attention(flux_pipe)
    ctx = StepContext()
    seen, hook = _batches(flux_pipe)
    try:
        with _apply(flux_pipe, {"attention_skip_range": k}, ctx), count_calls(layers) as counts:
            generate_latents(flux_pipe, flux_spec, ctx, 8)
    finally:
        hook.remove()
    assert seen == [1] * 8 and dict(counts) == {key: computed for key in layers}


def test_extrapolates_from_the_last_two_computed_outputs(dit_pipe, dit_spec):
    """Without CFG-Cache, k = 2 (t = 875, ..., 0; steps 2-7 inside t < 681): steps 3, 5, 7 return
    F_a + w (F_a - F_b) of the two computed outputs before them (never an extrapolated one)."""
    attn = dit_pipe.transformer.transformer_blocks[0].attn1
    out = []
    hook = attn.register_forward_hook(lambda m, a, o: out.append(o))
    ctx = StepContext()
    try:
        with _apply(dit_pipe, {"uncond_skip_range": 1, "attention_weight": 0.3}, ctx):
            generate_latents(dit_pipe, dit_spec, ctx, 8)
    finally:
        hook.remove()
    assert torch.equal(out[3], out[2] + (out[2] - out[1]) * 0.3)
    assert torch.equal(out[5], out[4] + (out[4] - out[2]) * 0.3)
    assert torch.equal(out[7], out[6] + (out[6] - out[4]) * 0.3)


def test_dit_rebuilds_the_null_label_half(dit_pipe, dit_spec):
    """DiT's CFG batch is [labels, null labels]: a rebuilt step runs the real labels alone."""
    labels = []
    hook = dit_pipe.transformer.register_forward_pre_hook(
        lambda m, a, k: labels.append(k["class_labels"].tolist()), with_kwargs=True)
    ctx = StepContext()
    try:
        with _apply(dit_pipe, {"attention_skip_range": 1}, ctx):
            generate_latents(dit_pipe, dit_spec, ctx, 8)
    finally:
        hook.remove()
    full, rebuilt = labels[0], labels[2]
    assert len(full) == 2 and full[1] == 1000 and rebuilt == full[:1]


def _reference(pipe, spec, params, steps, distilled):
    """diffusers' FasterCache hooks on a copy of the pipeline, fed the scheduler's t; SD3's
    pooled projections added to the inputs it splits (its default list leaves them whole, and
    the call fails on the mismatched batch)."""
    from diffusers.hooks import FasterCacheConfig, apply_faster_cache
    from diffusers.hooks.faster_cache import _UNCOND_COND_INPUT_KWARGS_IDENTIFIERS as SPLIT

    c = METHODS.get("fastercache").config(params)
    reference = copy.deepcopy(pipe)
    seen = {}
    reference.transformer.register_forward_pre_hook(
        lambda m, a, k: seen.update(t=k["timestep"].reshape(-1)[0]), with_kwargs=True)
    current = ((lambda: reference.current_timestep) if hasattr(type(reference), "current_timestep")
               else (lambda: seen["t"]))
    apply_faster_cache(reference.transformer, FasterCacheConfig(
        spatial_attention_block_skip_range=c.attention_skip_range,
        spatial_attention_timestep_skip_range=(c.attention_low, c.attention_high),
        attention_weight_callback=lambda _: c.attention_weight,
        unconditional_batch_skip_range=c.uncond_skip_range,
        unconditional_batch_timestep_skip_range=(c.uncond_low, c.uncond_high),
        alpha_low_frequency=c.alpha_low, alpha_high_frequency=c.alpha_high,
        low_frequency_weight_update_timestep_range=(c.low_freq_low, c.low_freq_high),
        high_frequency_weight_update_timestep_range=(c.high_freq_low, c.high_freq_high),
        tensor_format="BCHW", is_guidance_distilled=distilled, current_timestep_callback=current,
        _unconditional_conditional_input_kwargs_identifiers=[*SPLIT, "pooled_projections"]))
    with torch.inference_mode():
        return torch.as_tensor(reference(**pipe_kwargs(spec, steps=steps)).images)


def _difference(pipe, spec, params, distilled):
    expected = _reference(pipe, spec, params, 8, distilled)
    ctx = StepContext()
    with _apply(pipe, params, ctx):
        ours = generate_latents(pipe, spec, ctx, steps=8)
    assert not torch.equal(ours, generate_latents(pipe, spec, StepContext(), steps=8))
    return (ours - expected).abs().max().item()


@pytest.mark.filterwarnings("ignore:torch.meshgrid")  # diffusers' frequency split
@pytest.mark.parametrize("prefix", ["pixart", "sd3"])
@pytest.mark.parametrize("params", [{"attention_skip_range": 1},
                                    {**CFG_OTHER, "attention_skip_range": 1}, {}])
def test_equals_diffusers_on_cfg_pipelines(request, prefix, params):
    """CFG-Cache alone (attention always computed) at the defaults and another setting, and the
    whole method at its defaults, where over these 8 steps the definitions agree (each
    extrapolation's two cached outputs are computed ones, no full-batch step extrapolates):
    diffusers' hooks give the same latents, bit for bit."""
    pipe, spec = _model(request, prefix)
    assert _difference(pipe, spec, params, False) == 0.0


@pytest.mark.parametrize("k", [2, 3])
def test_attention_reuse_equals_diffusers_without_extrapolation(flux_pipe, flux_spec, k):
    """Attention reuse on guidance-distilled FLUX with w = 0: the same schedule, bit for bit
    (with w > 0 diffusers extrapolates from its own extrapolations too; module docstring)."""
    assert _difference(flux_pipe, flux_spec, {"attention_skip_range": k,
                                              "attention_weight": 0.0}, True) == 0.0


def test_plain_call_while_applied_is_exact(pixart_pipe, pixart_spec):
    """A pipeline call outside StepContext.generate neither splits the batch nor reuses."""
    expected = plain_call(pixart_pipe, pixart_spec)
    ctx = StepContext()
    with _apply(pixart_pipe, {}, ctx):
        generate_latents(pixart_pipe, pixart_spec, ctx, 8)
        assert torch.equal(plain_call(pixart_pipe, pixart_spec), expected)


def test_unet_pipeline_is_refused_in_one_line(tiny_pipe):
    with one_line_error("fastercache needs a transformer denoiser .pipe.transformer.; "
                        "StableDiffusionPipeline has none"):
        _apply(tiny_pipe, {}, StepContext())


@pytest.mark.parametrize("params,pattern", [
    ({"uncond_low": 700}, r"fastercache.uncond_low=700 is above fastercache.uncond_high=641"),
    ({"attention_low": 500, "attention_high": 400}, r"fastercache.attention_low=500 is above "),
    ({"high_freq_high": -1, "high_freq_low": 0}, r"fastercache.high_freq_low=0 is above "),
    ({"uncond_skip_range": 0}, r"fastercache.uncond_skip_range=0 is out of range; allowed \[1, ")])
def test_bad_settings_are_one_line_errors(params, pattern):
    with one_line_error(pattern):
        METHODS.get("fastercache").config(params)
