"""diffusers' cache hooks as methods (methods/diffusers_hooks.py): the contract on every model
each hook runs on, the per-generation reset, FBCache against ours bit for bit, the timestep the
hooks are fed, and the one-line refusals."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from harness.method import METHODS
from harness.stack import resolve_method
from harness.steps import StepContext
from methods.diffusers_hooks import scheduler_timestep
from tests.methods.contract import (
    MethodContract,
    assert_same_state,
    one_line_error,
    state_fingerprint,
)
from tests.methods.dit_fixtures import count_calls, generate_latents, on_model, pipe_kwargs

ATTN1 = {"cache_identifiers": r"transformer_blocks\.\d+\.attn1"}  # DiT / PixArt attention


class FBCacheContract(MethodContract):
    method = "diffusers-fbcache"
    identity_params = {"threshold": 0.0}  # diffusers computes when diff > 0: always, here
    active_params = {"threshold": 10.0}


class PABContract(MethodContract):
    method = "diffusers-pab"
    identity_params = {"spatial_attention_block_skip_range": 1}
    active_params: dict = {}  # diffusers' defaults: every 2nd call in timesteps (100, 800)


class FasterCacheContract(MethodContract):
    method = "diffusers-fastercache"
    identity_params = {"spatial_attention_timestep_skip_range": (0, 0),
                       "unconditional_batch_timestep_skip_range": (0, 0)}
    active_params: dict = {}


class TaylorSeerContract(MethodContract):
    method = "diffusers-taylorseer"
    identity_params = {"cache_interval": 1}
    active_params = {"cache_interval": 2, "disable_cache_before_step": 1}


class TaylorSeerAttn1Contract(TaylorSeerContract):
    identity_params = {"cache_interval": 1, **ATTN1}
    active_params = {"cache_interval": 2, "disable_cache_before_step": 1, **ATTN1}


class MagCacheContract(MethodContract):
    method = "diffusers-magcache"
    identity_params = {"max_skip_steps": 0}
    active_params: dict = {}  # diffusers' FLUX ratios, resampled to the 6 steps


ALL = ("dit", "pixart", "sd3", "tiny_sd3", "flux")
ON = {FBCacheContract: ALL, PABContract: ALL, MagCacheContract: ALL,
      FasterCacheContract: ("pixart", "sd3", "tiny_sd3", "flux"),  # DiT refused
      TaylorSeerContract: ("sd3", "tiny_sd3", "flux"), TaylorSeerAttn1Contract: ("dit", "pixart")}
for contract, prefix in ((c, p) for c in ON for p in ON[c]):
    name = f"Test{contract.__name__[:-8]}On{prefix.title().replace('_', '')}"
    globals()[name] = on_model(contract, prefix)
NAMES = sorted({c.method for c in ON})


def _model(request: Any, prefix: str) -> tuple[Any, Any]:
    return request.getfixturevalue(f"{prefix}_pipe"), request.getfixturevalue(f"{prefix}_spec")


def _params(name: str) -> dict:
    return dict(next(c.active_params for c in ON if c.method == name))


def _latents(pipe: Any, spec: Any, ctx: StepContext, **kwargs: Any) -> torch.Tensor:
    with torch.inference_mode():
        return torch.as_tensor(ctx.generate(pipe, **{**pipe_kwargs(spec, 6), **kwargs}).images)


class Stop(Exception):
    pass


def _interrupted(pipe: Any, spec: Any, ctx: StepContext, at: int = 2) -> None:
    """A generation stopped by an exception after step `at`, before the pipeline's own reset."""

    def stop(pipe_: Any, step: int, timestep: Any, kwargs: dict) -> dict:
        if step == at:
            raise Stop
        return kwargs

    with pytest.raises(Stop):
        _latents(pipe, spec, ctx, callback_on_step_end=stop)


@pytest.mark.parametrize("prefix", ["sd3", "flux"])
@pytest.mark.parametrize("name", NAMES)
def test_every_generation_starts_fresh(request, name, prefix):
    """The same prompt and seed twice give the same latents; so does a generation after one
    interrupted mid-way (the pipeline's own reset never ran; other prompts before: the
    contract's test_state_resets_between_batches)."""
    pipe, spec = _model(request, prefix)
    method = METHODS.get(name)
    ctx = StepContext()
    with method.apply(pipe, method.config(_params(name)), ctx):
        first = _latents(pipe, spec, ctx)
        again = _latents(pipe, spec, ctx)
        _interrupted(pipe, spec, ctx)
        after_interrupt = _latents(pipe, spec, ctx)
    assert torch.equal(first, again)
    assert torch.equal(first, after_interrupt)


