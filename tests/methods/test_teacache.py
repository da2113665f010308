import numpy as np
import pytest
import torch

from harness.method import METHODS
from harness.prepare import PrepareData
from harness.run.generate import model_call
from harness.steps import StepContext
from methods._common.blocks import denoiser_blocks
from methods._common.cache import fixed_rate_computes
from methods.teacache import FLUX_DEV, POLY, ModulatedInput, fit_pairs, rescale, row_changes
from tests.methods.contract import PROMPTS, MethodContract, one_line_error
from tests.methods.dit_fixtures import count_calls, generate_latents, on_model

FIT = {"calib_prompts": 2, "calib_steps": 6}  # small fitting runs for the tiny models


class TeaCacheContract(MethodContract):
    """TeaCache on a transformer's blocks, its polynomial fitted on the model in prepare."""

    method = "teacache"
    identity_params = {"threshold": 0.0, **FIT}
    active_params = {"threshold": 100.0, **FIT}  # every call but the first and last skips

    def test_skipped_calls_run_no_block(self, tiny_pipe, tiny_spec):
        blocks = dict(enumerate(tiny_pipe.transformer.transformer_blocks))
        probes = {i: b.norm1 for i, b in blocks.items()}  # the decision calls block 0's norm1
        ctx = StepContext()
        with self.apply(tiny_pipe, self.active_params, ctx) as handle, \
                count_calls(probes) as counts:
            generate_latents(tiny_pipe, tiny_spec, ctx, steps=6)
        assert all(counts[i] == 2 for i in blocks if i > 0)  # steps 0 and 5 only
        assert handle.stats == {"cache_calls": 6, "cache_skips": 4}


for prefix in ("dit", "sd3", "flux", "tiny_sd3", "pixart"):
    globals()[f"TestTeaCacheOn{prefix.title().replace('_', '')}"] = on_model(TeaCacheContract,
                                                                             prefix)


def _prepare(pipe, spec, params):
    method = METHODS.get("teacache")
    config = method.config(params)
    data = PrepareData(model=spec.name, prompts=tuple(PROMPTS), log=lambda _: None,
                       call_kwargs=model_call(spec))
    return config, method.prepare(pipe, config, data)


def test_fitted_polynomial_is_a_least_squares_fit_and_deterministic(sd3_pipe, sd3_spec):
    """prepare's coefficients: the degree-4 least-squares fit of (input change, output change)
    pairs, one per image row and consecutive step pair; the same twice."""
    config, first = _prepare(sd3_pipe, sd3_spec, FIT)
    _, second = _prepare(sd3_pipe, sd3_spec, FIT)
    data = PrepareData(model=sd3_spec.name, prompts=tuple(PROMPTS), log=lambda _: None,
                       call_kwargs=model_call(sd3_spec))
    xs, ys = fit_pairs(sd3_pipe, config, data)
    assert len(xs) == 2 * 2 * (FIT["calib_steps"] - 1)  # 2 prompts x CFG rows x step pairs
    design = np.vander(np.array(xs), 5)
    residual = lambda c: ((design @ c - np.array(ys)) ** 2).sum()  # noqa: E731
    best = first[POLY].numpy()
    assert residual(best) <= residual(best * 1.01) and residual(best) <= residual(best + 1e-3)
    assert torch.equal(first[POLY], second[POLY])
    assert _prepare(sd3_pipe, sd3_spec, {"coefficients": "flux-dev"})[1][POLY].tolist() == \
        list(FLUX_DEV)


def test_decisions_follow_the_reference_rule(flux_pipe, flux_spec):
    """The skip pattern equals the reference loop (TeaCache4FLUX) rerun in the test on the
    modulated inputs the method saw: accumulate poly1d(c)(rel-L1), compute at >= threshold,
    first and last step always compute."""
    config, artifact = _prepare(flux_pipe, flux_spec, {"coefficients": "flux-dev",
                                                        "threshold": 0.4})
    block0 = denoiser_blocks(flux_pipe, "teacache")[0]
    modulated, seen = ModulatedInput(block0), []
    hook = block0.module.register_forward_pre_hook(
        lambda m, a, k: seen.append(modulated(a, k)), with_kwargs=True)
    probe = flux_pipe.transformer.transformer_blocks[1].norm1
    ctx, steps = StepContext(), 12
    try:
        with METHODS.get("teacache").apply(flux_pipe, config, ctx, {"teacache": artifact}), \
                count_calls({"probe": probe}) as counts:
            generate_latents(flux_pipe, flux_spec, ctx, steps=steps)
    finally:
        hook.remove()
    rescale_ref, acc, computed = np.poly1d(FLUX_DEV), 0.0, 0
    for i in range(steps):
        if i in (0, steps - 1):
            calc, acc = True, 0.0
        else:
            prev = seen[i - 1]
            acc += rescale_ref(((seen[i] - prev).abs().mean() / prev.abs().mean()).item())
            calc = acc >= 0.4
            acc = 0.0 if calc else acc
        computed += calc
    assert counts["probe"] == computed and 2 < computed < steps


def test_rate_mode_follows_the_fixed_schedule(dit_pipe, dit_spec):
    ctx = StepContext()
    params = {"rate": 0.5, **FIT}
    config, artifact = _prepare(dit_pipe, dit_spec, params)
    probe = {"b1": dit_pipe.transformer.transformer_blocks[1].norm1}
    with METHODS.get("teacache").apply(dit_pipe, config, ctx, {"teacache": artifact}) as h, \
            count_calls(probe) as counts:
        generate_latents(dit_pipe, dit_spec, ctx, steps=10)
    expected = sum(fixed_rate_computes(s, 10, 0.5) for s in range(10))
    assert counts["b1"] == expected == 10 - h.stats["cache_skips"] and expected < 10


def test_rescale_clamps_and_row_changes_by_hand():
    assert rescale(torch.tensor([1.0, -2.0, 0.0], dtype=torch.float64), 1.0) == 0.0  # -1 -> 0
    assert rescale(torch.tensor([1.0, 0.0, 0.5], dtype=torch.float64), 2.0) == 4.5
    prev = torch.tensor([[1.0, -1.0], [2.0, 2.0]])
    assert row_changes(prev + torch.tensor([[0.5, 0.5], [0.0, 0.4]]), prev) == \
        pytest.approx([0.5, 0.1])


def test_unet_pipeline_is_refused_in_one_line(tiny_pipe):
    method = METHODS.get("teacache")
    with one_line_error("transformer"):
        method.apply(tiny_pipe, method.config({}), StepContext(),
                     {"teacache": {POLY: torch.tensor(FLUX_DEV, dtype=torch.float64)}})
