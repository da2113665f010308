"""ToMe for SD (Bolya & Hoffman, arXiv 2303.17604): merge redundant tokens before attention.

Before self-attention of every transformer block at the allowed resolutions, bipartite soft
matching merges r = ratio * N tokens: the token grid is cut into sx x sy windows, one random
token per window is a destination, the others are sources; each source is matched to its most
similar destination (cosine similarity) and the r best-matched sources are averaged into their
destinations. Attention runs on the N - r remaining tokens and its output is unmerged (copied
back to the merged positions) before the residual add (paper Sec. 3-4: merge before, unmerge
after each component; cross-attention and MLP optional). As in the reference tomesd, similarity
uses the block's input tokens, the merge plan is computed once per block call and shared by
the merged components, and r is capped at the number of source tokens. The random destination
choice comes from a CPU torch.Generator reseeded from (seed, step) at every UNet call, so it
depends on neither the batch nor earlier pipeline calls.

Transformer denoisers (DiT, PixArt: BasicTransformerBlocks with adaLN; SD3 / SD3.5 MMDiT joint
blocks): the same plan from each block's input image tokens on the patch grid (latent size /
patch size), merged before and unmerged after the block's image-token components: self-
attention (`merge_attn`: DiT / PixArt attn1; MMDiT's joint attention, whose text tokens are
never merged, and SD3.5's second image self-attention), PixArt's cross-attention queries
(`merge_crossattn`) and the image MLP (`merge_mlp`). FLUX is refused: its attention applies
rotary position embeddings shared by the whole batch, which a per-image merge plan would need
per image (as would any other block class outside `TRANSFORMER_PARTS`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from harness.errors import DiffbenchError
from harness.method import MethodHandle, register_method
from harness.params import param
from harness.steps import StepContext
from methods._common.blocks import denoiser_blocks
from methods._common.unet import require_denoiser, require_unet

# the components of a transformer block whose image tokens each switch merges
TRANSFORMER_PARTS = {
    "BasicTransformerBlock": {"merge_attn": ("attn1",), "merge_crossattn": ("attn2",),
                              "merge_mlp": ("ff",)},
    "JointTransformerBlock": {"merge_attn": ("attn", "attn2"), "merge_crossattn": (),
                              "merge_mlp": ("ff",)},
}
REFUSED = {"FluxTransformerBlock": "rotary position embeddings shared by the batch",
           "FluxSingleTransformerBlock": "rotary position embeddings shared by the batch"}


@register_method("tome", touches=("attention.tokens",))
@dataclass(frozen=True)
class ToMeConfig:
    """ToMe merge ratio, resolutions it applies to, window shape and merged components."""

    ratio: float = param(0.5, "share of tokens merged, r = ratio * N (0 = off)", low=0.0, high=0.9)
    max_downsample: int = param(1, "merge only in blocks whose latent downsampling is at most this",
                                choices=(1, 2, 4, 8))
    sx: int = param(2, "window width: one destination token per sx x sy window", low=1, high=8)
    sy: int = param(2, "window height: one destination token per sx x sy window", low=1, high=8)
    use_rand: bool = param(True, "random destination in each window (False = top-left token)")
    seed: int = param(0, "seed of the random destination choice", low=0, high=2**31 - 1)
    merge_attn: bool = param(True, "merge tokens before self-attention (attn1)")
    merge_crossattn: bool = param(False, "merge tokens before cross-attention (attn2)")
    merge_mlp: bool = param(False, "merge tokens before the feed-forward (ff)")


@dataclass(frozen=True)
class TokenMerge:
    """One bipartite matching plan (paper Sec. 3): which source tokens go to which destination."""

    src_pos: torch.Tensor  # (S,) token positions of the sources
    dst_pos: torch.Tensor  # (D,) token positions of the destinations
    kept: torch.Tensor  # (B, S - r) indices into the sources that stay unmerged
    moved: torch.Tensor  # (B, r) indices into the sources merged away
    target: torch.Tensor  # (B, r) destination index each moved source is averaged into

    def merge(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, C) -> (B, N - r, C): kept sources, then destinations averaged with sources."""
        src, dst = x[:, self.src_pos], x[:, self.dst_pos]
        c = x.shape[-1]
        kept = src.gather(1, self.kept[..., None].expand(-1, -1, c))
        moved = src.gather(1, self.moved[..., None].expand(-1, -1, c))
        dst = dst.scatter_reduce(1, self.target[..., None].expand(-1, -1, c), moved, reduce="mean")
        return torch.cat([kept, dst], dim=1)

    def unmerge(self, y: torch.Tensor) -> torch.Tensor:
        """(B, N - r, C) -> (B, N, C): every merged source takes its destination's value."""
        b, c, k = y.shape[0], y.shape[-1], self.kept.shape[1]
        kept, dst = y[:, :k], y[:, k:]
        src = y.new_empty(b, self.src_pos.numel(), c)
        src.scatter_(1, self.kept[..., None].expand(-1, -1, c), kept)
        src.scatter_(1, self.moved[..., None].expand(-1, -1, c),
                     dst.gather(1, self.target[..., None].expand(-1, -1, c)))
        out = y.new_empty(b, self.src_pos.numel() + self.dst_pos.numel(), c)
        out[:, self.dst_pos] = dst
        out[:, self.src_pos] = src
        return out


