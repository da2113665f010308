from __future__ import annotations

import pytest
import torch

from harness.errors import DiffbenchError
from harness.method import METHODS
from methods.skip_tuning import skip_scales, up_block_scales
from tests.methods.contract import DiTLike, MethodContract, one_line_error


class TestSkipTuning(MethodContract):
    method = "skip_tuning"
    identity_params = {"rho_top": 1.0, "rho_bottom": 1.0}
    active_params = {"rho_top": 0.8, "rho_bottom": 1.0}

    def test_identity_registers_no_hook(self, tiny_pipe):
        with self.apply(tiny_pipe, self.identity_params):
            assert all(not b._forward_pre_hooks for b in tiny_pipe.unet.up_blocks)

    def test_rho_out_of_range_names_field(self):
        with pytest.raises(DiffbenchError, match=r"skip_tuning.rho_bottom=-0.1 is out of range"):
            METHODS.get("skip_tuning").config({"rho_bottom": "-0.1"})

    def test_transformer_pipeline_is_refused(self):
        with one_line_error("skip_tuning needs a UNet pipeline"):
            self.apply(DiTLike(), self.active_params)


def _capture(block: torch.nn.Module, store: list) -> torch.utils.hooks.RemovableHandle:
    def hook(module, args, kwargs):
        store.append(tuple(t.clone() for t in kwargs["res_hidden_states_tuple"]))

    return block.register_forward_pre_hook(hook, with_kwargs=True)


def test_up_blocks_receive_exactly_rho_times_the_skips(tiny_pipe):
    """Hooks around the method's own: each received skip is rho_k x the original, bit for bit."""
    unet, method = tiny_pipe.unet, METHODS.get("skip_tuning")
    config = method.config({"rho_top": 0.5, "rho_bottom": 1.25})
    before: list[list] = [[] for _ in unet.up_blocks]
    after: list[list] = [[] for _ in unet.up_blocks]
    hooks = [_capture(b, store) for b, store in zip(unet.up_blocks, before)]
    gen = torch.Generator().manual_seed(0)
    x, text = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 7, 32, generator=gen)
    try:
        with method.apply(tiny_pipe, config, None), torch.inference_mode():
            hooks += [_capture(b, store) for b, store in zip(unet.up_blocks, after)]
            unet(x, 500, encoder_hidden_states=text)
    finally:
        for h in hooks:
            h.remove()
    scales = up_block_scales(unet, config)
    rho = [0.5 * (1.0 - k / 3) + 1.25 * (k / 3) for k in range(4)]  # 4 skips, shallow to deep
    assert scales == [(rho[2], rho[3]), (rho[0], rho[1])]  # up block 0 takes the deepest
    for rhos, (orig,), (seen,) in zip(scales, before, after):
        assert len(orig) == len(rhos) == 2
        for rho, o, s in zip(rhos, orig, seen):
            assert torch.equal(s, o * rho)


def test_only_skips_change_not_the_up_path(tiny_pipe):
    """rho_top = rho_bottom = 0: the up blocks still run, on zeroed skips only."""
    unet, method = tiny_pipe.unet, METHODS.get("skip_tuning")
    seen: list = []
    gen = torch.Generator().manual_seed(1)
    x, text = torch.randn(1, 4, 8, 8, generator=gen), torch.randn(1, 7, 32, generator=gen)
    with method.apply(tiny_pipe, method.config({"rho_top": 0.0, "rho_bottom": 0.0}), None):
        hook = _capture(unet.up_blocks[1], seen)
        try:
            with torch.inference_mode():
                out = unet(x, 500, encoder_hidden_states=text).sample
        finally:
            hook.remove()
    assert all(not t.any() for t in seen[0])
    assert out.abs().sum() > 0


@pytest.mark.parametrize("k,top,bottom", [(4, 0.8, 1.0), (7, 1.0, 0.55), (1, 0.9, 0.7)])
def test_skip_scales_linear_in_depth(k, top, bottom):
    scales = skip_scales(k, top, bottom)
    assert len(scales) == k and scales[0] == top
    if k > 1:
        assert scales[-1] == bottom
        steps = [b - a for a, b in zip(scales, scales[1:])]
        assert steps == pytest.approx([(bottom - top) / (k - 1)] * (k - 1))
