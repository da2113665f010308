import copy

import pytest
import torch

from harness.errors import DiffbenchError
from methods import unet_blocks as ub
from tests.methods.contract import DiTLike, one_line_error
from tests.methods.dit_fixtures import count_calls

UNITS = ["down_blocks.0.0", "mid_block", "up_blocks.0.0", "up_blocks.0.1", "up_blocks.1.1"]


@pytest.fixture()
def unet(tiny_pipe):
    """A private copy of the tiny UNet (skipping installs forward overrides on it)."""
    return copy.deepcopy(tiny_pipe.unet).eval()


def _inputs(seed=0, batch=2):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 4, 8, 8, generator=gen), torch.tensor(700),
            torch.randn(batch, 7, 32, generator=gen))


def _run(unet, inputs):
    x, t, text = inputs
    with torch.no_grad():
        return unet(x, t, encoder_hidden_states=text).sample


def test_removable_units_of_tiny_sd(unet):
    """tiny-sd: (32, 64) channels, one layer per block; channel-changing resnets always run."""
    assert [u.name for u in ub.all_units(unet)] == UNITS
    # down_blocks.1.0 maps 32 -> 64 channels; up_blocks.1.0 gets 64 hidden channels, outputs 32
    assert [u.name for u in ub.depth_order(unet)] == [
        "mid_block", "up_blocks.0.0", "up_blocks.0.1", "down_blocks.0.0", "up_blocks.1.1"]


def test_units_hold_resnet_and_attention_pairs(unet):
    units = {u.name: u for u in ub.all_units(unet)}
    assert [m for m, _ in units["down_blocks.0.0"].parts] == [
        unet.down_blocks[0].resnets[0], unet.down_blocks[0].attentions[0]]
    assert [m for m, _ in units["up_blocks.0.1"].parts] == [unet.up_blocks[0].resnets[1]]
    assert [m for m, _ in units["mid_block"].parts] == [unet.mid_block]


@pytest.mark.parametrize("names", [[n] for n in UNITS] + [UNITS])
def test_skipping_keeps_shapes_valid(unet, names):
    base = _run(unet, _inputs())
    ub.skip_units(setattr, ub.select_units(unet, names, "test"))
    out = _run(unet, _inputs())
    assert out.shape == base.shape and torch.isfinite(out).all()
    assert not torch.equal(out, base)


def test_skipped_units_are_not_executed(unet):
    probes = {"down": unet.down_blocks[0].resnets[0].conv1,
              "down_attn": unet.down_blocks[0].attentions[0].proj_in,
              "mid": unet.mid_block.resnets[0].conv1,
              "up": unet.up_blocks[1].resnets[1].conv1,
              "up_attn": unet.up_blocks[1].attentions[1].proj_in,
              "kept": unet.up_blocks[1].resnets[0].conv1}
    with count_calls(probes) as counts:
        ub.skip_units(setattr, ub.select_units(unet, ["down_blocks.0.0", "mid_block",
                                                      "up_blocks.1.1"], "test"))
        _run(unet, _inputs())
    counts = {name: counts[name] for name in probes}
    assert counts == {"down": 0, "down_attn": 0, "mid": 0, "up": 0, "up_attn": 0, "kept": 1}


def test_passthroughs_return_input_or_hidden_part(unet):
    units = {u.name: u for u in ub.all_units(unet)}
    x = torch.randn(1, 128, 4, 4)  # up_blocks.0.1: cat([hidden 64, skip 64])
    (resnet, passthrough), = units["up_blocks.0.1"].parts
    assert torch.equal(passthrough((x, None), {}), x[:, :64])
    h = torch.randn(1, 32, 8, 8)
    (_, res_pass), (_, attn_pass) = units["down_blocks.0.0"].parts
    assert res_pass((h, None), {}) is h
    assert attn_pass((h,), {"return_dict": False})[0] is h
    assert attn_pass((h,), {}).sample is h


def test_dropping_with_a_predicate_follows_rank(unet):
    full = _run(unet, _inputs())
    state = {"k": 0}
    ub.skip_units(setattr, ub.depth_order(unet), lambda rank: rank < state["k"])
    assert torch.equal(_run(unet, _inputs()), full)  # k = 0: every unit runs
    state["k"] = 1  # the mid block (rank 0) skipped
    assert not torch.equal(_run(unet, _inputs()), full)
    state["k"] = 0
    assert torch.equal(_run(unet, _inputs()), full)


def test_unknown_or_unremovable_unit_is_one_line_error(unet):
    with pytest.raises(DiffbenchError, match=r"where: 'down_blocks.1.0' is not a removable unit")\
            as err:
        ub.select_units(unet, ["down_blocks.1.0"], "where")
    assert "\n" not in str(err.value) and "removable: down_blocks.0.0, mid_block" in str(err.value)