def split_windows(h: int, w: int, sx: int, sy: int, generator: torch.Generator | None,
                  use_rand: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(dst positions, src positions) of a row-major h x w grid: one dst per sx x sy window.

    Rows/columns past the last whole window are sources (as in the reference tomesd). Both are
    ascending. There are exactly hs * ws destinations (one per whole window), so a stable
    argsort of the destination mask (sources first) yields both sets with static shapes: no
    `nonzero`, whose output size is data-dependent under fake tensors (FLOP counting).
    """
    hs, ws = h // sy, w // sx
    if use_rand:
        pick = torch.randint(sx * sy, (hs, ws), generator=generator)
    else:
        pick = torch.zeros(hs, ws, dtype=torch.long)
    rows = torch.arange(hs)[:, None] * sy + pick // sx
    cols = torch.arange(ws)[None, :] * sx + pick % sx
    is_dst = torch.zeros(h, w, dtype=torch.long)
    is_dst[rows, cols] = 1
    order = is_dst.flatten().argsort(stable=True)
    n_src = h * w - hs * ws
    return order[n_src:], order[:n_src]


def bipartite_matching(metric: torch.Tensor, h: int, w: int, r: int, sx: int = 2, sy: int = 2,
                       generator: torch.Generator | None = None,
                       use_rand: bool = True) -> TokenMerge:
    """Bipartite soft matching on a 2D token grid (paper Sec. 3, tomesd's random 2D variant)."""
    dst_pos, src_pos = split_windows(h, w, sx, sy, generator, use_rand)
    dst_pos, src_pos = dst_pos.to(metric.device), src_pos.to(metric.device)
    unit = metric / metric.norm(dim=-1, keepdim=True)
    similarity = unit[:, src_pos] @ unit[:, dst_pos].transpose(1, 2)  # (B, S, D)
    best, best_dst = similarity.max(dim=-1)
    order = best.argsort(dim=-1, descending=True)
    r = min(r, src_pos.numel())
    moved = order[:, :r]
    return TokenMerge(src_pos, dst_pos, order[:, r:], moved, best_dst.gather(1, moved))


def grid_downsample(tokens: int, height: int, width: int, limit: int = 64) -> int | None:
    """The power-of-two downsampling d with ceil(H/d) * ceil(W/d) == tokens, or None."""
    d = 1
    while d <= limit:
        if math.ceil(height / d) * math.ceil(width / d) == tokens:
            return d
        d *= 2
    return None


class _Merger:
    """Per-denoiser-call state: token grid size and a generator reseeded from (seed, step);
    on a transformer also the plan of the block call in progress."""

    def __init__(self, config: ToMeConfig, ctx: StepContext, patch: int = 1):
        self.config, self.ctx, self.patch = config, ctx, patch
        self.size: tuple[int, int] | None = None
        self.generator = torch.Generator("cpu")
        self.current: TokenMerge | None = None

    def before_unet(self, module: Any, args: tuple, kwargs: dict) -> None:
        sample = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))
        self.size = (int(sample.shape[-2]) // self.patch, int(sample.shape[-1]) // self.patch)
        self.generator.manual_seed((self.config.seed << 20) + max(self.ctx.step, 0))

    def before_block(self, block: Any) -> Any:
        """Transformer block pre-hook: the plan from the block's input image tokens."""

        def hook(module: Any, args: tuple, kwargs: dict) -> None:
            self.current = self.plan(block.inputs(args, kwargs)[0])

        return hook

    def after_block(self, module: Any, args: tuple, out: Any) -> None:
        self.current = None

    def plan(self, x: torch.Tensor) -> TokenMerge | None:
        """A merge plan for block input x (B, N, C), or None when this block is not merged."""
        c, n = self.config, x.shape[1]
        if self.size is None:
            return None
        d = grid_downsample(n, *self.size)
        if d is None or d > c.max_downsample:
            return None
        h, w = math.ceil(self.size[0] / d), math.ceil(self.size[1] / d)
        r = int(n * c.ratio)
        if r <= 0 or h < c.sy or w < c.sx:
            return None
        return bipartite_matching(x, h, w, r, c.sx, c.sy, self.generator, c.use_rand)


def check_block(name: str, block: Any) -> None:
    """Refuse transformer blocks whose forward the ToMe wrapper does not reproduce."""
    problems = {
        f"norm_type {block.norm_type!r}": block.norm_type != "layer_norm",
        "only_cross_attention": block.only_cross_attention,
        "positional embeddings": block.pos_embed is not None,
        "GLIGEN fuser": hasattr(block, "fuser"),
        "chunked feed-forward": block._chunk_size is not None,
    }
    bad = [k for k, v in problems.items() if v]
    if bad:
        raise DiffbenchError(f"tome does not support transformer block {name} with {bad[0]} "
                             "(only SD-style layer_norm BasicTransformerBlocks)")


def tome_forward(block: Any, original: Any, merger: _Merger, config: ToMeConfig) -> Any:
    """BasicTransformerBlock.forward (layer_norm config) with merge/unmerge around components."""

    def forward(hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                encoder_hidden_states: torch.Tensor | None = None,
                encoder_attention_mask: torch.Tensor | None = None, timestep: Any = None,
                cross_attention_kwargs: dict[str, Any] | None = None, class_labels: Any = None,
                added_cond_kwargs: Any = None) -> torch.Tensor:
        plan = merger.plan(hidden_states) if attention_mask is None else None
        if plan is None:
            return original(hidden_states, attention_mask, encoder_hidden_states,
                            encoder_attention_mask, timestep, cross_attention_kwargs,
                            class_labels, added_cond_kwargs)
        kwargs = dict(cross_attention_kwargs or {})
        if kwargs.pop("gligen", None) is not None:
            raise DiffbenchError("tome does not support GLIGEN inputs (cross_attention_kwargs)")
        x = hidden_states

        def part(use: bool, module: Any, normed: torch.Tensor, **kw: Any) -> torch.Tensor:
            if not use:
                return module(normed, **kw)
            return plan.unmerge(module(plan.merge(normed), **kw))

        x = part(config.merge_attn, block.attn1, block.norm1(x), encoder_hidden_states=None,
                 attention_mask=attention_mask, **kwargs) + x
        x = x.squeeze(1) if x.ndim == 4 else x
        if block.attn2 is not None:
            x = part(config.merge_crossattn, block.attn2, block.norm2(x),
                     encoder_hidden_states=encoder_hidden_states,
                     attention_mask=encoder_attention_mask, **kwargs) + x
        x = part(config.merge_mlp, block.ff, block.norm3(x)) + x
        return x.squeeze(1) if x.ndim == 4 else x

    return forward


def merged_component(original: Any, merger: _Merger) -> Any:
    """A component's forward on the block plan's merged image tokens, its output unmerged (a
    joint attention's text output, the tuple's second entry, passes unchanged)."""

    def forward(*args: Any, **kwargs: Any) -> Any:
        plan = merger.current
        if plan is None:
            return original(*args, **kwargs)
        if "hidden_states" in kwargs:
            kwargs["hidden_states"] = plan.merge(kwargs["hidden_states"])
        else:
            args = (plan.merge(args[0]), *args[1:])
        out = original(*args, **kwargs)
        if isinstance(out, tuple):
            return (plan.unmerge(out[0]), *out[1:])
        return plan.unmerge(out)

    return forward


def apply_transformer(pipe: Any, config: ToMeConfig, ctx: StepContext) -> MethodHandle:
    """Merge each block's image tokens around its components (TRANSFORMER_PARTS)."""
    blocks = denoiser_blocks(pipe, "tome")
    transformer = pipe.transformer
    for b in blocks:
        kind = type(b.module).__name__
        if kind not in TRANSFORMER_PARTS:
            why = REFUSED.get(kind, "no merge rule for this block")
            raise DiffbenchError(f"tome does not merge tokens in {type(transformer).__name__}'s "
                                 f"{kind} ({why}); it merges DiT, PixArt and SD3 blocks")
    handle = MethodHandle(pipe, "tome", config)
    if config.ratio == 0.0:
        return handle
    merger = _Merger(config, ctx, int(transformer.config.patch_size))
    handle.add_hook(transformer.register_forward_pre_hook(merger.before_unet, with_kwargs=True))
    for b in blocks:
        handle.add_hook(b.module.register_forward_pre_hook(merger.before_block(b),
                                                           with_kwargs=True))
        handle.add_hook(b.module.register_forward_hook(merger.after_block))
        for switch, names in TRANSFORMER_PARTS[type(b.module).__name__].items():
            for name in names if getattr(config, switch) else ():
                part = getattr(b.module, name, None)
                if part is not None:
                    handle.swap_attr(part, "forward", merged_component(part.forward, merger))
    return handle


def transformer_blocks(unet: Any) -> list[tuple[str, Any]]:
    """The UNet's diffusers BasicTransformerBlocks, by qualified name."""
    from diffusers.models.attention import BasicTransformerBlock

    return [(n, m) for n, m in unet.named_modules() if type(m) is BasicTransformerBlock]


def apply(pipe: Any, config: ToMeConfig, ctx: StepContext) -> MethodHandle:
    """Wrap every transformer block's forward with merge/unmerge; ratio 0 wraps nothing."""
    if not (config.merge_attn or config.merge_crossattn or config.merge_mlp):
        raise DiffbenchError("tome: set at least one of merge_attn, merge_crossattn, merge_mlp")
    if require_denoiser(pipe, "tome")[0] == "transformer":
        return apply_transformer(pipe, config, ctx)
    unet = require_unet(pipe, "tome", "pipe.unet with transformer blocks", transformer_blocks)
    blocks = transformer_blocks(unet)
    for name, block in blocks:
        check_block(name, block)
    handle = MethodHandle(pipe, "tome", config)
    if config.ratio == 0.0:
        return handle
    merger = _Merger(config, ctx)
    handle.add_hook(unet.register_forward_pre_hook(merger.before_unet, with_kwargs=True))
    for _, block in blocks:
        handle.swap_attr(block, "forward", tome_forward(block, block.forward, merger, config))
    return handle
