"""Block-level methods on MMDiT denoisers (SD3 joint blocks; FLUX double and single blocks):
the stream protocol of methods/_common/blocks.py, and compute really skipped."""

from __future__ import annotations

import pytest
import torch

from harness.method import METHODS
from harness.steps import StepContext
from methods._common.blocks import STREAMS, denoiser_blocks, passthrough
from tests.methods.dit_fixtures import flops_of

ACTIVE = {"fora": {"interval": 3}, "delta_dit": {"interval": 2, "num_blocks": 2},
          "block_drop": {"drop_max": 2, "until": 0.5}}


def test_stream_table_names_real_diffusers_block_classes():
    from diffusers.models import attention
    from diffusers.models.transformers import transformer_flux

    for name in STREAMS:
        assert hasattr(attention, name) or hasattr(transformer_flux, name), name


def test_blocks_in_forward_order_with_their_protocol(sd3_pipe):
    blocks = denoiser_blocks(sd3_pipe, "m")
    assert [b.name for b in blocks] == [f"transformer_blocks.{i}" for i in range(6)]
    assert all(b.streams.joint for b in blocks)


def test_passthrough_returns_both_streams_in_the_block_protocol(sd3_pipe):
    block = denoiser_blocks(sd3_pipe, "m")[0]
    h, e = torch.randn(1, 64, 96), torch.randn(1, 16, 96)
    out = passthrough(block)((), {"hidden_states": h, "encoder_hidden_states": e, "temb": None})
    assert out[0] is e and out[1] is h and block.outputs(out) == (h, e)


def test_flux_runs_double_then_single_blocks(flux_pipe):
    names = [b.name for b in denoiser_blocks(flux_pipe, "m")]
    assert names == ["transformer_blocks.0", "transformer_blocks.1",
                     "single_transformer_blocks.0", "single_transformer_blocks.1"]


@pytest.mark.parametrize("model", ["sd3", "tiny_sd3", "flux"])
@pytest.mark.parametrize("method", list(ACTIVE))
def test_active_setting_computes_less_than_the_baseline(request, model, method):
    pipe = request.getfixturevalue(f"{model}_pipe")
    spec = request.getfixturevalue(f"{model}_spec")
    m = METHODS.get(method)
    base = flops_of(pipe, spec, StepContext(), steps=6)
    ctx = StepContext()
    with m.apply(pipe, m.config(ACTIVE[method]), ctx):
        less = flops_of(pipe, spec, ctx, steps=6)
    assert less < base, (method, less, base)
