"""Transformer denoiser blocks and their streams: what the block-level methods need to know.

A DiT / PixArt block (`BasicTransformerBlock`) maps the image tokens to image tokens. An MMDiT
block (SD3's `JointTransformerBlock`, FLUX's double `FluxTransformerBlock` and single
`FluxSingleTransformerBlock`) is called with `hidden_states` (image tokens) and
`encoder_hidden_states` (text tokens) and returns `(encoder_hidden_states, hidden_states)`;
SD3's last block returns `None` for the text stream (`context_pre_only`). `STREAMS` says which
protocol each block class follows and which of its sub-layers are its attention and MLP
branches (FORA caches those); `Block` reads a call's streams and builds a block's return
value, so a method can skip a block, add a delta to it, or cache it without knowing its class.
FLUX runs its double blocks, then its single blocks: `denoiser_blocks` lists them in that
order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from harness.errors import DiffbenchError
from methods._common.unet import require_transformer


@dataclass(frozen=True)
class Streams:
    """How a block class passes its token streams, and its attention / MLP branch layers."""

    joint: bool  # (hidden_states, encoder_hidden_states) in, (encoder, hidden) out
    branches: tuple[str, ...]  # sub-layers whose outputs are the block's residual branches


STREAMS: dict[str, Streams] = {
    # diffusers BasicTransformerBlock (DiT adaLN-Zero, PixArt adaLN-single): self-attention,
    # cross-attention (PixArt), MLP.
    "BasicTransformerBlock": Streams(False, ("attn1", "attn2", "ff")),
    # SD3 / SD3.5 MMDiT: joint attention (attn), SD3.5's second image self-attention (attn2,
    # MMDiT-X dual-attention layers), the image MLP and the text MLP.
    "JointTransformerBlock": Streams(True, ("attn", "attn2", "ff", "ff_context")),
    # FLUX double-stream block: joint attention, image MLP, text MLP.
    "FluxTransformerBlock": Streams(True, ("attn", "ff", "ff_context")),
    # FLUX single-stream block: attention and the MLP's input projection run in parallel on
    # the concatenated tokens (proj_out, which mixes them, still runs).
    "FluxSingleTransformerBlock": Streams(True, ("attn", "proj_mlp")),
}


@dataclass(frozen=True)
class Block:
    """One denoiser block, where it sits (`name`) and its stream protocol."""

    name: str
    module: torch.nn.Module
    streams: Streams

    def inputs(self, args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(image tokens, text tokens or None) of a call of this block."""
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        if not self.streams.joint:
            return hidden, None
        if "encoder_hidden_states" in kwargs:
            return hidden, kwargs["encoder_hidden_states"]
        return hidden, args[1 if "hidden_states" not in kwargs else 0]

    def outputs(self, out: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(image tokens, text tokens or None) of what the block returned."""
        return (out[1], out[0]) if self.streams.joint else (out, None)

    def result(self, hidden: torch.Tensor, encoder: torch.Tensor | None) -> Any:
        """What the block returns for these streams (its call protocol)."""
        return (encoder, hidden) if self.streams.joint else hidden


def denoiser_blocks(pipe: Any, method: str) -> list[Block]:
    """The transformer's blocks in forward order (FLUX: double, then single blocks), each with
    its stream protocol; a block class outside `STREAMS` is a one-line error."""
    require_transformer(pipe, method)
    transformer = pipe.transformer
    named = [(f"transformer_blocks.{i}", b) for i, b in enumerate(transformer.transformer_blocks)]
    named += [(f"single_transformer_blocks.{i}", b)
              for i, b in enumerate(getattr(transformer, "single_transformer_blocks", None) or [])]
    blocks = []
    for name, module in named:
        streams = STREAMS.get(type(module).__name__)
        if streams is None:
            raise DiffbenchError(f"{method} does not know the block type {type(module).__name__} "
                                 f"of {type(transformer).__name__} (known: {', '.join(STREAMS)})")
        blocks.append(Block(name, module, streams))
    return blocks


def passthrough(block: Block) -> Any:
    """The (args, kwargs) -> output of `block` skipped: its input streams, unchanged."""
    return lambda args, kwargs: block.result(*block.inputs(args, kwargs))


def add_stream(a: Any, b: Any) -> Any:
    """a + b for a token stream that may be absent (None: SD3's last block has no text out)."""
    return a if a is None or b is None else a + b


def sub_stream(a: Any, b: Any) -> Any:
    """a - b, or None when either stream is absent."""
    return None if a is None or b is None else a - b
