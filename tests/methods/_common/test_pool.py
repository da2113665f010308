"""The training pool (methods/_common/pool.py): teacher and real-data x_0, batches, targets."""

import pytest
import torch

from harness.errors import DiffbenchError
from methods._common import pool as pooling


def test_teacher_pool_is_deterministic_and_batches_noise_it(tiny_pipe):
    prompts = ["a red circle", "a blue star"]
    a = pooling.teacher_pool(tiny_pipe, prompts, 3, 2, torch.Generator().manual_seed(1))
    b = pooling.teacher_pool(tiny_pipe, prompts, 3, 2, torch.Generator().manual_seed(1))
    assert a.latents.shape == (3, 4, 8, 8) and torch.equal(a.latents, b.latents)
    assert torch.equal(a.cond[0], a.cond[2]) and not torch.equal(a.cond[0], a.cond[1])
    batch = pooling.sample_batch(tiny_pipe, a, 4, torch.Generator().manual_seed(0), uncond_prob=1.0)
    assert torch.equal(batch.cond, a.uncond.expand(4, -1, -1))
    sched = tiny_pipe.scheduler
    expected = sched.add_noise(batch.x0, batch.noise, batch.t)
    assert torch.equal(batch.x_t, expected)
    assert torch.equal(pooling.diffusion_target(tiny_pipe, batch), batch.noise)


def test_teacher_pool_does_not_depend_on_the_chunk_size(tiny_pipe):
    pools = [pooling.teacher_pool(tiny_pipe, ["a red circle"], 5, 2,
                                  torch.Generator().manual_seed(4), chunk=c) for c in (2, 16)]
    assert torch.allclose(pools[0].latents, pools[1].latents, atol=1e-4)  # batch-size rounding


def _fake_dataset(pipe):
    """(n, seed) -> random images at the pipeline's resolution and numbered captions."""
    scale = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    side = pipe.unet.config.sample_size * scale

    def dataset(n, seed):
        gen = torch.Generator().manual_seed(seed)
        return torch.rand(n, 3, side, side, generator=gen), [f"image {i % 2}" for i in range(n)]

    return dataset


def test_data_pool_encodes_the_models_images_with_their_captions(tiny_pipe):
    dataset = _fake_dataset(tiny_pipe)
    pool = pooling.data_pool(tiny_pipe, dataset, 3, seed=5, chunk=2)
    images, _ = dataset(3, 5)
    with torch.no_grad():
        expected = tiny_pipe.vae.encode(images * 2 - 1).latent_dist.mean
    expected = expected * tiny_pipe.vae.config.scaling_factor
    assert pool.latents.shape == (3, 4, 8, 8)
    assert torch.allclose(pool.latents, expected, atol=1e-5)
    assert torch.equal(pool.cond[0], pool.cond[2]) and not torch.equal(pool.cond[0], pool.cond[1])


def test_training_pool_picks_real_data_when_the_model_has_some(tiny_pipe):
    from harness.prepare import PrepareData

    gen = torch.Generator().manual_seed(0)
    with_data = PrepareData(model="m@x", prompts=("p",), seed=5, dataset=_fake_dataset(tiny_pipe))
    without = PrepareData(model="m@x", prompts=("p",), seed=5)
    real = pooling.data_pool(tiny_pipe, with_data.dataset, 2, 5)
    for source, data in (("auto", with_data), ("real", with_data)):
        pool = pooling.training_pool(tiny_pipe, source, data, ["p"], 2, 1, gen, "ase")
        assert torch.equal(pool.latents, real.latents)
    teacher = pooling.teacher_pool(tiny_pipe, ["p"], 2, 1, torch.Generator().manual_seed(3))
    for source, data in (("auto", without), ("teacher", with_data)):
        pool = pooling.training_pool(tiny_pipe, source, data, ["p"], 2, 1,
                                torch.Generator().manual_seed(3), "ase")
        assert torch.equal(pool.latents, teacher.latents)
    with pytest.raises(DiffbenchError, match=r"^ase.data='real': model m@x has no training "
                                             r"images offline; use data='teacher'"):
        pooling.training_pool(tiny_pipe, "real", without, ["p"], 2, 1, gen, "ase")


def test_mini_sd_dataset_is_world_training_images():
    from harness.mini.pipeline import world_dataset
    from harness.mini.world import is_heldout
    from harness.models import MODELS

    assert MODELS.get("mini-sd").dataset is world_dataset
    images, captions = world_dataset(4, 0)
    again, _ = world_dataset(4, 0)
    assert images.shape == (4, 3, 32, 32) and len(captions) == 4 and torch.equal(images, again)
    assert 0.0 <= images.min() and images.max() <= 1.0
    _, many = world_dataset(256, 1)
    assert not any(is_heldout(c.split()[3], c.split()[2]) for c in many)  # training split only


def test_pool_prompts_are_none_for_real_data_and_key_the_artifact(tiny_pipe):
    """What `training_pool` reads keys the artifact: real images read no prompts."""
    from harness.method import METHODS
    from harness.prepare import PrepareData

    with_data = PrepareData(model="m@x", prompts=("p", "q"), dataset=_fake_dataset(tiny_pipe))
    without = PrepareData(model="m@x", prompts=("p", "q"))
    assert pooling.pool_prompts("auto", with_data, ["p"]) == ()
    assert pooling.pool_prompts("auto", without, ["p"]) == ("p",)
    assert pooling.pool_prompts("teacher", with_data, ["p"]) == ("p",)
    ase = METHODS.get("ase")
    assert ase.training_prompts(ase.config({}), with_data) == ()
    assert ase.training_prompts(ase.config({}), without) == ("p", "q")
    assert ase.training_prompts(ase.config({"steps": 0}), without) == ()
    prune = METHODS.get("prune_distill")
    assert prune.training_prompts(prune.config({"train_prompts": "general"}), without)[0] != "p"
    assert METHODS.get("esd").training_prompts(METHODS.get("esd").config({}), without) == ()
