"""Skipping every block after the first on some denoiser calls, adding back the residual the
skipped blocks gave on the last call that ran them (First Block Cache, TeaCache).

A `BlockSkip` wraps the first block (the subclass's `head`: it decides whether this call skips,
and what the skip returns), every later block (run, or its input streams passed through on a
skip) and the last block, which stores `residual`: the last block's output streams minus
`base`, the streams the head recorded on this full call (its output for FBCache, its input for
TeaCache). State is kept per denoiser call within a step (`state()`), starts afresh with every
generation, and `stats` counts the calls and the skipped ones (`cache_calls`, `cache_skips`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from harness.method import MethodHandle
from harness.params import param
from methods._common.blocks import Block, passthrough, sub_stream
from methods._common.cache import GenerationCache, fixed_rate_computes


def rate_param() -> Any:
    """The `rate` field of a block-skipping cache's config: a fixed schedule instead of the
    adaptive decision (for speed rows on random weights)."""
    return param(0.0, "0: decide by the threshold (the paper); in (0, 1): skip this share of "
                 "the steps on a fixed schedule instead (random-weight speed rows)",
                 low=0.0, high=0.99)


@dataclass
class SkipState:
    """One call index's skip decision, the head's streams and the skipped blocks' residual."""

    skip: bool = False
    base: tuple[Any, Any] = (None, None)
    residual: tuple[Any, Any] | None = None


class BlockSkip(GenerationCache):
    """The wrapping shared by the block-skipping caches; subclasses define `head` and the state
    class (a SkipState subclass)."""

    state_cls: type[SkipState] = SkipState

    def __init__(self, ctx: Any, stats: dict[str, int], rate: float = 0.0):
        super().__init__(ctx)
        self.stats, self.rate = stats, rate

    def scheduled_skip(self) -> bool:
        """With `rate` > 0: whether the fixed schedule skips this step."""
        return not fixed_rate_computes(self.ctx.step, self.ctx.num_steps, self.rate)

    def before_denoiser(self, module: Any, args: tuple, kwargs: dict) -> None:
        """Denoiser pre-hook: a new generation clears the states; count calls within a step."""
        self.begin_call()

    def state(self) -> Any:
        return self.store.setdefault(self.call, self.state_cls())

    def count(self, skip: bool) -> None:
        self.stats["cache_calls"] = self.stats.get("cache_calls", 0) + 1
        if skip:
            self.stats["cache_skips"] = self.stats.get("cache_skips", 0) + 1

    def head(self, block: Block, forward: Any) -> Any:
        raise NotImplementedError

    def rest(self, block: Block, forward: Any, tail: bool) -> Any:
        """A later block: its input streams on a skip; the last one stores the residual."""
        skipped = passthrough(block)

        def run(*args: Any, **kwargs: Any) -> Any:
            st = self.state()
            if st.skip:
                return skipped(args, kwargs)
            out = forward(*args, **kwargs)
            if tail:
                hidden, encoder = block.outputs(out)
                st.residual = (hidden - st.base[0], sub_stream(encoder, st.base[1]))
            return out

        return run

    def install(self, handle: MethodHandle, pipe: Any, blocks: list[Block]) -> None:
        """Through the handle: the denoiser pre-hook and every block's wrapped forward; a
        fixed schedule says so in the row's note."""
        if self.rate > 0:
            handle.report["method_note"] = (f"fixed schedule: {self.rate:g} of the steps "
                                            "skipped, not the threshold's decision")
        handle.add_hook(pipe.transformer.register_forward_pre_hook(self.before_denoiser,
                                                                   with_kwargs=True))
        head, *others = blocks
        handle.swap_attr(head.module, "forward", self.head(head, head.module.forward))
        for i, b in enumerate(others):
            handle.swap_attr(b.module, "forward",
                             self.rest(b, b.module.forward, tail=i == len(others) - 1))
        handle.on_remove(self.clear)
