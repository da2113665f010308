import copy

import pytest
import torch

from harness.method import METHODS
from harness.steps import StepContext
from methods._common.cache import relative_l1
from tests.methods.contract import MethodContract
from tests.methods.dit_fixtures import count_calls, generate_latents, on_model, pipe_kwargs


class FBCacheContract(MethodContract):
    """First Block Cache on a transformer's blocks."""

    method = "fbcache"
    identity_params = {"threshold": 0.0}
    active_params = {"threshold": 10.0}  # every call after the first full one skips

    def test_skipped_calls_run_only_the_first_block(self, tiny_pipe, tiny_spec):
        blocks = dict(enumerate(tiny_pipe.transformer.transformer_blocks))
        probes = {i: b.norm1 for i, b in blocks.items()}  # a child runs only if its block runs
        ctx = StepContext()
        with METHODS.get("fbcache").apply(tiny_pipe, METHODS.get("fbcache").config(
                self.active_params), ctx), count_calls(probes) as counts:
            generate_latents(tiny_pipe, tiny_spec, ctx, steps=6)
        assert counts[0] == 6 and all(counts[i] == 1 for i in blocks if i > 0)


for prefix in ("dit", "sd3", "flux", "tiny_sd3", "pixart"):
    globals()[f"TestFBCacheOn{prefix.title().replace('_', '')}"] = on_model(FBCacheContract, prefix)


def test_relative_change_by_hand():
    prev = torch.tensor([1.0, -1.0, 2.0, -2.0])
    assert relative_l1(prev + torch.tensor([0.3, 0.0, 0.0, -0.3]), prev) == pytest.approx(0.1)


@pytest.mark.parametrize("threshold", [0.05, 0.3, 10.0])
def test_equals_diffusers_first_block_cache(flux_pipe, flux_spec, threshold):
    """diffusers' FirstBlockCache (`enable_cache`) on a copy of tiny-flux (its pipeline sets the
    cache context the hook needs): the same latents, bit for bit."""
    from diffusers.hooks import FirstBlockCacheConfig

    reference = copy.deepcopy(flux_pipe)
    reference.transformer.enable_cache(FirstBlockCacheConfig(threshold=threshold))
    with torch.inference_mode():
        expected = torch.as_tensor(reference(**pipe_kwargs(flux_spec, steps=8)).images)
    ctx = StepContext()
    with METHODS.get("fbcache").apply(flux_pipe, METHODS.get("fbcache").config(
            {"threshold": threshold}), ctx):
        ours = generate_latents(flux_pipe, flux_spec, ctx, steps=8)
    assert (ours - expected).abs().max().item() == 0.0