@pytest.mark.parametrize("prefix, threshold", [("flux", 0.05), ("flux", 0.3), ("sd3", 0.05),
                                               ("sd3", 0.3), ("sd3", 0.5)])
def test_fbcache_equals_ours(request, prefix, threshold):
    """diffusers-fbcache (the library's hooks under our context on SD3, the pipeline's on FLUX)
    and our fbcache: the same latents bit for bit, and the same blocks skipped."""
    pipe, spec = _model(request, prefix)
    probe = {"last": pipe.transformer.transformer_blocks[-1].norm1}
    out = {}
    for name in ("fbcache", "diffusers-fbcache"):
        ctx, method = StepContext(), METHODS.get(name)
        with method.apply(pipe, method.config({"threshold": threshold}), ctx), \
                count_calls(probe) as counts:
            latents = generate_latents(pipe, spec, ctx, 8, ("a red circle", "a blue square"))
        out[name] = latents, counts["last"]
    (ours, ours_runs), (theirs, their_runs) = out.values()
    assert (ours - theirs).abs().max().item() == 0.0
    assert ours_runs == their_runs
    if threshold >= 0.5 or (prefix, threshold) == ("flux", 0.3):
        assert ours_runs < 8  # the comparison covers skipped calls


@pytest.mark.parametrize("prefix, scale", [("sd3", 1.0), ("flux", 1000.0), ("pixart", 1.0)])
def test_timestep_callback_is_the_denoisers_timestep(request, prefix, scale):
    """PAB / FasterCache ranges are in scheduler timesteps: the callback's value is the one the
    denoiser is called with (FLUX's pipeline divides it by 1000)."""
    pipe, spec = _model(request, prefix)
    ctx, seen = StepContext(), []

    def record(module: Any, args: tuple, kwargs: dict) -> None:
        seen.append((scheduler_timestep(pipe, ctx), float(kwargs["timestep"].flatten()[0])))

    method = METHODS.get("diffusers-pab")
    with method.apply(pipe, method.config({}), ctx):
        hook = pipe.transformer.register_forward_pre_hook(record, with_kwargs=True)
        try:
            _latents(pipe, spec, ctx)
        finally:
            hook.remove()
    assert len(seen) == 6 and seen[0][0] > 900
    assert all(given * scale == pytest.approx(fed, abs=1e-3) for fed, given in seen)


@pytest.mark.parametrize("name", NAMES)
def test_remove_leaves_no_diffusers_registry(tiny_sd3_pipe, tiny_sd3_spec, flux_pipe, flux_spec,
                                             name):
    """diffusers' HookRegistry (`_diffusers_hook`, which the contract's fingerprint does not
    see) is gone from every module that lacked one, on SD3 and on FLUX."""
    method = METHODS.get(name)
    for pipe, spec in ((tiny_sd3_pipe, tiny_sd3_spec), (flux_pipe, flux_spec)):
        had = {id(m) for m in pipe.transformer.modules() if hasattr(m, "_diffusers_hook")}
        ctx = StepContext()
        with method.apply(pipe, method.config(_params(name)), ctx):
            _latents(pipe, spec, ctx)
        left = {id(m) for m in pipe.transformer.modules() if hasattr(m, "_diffusers_hook")}
        assert left <= had
        assert all(not m._diffusers_hook.hooks for m in pipe.transformer.modules()
                   if hasattr(m, "_diffusers_hook"))


