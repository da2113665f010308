"""FORA (Selvaraju et al., arXiv 2407.01425): reuse every DiT block's attention and MLP outputs.

Fast-Forward Caching (paper Sec. 3, static caching): on key steps, every N steps from step 0,
each transformer block runs in full and the outputs of its attention and MLP layers are cached;
on the other steps those layers return their cached outputs, while the rest of the block (the
adaLN modulation and gates of the current step, the residual adds) still runs. Implemented on
diffusers' BasicTransformerBlock (DiT: adaLN-Zero; PixArt: adaLN-single, where the
cross-attention `attn2` is cached too) and on the MMDiT blocks of SD3 (joint attention, SD3.5's
second attention, image and text MLPs) and FLUX (double blocks likewise; single blocks: the
attention and the MLP's input projection), the branches named in methods/_common/blocks.py, by
overriding their forward on the instance. `start_step` keeps every step before it a full step
(the paper caches from the first step). Cached outputs are kept per denoiser call within a step
(DiT's CFG batch is one call) and dropped when a generation ends, so nothing leaks between
pipeline calls.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from harness.errors import DiffbenchError
from harness.method import MethodHandle, register_method
from harness.params import param
from harness.steps import StepContext
from methods._common.blocks import denoiser_blocks
from methods._common.cache import StepCache, cached_forward


@register_method("fora", touches=("transformer.blocks",))
@dataclass(frozen=True)
class ForaConfig:
    """FORA cache interval and the step caching starts from."""

    interval: int = param(3, "N: attention/MLP outputs recomputed every N steps (1 = never reuse)",
                          low=1, high=1000)
    start_step: int = param(0, "every step before this one runs in full; caching starts here",
                            low=0, high=100000)


def is_key_step(step: int, interval: int, start_step: int = 0) -> bool:
    """FORA's static schedule (Sec. 3): full compute before start_step, then every N steps."""
    return step < start_step or (step - start_step) % interval == 0


def apply(pipe: Any, config: ForaConfig, ctx: StepContext) -> MethodHandle:
    """Wrap every block's attention / MLP forward with the cache; count denoiser calls."""
    blocks = denoiser_blocks(pipe, "fora")
    layers = [(f"{b.name}.{name}", getattr(b.module, name)) for b in blocks
              for name in b.streams.branches if getattr(b.module, name, None) is not None]
    if not layers:
        raise DiffbenchError(f"fora needs attention/MLP layers in the transformer blocks; "
                             f"{type(blocks[0].module).__name__} has none")
    handle = MethodHandle(pipe, "fora", config)
    if config.interval == 1:
        return handle  # every step is a key step: the unchanged pipeline
    cache = StepCache(ctx, lambda step, _: is_key_step(step, config.interval, config.start_step))
    handle.add_hook(pipe.transformer.register_forward_pre_hook(cache.before_denoiser,
                                                               with_kwargs=True))
    for key, layer in layers:
        handle.swap_attr(layer, "forward", cached_forward(cache, key, layer.forward))
    handle.on_remove(cache.clear)
    return handle
