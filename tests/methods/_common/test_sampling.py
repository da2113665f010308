"""The one guided sampler (methods/_common/sampling.py) against the loop it replaced."""

import torch

from methods._common import sampling
from methods._common.training import ddim_scheduler, guided, latent_shape, text_embeddings


def _texts(pipe):
    cond = text_embeddings(pipe, ["a red circle", "a blue star"])
    return cond, text_embeddings(pipe, [""])


def test_batched_guided_ddim_equals_the_hand_written_loop(tiny_pipe):
    cond, uncond = _texts(tiny_pipe)
    x = torch.randn(latent_shape(tiny_pipe, 2), generator=torch.Generator().manual_seed(0))
    sched = ddim_scheduler(tiny_pipe, 3)
    out = sampling.sample(sched, x, sampling.batched_cfg(tiny_pipe.unet, cond, uncond), 5.0)
    ref, unet = x, tiny_pipe.unet
    with torch.no_grad():
        for t in ddim_scheduler(tiny_pipe, 3).timesteps:
            eps = unet(torch.cat([ref, ref]), t,
                       encoder_hidden_states=torch.cat([uncond.expand(2, -1, -1), cond])).sample
            e_u, e_c = eps.chunk(2)
            ref = sched.step(guided(e_u, e_c, 5.0), t, ref).prev_sample
    assert torch.equal(out, ref)


def test_stop_callback_and_unguided_steps(tiny_pipe):
    cond, uncond = _texts(tiny_pipe)
    calls, steps = [], []

    def eps(x, t, emb):
        calls.append(emb is uncond)
        return tiny_pipe.unet(x, t, encoder_hidden_states=emb.expand(2, -1, -1)).sample

    x = torch.randn(latent_shape(tiny_pipe, 2), generator=torch.Generator().manual_seed(0))
    sched = ddim_scheduler(tiny_pipe, 4)
    predict = sampling.separate_cfg(eps, cond, uncond)
    sampling.sample(sched, x, predict, None, stop=2, on_step=steps.append)
    assert steps == [0, 1] and calls == [False, False]  # conditional only, two steps
    calls.clear()
    sampling.sample(sched, x, predict, 3.0, stop=1)
    assert calls == [False, True]  # conditional first, then unconditional
    assert torch.equal(sampling.sample(sched, x, predict, 3.0, stop=0), x)