def test_magcache_calibration_prints_the_ratios_and_never_skips(sd3_pipe, sd3_spec, capsys):
    base = _latents(sd3_pipe, sd3_spec, StepContext())
    method, ctx = METHODS.get("diffusers-magcache"), StepContext()
    with method.apply(sd3_pipe, method.config({"calibrate": True}), ctx):
        calibrating = _latents(sd3_pipe, sd3_spec, ctx)
    assert torch.equal(calibrating, base)
    printed = capsys.readouterr().out.split("MagCache] Calibration Complete")[-1]
    printed = printed[printed.index("["): printed.index("]") + 1]
    assert len(printed.split(",")) == 6 and printed.startswith("[1.0,")
    ctx = StepContext()  # the printed list, pasted, is a valid setting
    with method.apply(sd3_pipe, method.config({"mag_ratios": printed}), ctx):
        assert _latents(sd3_pipe, sd3_spec, ctx).shape == base.shape


@pytest.mark.parametrize("name", NAMES)
def test_unet_pipeline_is_one_line_error(tiny_pipe, name):
    before = state_fingerprint(tiny_pipe)
    with one_line_error("needs a transformer denoiser"):
        METHODS.get(name).apply(tiny_pipe, METHODS.get(name).config({}), StepContext())
    assert_same_state(before, state_fingerprint(tiny_pipe))


@pytest.mark.parametrize("name, params, pattern", [
    ("diffusers-fastercache", {}, "cannot run on DiTTransformer2DModel: DiTPipeline batches"),
    ("diffusers-taylorseer", {}, "no module of DiTTransformer2DModel matches"),
    ("diffusers-taylorseer", {"use_lite_mode": True}, "matches"),  # DiT has no proj_out
])
def test_refused_on_dit_before_any_change(dit_pipe, name, params, pattern):
    before = state_fingerprint(dit_pipe)
    method = METHODS.get(name)
    with one_line_error(pattern):
        method.apply(dit_pipe, method.config(params), StepContext())
    assert_same_state(before, state_fingerprint(dit_pipe))
    assert not any(hasattr(m, "_diffusers_hook") for m in dit_pipe.transformer.modules())


def test_fastercache_needs_guidance_on_a_cfg_model(sd3_pipe, sd3_spec):
    method, ctx = METHODS.get("diffusers-fastercache"), StepContext()
    with method.apply(sd3_pipe, method.config({}), ctx), one_line_error("needs classifier-free"):
        _latents(sd3_pipe, sd3_spec, ctx, guidance_scale=1.0)


def test_fastercache_runs_guidance_distilled_flux_without_cfg(flux_pipe, flux_spec):
    method, ctx = METHODS.get("diffusers-fastercache"), StepContext()
    with method.apply(flux_pipe, method.config({}), ctx):
        assert _latents(flux_pipe, flux_spec, ctx, guidance_scale=1.0).isfinite().all()


@pytest.mark.parametrize("name, params, pattern", [
    ("diffusers-pab", {"spatial_attention_timestep_skip_range": "800,100"}, "lo <= hi"),
    ("diffusers-pab", {"cross_attention_timestep_skip_range": "1,2,3"}, "needs lo,hi"),
    ("diffusers-fastercache", {"unconditional_batch_timestep_skip_range": "0,2000"}, "1000"),
    ("diffusers-magcache", {"mag_ratios": "1.0,abc"}, "positive numbers separated"),
    ("diffusers-magcache", {"mag_ratios": "1.0,-1"}, "positive numbers separated"),
    ("diffusers-taylorseer", {"cache_identifiers": "attn("}, "cache_identifiers"),
    ("diffusers-taylorseer", {"taylor_factors_dtype": "int8"}, "choose one of"),
])
def test_bad_settings_are_one_line_errors(name, params, pattern):
    with one_line_error(pattern):
        METHODS.get(name).config(params)


def test_cli_strings_parse_to_the_library_types():
    pab = METHODS.get("diffusers-pab").config({"spatial_attention_timestep_skip_range": "50,900"})
    assert pab.spatial_attention_timestep_skip_range == (50, 900)
    seer = METHODS.get("diffusers-taylorseer").config(ATTN1)
    assert seer.cache_identifiers == (ATTN1["cache_identifiers"],)


@pytest.mark.parametrize("name", NAMES)
def test_stacking_with_our_fbcache_is_refused(name):
    with one_line_error("transformer.blocks"):
        resolve_method(f"{name}+fbcache")


def test_registered_beside_ours_with_their_own_descriptions():
    docs = {name: METHODS.get(name).doc for name in NAMES}
    assert len(set(docs.values())) == len(NAMES)
    assert all(doc.startswith("diffusers' ") for doc in docs.values())