def test_active_parameters_subtract_removed_units(unet):
    units = ub.select_units(unet, ["mid_block", "up_blocks.1.1"], "test")
    total = sum(p.numel() for p in unet.parameters())
    removed = (sum(p.numel() for p in unet.mid_block.parameters())
               + sum(p.numel() for p in unet.up_blocks[1].resnets[1].parameters())
               + sum(p.numel() for p in unet.up_blocks[1].attentions[1].parameters()))
    assert ub.active_parameters(unet, units) == total - removed
    names = ub.unit_parameter_names(unet, units)
    assert "mid_block.resnets.0.conv1.weight" in names
    assert "up_blocks.1.attentions.1.proj_in.weight" in names
    assert "up_blocks.1.resnets.0.conv1.weight" not in names


def test_block_outputs_are_captured_and_hooks_removable(unet):
    store = {}
    hooks = ub.capture_block_outputs(unet, store, skip=("mid_block",))
    _run(unet, _inputs(batch=1))
    for h in hooks:
        h.remove()
    assert sorted(store) == ["down_blocks.0", "down_blocks.1", "up_blocks.0", "up_blocks.1"]
    assert store["down_blocks.0"].shape == (1, 32, 4, 4)
    assert store["up_blocks.1"].shape == (1, 32, 8, 8)
    assert all(not m._forward_hooks for m in unet.modules())


def test_teacher_pool_is_deterministic_and_batches_noise_it(tiny_pipe):
    prompts = ["a red circle", "a blue star"]
    a = ub.teacher_pool(tiny_pipe, prompts, 3, 2, torch.Generator().manual_seed(1))
    b = ub.teacher_pool(tiny_pipe, prompts, 3, 2, torch.Generator().manual_seed(1))
    assert a.latents.shape == (3, 4, 8, 8) and torch.equal(a.latents, b.latents)
    assert torch.equal(a.cond[0], a.cond[2]) and not torch.equal(a.cond[0], a.cond[1])
    batch = ub.sample_batch(tiny_pipe, a, 4, torch.Generator().manual_seed(0), uncond_prob=1.0)
    assert torch.equal(batch.cond, a.uncond.expand(4, -1, -1))
    sched = tiny_pipe.scheduler
    expected = sched.add_noise(batch.x0, batch.noise, batch.t)
    assert torch.equal(batch.x_t, expected)
    assert torch.equal(ub.diffusion_target(tiny_pipe, batch), batch.noise)


def test_non_unet_pipeline_is_refused_in_one_line():
    with one_line_error("^m needs a UNet pipeline"):
        ub.require_unet(DiTLike(), "m")


def test_teacher_pool_does_not_depend_on_the_chunk_size(tiny_pipe):
    pools = [ub.teacher_pool(tiny_pipe, ["a red circle"], 5, 2, torch.Generator().manual_seed(4),
                             chunk=c) for c in (2, 16)]
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
    pool = ub.data_pool(tiny_pipe, dataset, 3, seed=5, chunk=2)
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
    real = ub.data_pool(tiny_pipe, with_data.dataset, 2, 5)
    for source, data in (("auto", with_data), ("real", with_data)):
        pool = ub.training_pool(tiny_pipe, source, data, ["p"], 2, 1, gen, "ase")
        assert torch.equal(pool.latents, real.latents)
    teacher = ub.teacher_pool(tiny_pipe, ["p"], 2, 1, torch.Generator().manual_seed(3))
    for source, data in (("auto", without), ("teacher", with_data)):
        pool = ub.training_pool(tiny_pipe, source, data, ["p"], 2, 1,
                                torch.Generator().manual_seed(3), "ase")
        assert torch.equal(pool.latents, teacher.latents)
    with pytest.raises(DiffbenchError, match=r"^ase.data='real': model m@x has no training "
                                             r"images offline; use data='teacher'"):
        ub.training_pool(tiny_pipe, "real", without, ["p"], 2, 1, gen, "ase")


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
    assert ub.pool_prompts("auto", with_data, ["p"]) == ()
    assert ub.pool_prompts("auto", without, ["p"]) == ("p",)
    assert ub.pool_prompts("teacher", with_data, ["p"]) == ("p",)
    ase = METHODS.get("ase")
    assert ase.training_prompts(ase.config({}), with_data) == ()
    assert ase.training_prompts(ase.config({}), without) == ("p", "q")
    assert ase.training_prompts(ase.config({"steps": 0}), without) == ()
    prune = METHODS.get("prune_distill")
    assert prune.training_prompts(prune.config({"train_prompts": "general"}), without)[0] != "p"
    assert METHODS.get("esd").training_prompts(METHODS.get("esd").config({}), without) == ()
