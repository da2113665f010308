"""ASE block dropping (Moon et al., ICML 2024, arXiv 2408.05927): fewer denoiser blocks when noisy.

Adaptive Score Estimation's time-dependent exit schedule, training-free part (paper Sec. 3-4):
score estimation is easier at high noise, so early (noisy) steps run fewer blocks and late steps
run all of them. At step s of T the last k(s) blocks are skipped (a skipped block returns its
input): k = drop_max at step 0, falling to 0 over the first `until` fraction of the steps,
linearly (k = ceil(drop_max * (1 - s / (until * T)))) or as a step (k = drop_max throughout).
Transformer denoisers (pipe.transformer): the last k transformer blocks, as the paper does
for DiT (MMDiT blocks of SD3 / FLUX pass both token streams through; methods/_common/blocks.py).
UNets (pipe.unet), whose skip connections need valid shapes: the deepest
shape-preserving layers, in this order: the whole mid block first, then level by level from the
deepest, the down block's layers last-to-first followed by the mirrored up block's layers
first-to-last, where a layer is an attention (Transformer2DModel) or a resnet whose input and
output channels match with no resampling (up-block resnets take the concatenated skip, so they
always run). Without fine-tuning quality drops with k: the fine-tuned variant is `ase`
(methods/ase.py: resnet+attention pairs, a schedule over timestep values, fine-tuned for it);
`ase` with steps = 0 is its exact inference-only counterpart.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from harness.errors import DiffbenchError
from harness.method import MethodHandle, register_method
from harness.params import param
from harness.steps import StepContext
from methods._common.blocks import denoiser_blocks, passthrough
from methods._common.unet import (
    Passthrough,
    Unit,
    attention_passthrough,
    drop_count,
    hidden_passthrough,
    require_denoiser,
    skip_units,
)


@register_method("block_drop", touches=("transformer.blocks", "unet.block_outputs"))
@dataclass(frozen=True)
class BlockDropConfig:
    """ASE drop schedule: blocks dropped at the noisiest step and how that count decays."""

    drop_max: int = param(2, "blocks skipped at the first (noisiest) step (0 = all blocks run)",
                          low=0, high=1000)
    schedule: str = param("linear", "how the drop count falls to 0 over `until`",
                          choices=("linear", "step"))
    until: float = param(0.5, "fraction of the steps with dropped blocks; all blocks run after",
                         low=0.0, high=1.0)


Layer = tuple[str, torch.nn.Module, Passthrough]


def _level_layers(block: Any) -> list[Layer]:
    """Shape-preserving layers of one UNet block in forward order (resnet j, then attention j)."""
    attentions = list(getattr(block, "attentions", None) or [])
    out: list[Layer] = []
    for j, resnet in enumerate(getattr(block, "resnets", None) or []):
        if resnet.in_channels == resnet.out_channels and not (resnet.up or resnet.down):
            out.append((f"resnets.{j}", resnet, hidden_passthrough))
        if j < len(attentions):
            out.append((f"attentions.{j}", attentions[j], attention_passthrough))
    return out


def unet_units(unet: Any) -> list[Layer]:
    """Droppable UNet layers, deepest first: mid block, then per level down (reversed) + up."""
    units: list[Layer] = []
    if unet.mid_block is not None:
        units.append(("mid_block", unet.mid_block, hidden_passthrough))
    n = len(unet.down_blocks)
    for level in reversed(range(n)):
        down, up = f"down_blocks.{level}", f"up_blocks.{n - 1 - level}"
        units += [(f"{down}.{name}", m, fn)
                  for name, m, fn in reversed(_level_layers(unet.down_blocks[level]))]
        units += [(f"{up}.{name}", m, fn)
                  for name, m, fn in _level_layers(unet.up_blocks[n - 1 - level])]
    return units


def transformer_units(pipe: Any) -> list[Layer]:
    """Transformer blocks, last first (ASE skips the final blocks of a DiT; FLUX: its last
    single-stream blocks first), each skipped by returning its input streams."""
    blocks = denoiser_blocks(pipe, "block_drop")
    return [(b.name, b.module, passthrough(b)) for b in reversed(blocks)]


def denoiser_units(pipe: Any) -> tuple[str, list[Layer]]:
    """(what, layers): droppable layers of the pipeline's denoiser, in drop order."""
    what, denoiser = require_denoiser(pipe, "block_drop")
    return what, transformer_units(pipe) if what == "transformer" else unet_units(denoiser)


def apply(pipe: Any, config: BlockDropConfig, ctx: StepContext) -> MethodHandle:
    """Make unit r (in drop order) return its input while r < k(ctx.step)."""
    what, units = denoiser_units(pipe)
    high = len(units) - 1 if what == "transformer" else len(units)  # >= 1 transformer block
    if config.drop_max > high:
        raise DiffbenchError(f"block_drop.drop_max={config.drop_max} is out of range for this "
                             f"{what}; allowed [0, {high}]")
    handle = MethodHandle(pipe, "block_drop", config)
    if config.drop_max == 0:
        return handle  # all blocks run: the unchanged pipeline

    def dropped(rank: int) -> bool:
        c = config
        return rank < drop_count(ctx.step, ctx.num_steps, c.drop_max, c.schedule, c.until)

    skip_units(handle.swap_attr, [Unit(name, ((module, passthrough),))
                                  for name, module, passthrough in units[:config.drop_max]],
               dropped)
    return handle
