"""The per-step cache bookkeeping (methods/_common/cache.py) shared by the caching methods."""

import torch

from harness.steps import StepContext
from methods._common.cache import GenerationCache, StepCache, cached_forward


class _Ctx:
    def __init__(self, num_steps):
        self.generation, self.step, self.num_steps = 0, -1, num_steps


def test_key_steps_store_and_non_key_steps_reuse():
    ctx = _Ctx(4)
    cache = StepCache(ctx, lambda step, _: step % 2 == 0, "sample")
    runs = []
    layer = cached_forward(cache, "layer", lambda x: runs.append(ctx.step) or x * 2)
    x = torch.ones(1, 2)
    for step in range(4):
        ctx.step = step
        cache.before_denoiser(None, (), {"sample": x})
        layer(x)
    assert runs == [0, 2]  # steps 1 and 3 reuse the key step's output
    assert not cache.keep  # the last step keeps nothing for a next step
    cache.clear()
    assert cache.store == {} and cache.shape == {}


def test_calls_within_a_step_and_shapes_are_kept_apart():
    ctx = _Ctx(3)
    cache = StepCache(ctx, lambda step, _: step == 0)
    ctx.step = 0
    cache.begin(torch.ones(2, 1))
    assert (cache.call, cache.reuse, cache.keep) == (0, False, True)
    cache.begin(torch.ones(4, 1))
    assert cache.call == 1
    ctx.step = 1
    cache.begin(torch.ones(2, 1))
    assert cache.reuse
    cache.begin(torch.ones(3, 1))  # another input shape than this call's on the key step
    assert not cache.reuse


def test_a_new_generation_empties_the_cache():
    ctx = _Ctx(3)
    cache = GenerationCache(ctx)
    assert cache.new_generation()
    cache.store["x"] = 1
    assert not cache.new_generation() and cache.store == {"x": 1}
    ctx.generation = 1
    assert cache.new_generation() and cache.store == {}


def test_calls_outside_a_generation_never_reuse():
    ctx = StepContext()
    cache = StepCache(ctx, lambda step, _: False)
    cache.begin(torch.ones(1))
    assert not cache.reuse and not cache.keep
