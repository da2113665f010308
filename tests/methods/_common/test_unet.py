import copy
from types import SimpleNamespace

import pytest
import torch

from harness.errors import DiffbenchError
from methods._common import unet as U
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
    assert [u.name for u in U.all_units(unet)] == UNITS
    # down_blocks.1.0 maps 32 -> 64 channels; up_blocks.1.0 gets 64 hidden channels, outputs 32
    assert [u.name for u in U.depth_order(unet)] == [
        "mid_block", "up_blocks.0.0", "up_blocks.0.1", "down_blocks.0.0", "up_blocks.1.1"]


def test_units_hold_resnet_and_attention_pairs(unet):
    units = {u.name: u for u in U.all_units(unet)}
    assert [m for m, _ in units["down_blocks.0.0"].parts] == [
        unet.down_blocks[0].resnets[0], unet.down_blocks[0].attentions[0]]
    assert [m for m, _ in units["up_blocks.0.1"].parts] == [unet.up_blocks[0].resnets[1]]
    assert [m for m, _ in units["mid_block"].parts] == [unet.mid_block]


@pytest.mark.parametrize("names", [[n] for n in UNITS] + [UNITS])
def test_skipping_keeps_shapes_valid(unet, names):
    base = _run(unet, _inputs())
    U.skip_units(setattr, U.select_units(unet, names, "test"))
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
        U.skip_units(setattr, U.select_units(unet, ["down_blocks.0.0", "mid_block",
                                                      "up_blocks.1.1"], "test"))
        _run(unet, _inputs())
    counts = {name: counts[name] for name in probes}
    assert counts == {"down": 0, "down_attn": 0, "mid": 0, "up": 0, "up_attn": 0, "kept": 1}


def test_passthroughs_return_input_or_hidden_part(unet):
    units = {u.name: u for u in U.all_units(unet)}
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
    U.skip_units(setattr, U.depth_order(unet), lambda rank: rank < state["k"])
    assert torch.equal(_run(unet, _inputs()), full)  # k = 0: every unit runs
    state["k"] = 1  # the mid block (rank 0) skipped
    assert not torch.equal(_run(unet, _inputs()), full)
    state["k"] = 0
    assert torch.equal(_run(unet, _inputs()), full)


def test_unknown_or_unremovable_unit_is_one_line_error(unet):
    with pytest.raises(DiffbenchError, match=r"where: 'down_blocks.1.0' is not a removable unit")\
            as err:
        U.select_units(unet, ["down_blocks.1.0"], "where")
    assert "\n" not in str(err.value) and "removable: down_blocks.0.0, mid_block" in str(err.value)


def test_active_parameters_subtract_removed_units(unet):
    units = U.select_units(unet, ["mid_block", "up_blocks.1.1"], "test")
    total = sum(p.numel() for p in unet.parameters())
    removed = (sum(p.numel() for p in unet.mid_block.parameters())
               + sum(p.numel() for p in unet.up_blocks[1].resnets[1].parameters())
               + sum(p.numel() for p in unet.up_blocks[1].attentions[1].parameters()))
    assert U.active_parameters(unet, units) == total - removed
    names = U.unit_parameter_names(unet, units)
    assert "mid_block.resnets.0.conv1.weight" in names
    assert "up_blocks.1.attentions.1.proj_in.weight" in names
    assert "up_blocks.1.resnets.0.conv1.weight" not in names


def test_block_outputs_are_captured_and_hooks_removable(unet):
    store = {}
    hooks = U.capture_block_outputs(unet, store, skip=("mid_block",))
    _run(unet, _inputs(batch=1))
    for h in hooks:
        h.remove()
    assert sorted(store) == ["down_blocks.0", "down_blocks.1", "up_blocks.0", "up_blocks.1"]
    assert store["down_blocks.0"].shape == (1, 32, 4, 4)
    assert store["up_blocks.1"].shape == (1, 32, 8, 8)
    assert all(not m._forward_hooks for m in unet.modules())


def test_non_unet_pipeline_is_refused_in_one_line():
    with one_line_error("^m needs a UNet pipeline"):
        U.require_unet(DiTLike(), "m")




def test_denoiser_checks_name_the_method_and_what_is_missing():
    with one_line_error(r"^m needs a UNet pipeline \(pipe.unet with skips\); DiTLike has none$"):
        U.require_unet(DiTLike(), "m", "pipe.unet with skips")
    with one_line_error("^m needs a transformer denoiser"):
        U.require_transformer(SimpleNamespace(), "m")
    with one_line_error("has neither$"):
        U.require_denoiser(SimpleNamespace(), "m")
    with one_line_error(r"^m needs transformer blocks .*; Linear has none$"):
        U.require_transformer(DiTLike(), "m")
