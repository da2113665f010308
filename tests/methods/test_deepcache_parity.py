"""diffbench's DeepCache against the reference code (DeepCache 0.1.1, DeepCacheSDHelper) on the
same pipeline and seeds: every branch id, intervals 1/3/5, and the non-uniform schedule."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from harness.method import METHODS
from harness.run.generate import call_kwargs
from harness.steps import StepContext
from methods.deepcache import key_steps
from tests.methods.dit_fixtures import model_fixtures

DeepCache = pytest.importorskip("DeepCache", reason="reference DeepCache 0.1.1 not installed "
                                "(pip install --no-deps DeepCache==0.1.1)")

STEPS = 7
minisd_spec, minisd_pipe = model_fixtures("minisd", "mini-sd")  # 3 levels, attention up blocks


def latents(pipe, spec, ctx=None):
    kw = {**call_kwargs(spec, ["a red circle on a blue background", "a small green star"],
                        [1, 2], STEPS, 5.0, 32, {}), "output_type": "latent"}
    with torch.inference_mode():
        return (ctx or StepContext()).generate(pipe, **kw).images if ctx else pipe(**kw).images


def reference(pipe, spec, interval, branch):
    helper = DeepCache.DeepCacheSDHelper(pipe=pipe)
    helper.set_params(cache_interval=interval, cache_branch_id=branch)
    helper.enable()
    try:
        return latents(pipe, spec)
    finally:
        helper.disable()


def ours(pipe, spec, interval, branch):
    method, ctx = METHODS.get("deepcache"), StepContext()
    with method.apply(pipe, method.config({"interval": interval, "branch": branch}), ctx):
        return latents(pipe, spec, ctx)


@pytest.mark.parametrize("interval", [1, 3, 5])
@pytest.mark.parametrize("model", ["tiny", "minisd"])
def test_every_branch_id_equals_the_reference(request, model, interval):
    pipe, spec = (request.getfixturevalue(f"{model}_{part}") for part in ("pipe", "spec"))
    n = len(pipe.unet.down_blocks)
    diffs = {}
    for branch in range(3 * (n - 1) + 3):
        expected = reference(pipe, spec, interval, branch)
        diffs[branch] = (ours(pipe, spec, interval, branch) - expected).abs().max().item()
    assert diffs == {b: 0.0 for b in diffs}  # bit-identical: the same arithmetic


REFERENCE_SCHEDULE = """
import json, math, sys, types
import diffusers.models.embeddings, diffusers.utils, transformers.utils

class Anything(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return type(name, (), {})

# its pipeline module imports names diffusers 0.42 / transformers 5 no longer have: stand-ins
for mod in ("diffusers.models.dual_transformer_2d", "diffusers.models.transformer_2d"):
    sys.modules[mod] = Anything(mod)
for mod, name in ((diffusers.models.embeddings, "PositionNet"),
                  (diffusers.utils, "DIFFUSERS_CACHE"), (diffusers.utils, "HF_HUB_OFFLINE"),
                  (diffusers.utils, "FLAX_WEIGHTS_NAME"),
                  (transformers.utils, "FLAX_WEIGHTS_NAME")):
    if not hasattr(mod, name):
        setattr(mod, name, type(name, (), {}))
from DeepCache.sd.pipeline_stable_diffusion import sample_from_quad_center
out = []
for steps, interval, center in json.loads(sys.argv[1]):
    keys, _ = sample_from_quad_center(steps, math.ceil(steps / interval), center=center, pow=1.4)
    out.append(sorted(int(k) for k in keys))
print(json.dumps(out))
"""

CASES = [(50, 3, 15), (50, 5, 15), (50, 2, 15), (25, 3, 8), (20, 3, 6), (10, 3, 3), (30, 4, 9)]


def test_quadratic_schedule_equals_the_references_sample_from_quad_center():
    """Run in a subprocess: the reference module needs stand-ins for names its diffusers
    version had, which must not leak into this test session."""
    done = subprocess.run([sys.executable, "-W", "ignore", "-c", REFERENCE_SCHEDULE,
                           json.dumps(CASES)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    expected = json.loads(done.stdout.strip().splitlines()[-1])
    for (steps, interval, center), keys in zip(CASES, expected):
        ours_ = sorted(key_steps(steps, interval, "quadratic", center / steps, 1.4))
        assert ours_ == keys, (steps, interval, center)
        assert len(keys) == math.ceil(steps / interval)


def test_unet_flops_equal_the_references_at_the_paper_setting(minisd_pipe, minisd_spec):
    """mini-sd's architecture, 25 steps, N = 3, branch 0: the UNet FLOPs of both, and the
    ratio to the baseline measured with the reference (0.455)."""
    from torch.utils.flop_counter import FlopCounterMode

    from metrics.flops import register_attention_formulas

    register_attention_formulas()
    kw = {**call_kwargs(minisd_spec, ["a red circle"], [1], 25, 5.0, 32, {}),
          "output_type": "latent"}

    def unet_flops(run) -> int:
        with FlopCounterMode(display=False) as counter, torch.inference_mode():
            run()
        return sum(counter.get_flop_counts()["UNet2DConditionModel"].values())

    base = unet_flops(lambda: minisd_pipe(**kw))
    helper = DeepCache.DeepCacheSDHelper(pipe=minisd_pipe)
    helper.set_params(cache_interval=3, cache_branch_id=0)
    helper.enable()
    try:
        reference_flops = unet_flops(lambda: minisd_pipe(**kw))
    finally:
        helper.disable()
    method, ctx = METHODS.get("deepcache"), StepContext()
    with method.apply(minisd_pipe, method.config({"interval": 3, "branch": 0}), ctx):
        ours_flops = unet_flops(lambda: ctx.generate(minisd_pipe, **kw))
    assert ours_flops == reference_flops
    assert round(ours_flops / base, 3) == 0.455
