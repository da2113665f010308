"""torch.compile as a cell axis, applied after the method and undone after the cell.

Modes: "denoiser" compiles the whole UNet / transformer (`nn.Module.compile`, so the module
object, its attributes and the method's hooks stay where they are); "regional" compiles each
repeated block (diffusers' `_repeated_blocks` where the model declares them, else every
transformer block and resnet), which compiles faster and breaks less; "max-autotune" is
"denoiser" with inductor's autotuned kernels. Dynamo's counters give the graphs compiled and
the graph breaks.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import torch

from metrics.stages import denoiser

REPEATED = ("BasicTransformerBlock", "ResnetBlock2D", "Transformer2DModel", "DiTBlock",
            "PixArtTransformerBlock", "FluxTransformerBlock", "FluxSingleTransformerBlock",
            "JointTransformerBlock")


def _whole(net: torch.nn.Module) -> list[torch.nn.Module]:
    return [net]


def _regions(net: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks, outermost only (nothing inside a chosen block is chosen again)."""
    names = tuple(getattr(net, "_repeated_blocks", ()) or ()) or REPEATED
    chosen: dict[str, torch.nn.Module] = {}
    for name, module in net.named_modules():
        inside = any(name.startswith(f"{prefix}.") for prefix in chosen)
        if type(module).__name__ in names and not inside:
            chosen[name] = module
    return list(chosen.values())


# mode -> (modules of the denoiser to compile, torch.compile options)
COMPILERS: dict[str, tuple[Callable[[torch.nn.Module], list[torch.nn.Module]], dict[str, Any]]] = {
    "denoiser": (_whole, {}),
    "regional": (_regions, {}),
    "max-autotune": (_whole, {"mode": "max-autotune"}),
}


def dynamo_counts() -> tuple[int, int]:
    """(graphs compiled, graph breaks) so far in this process, from torch._dynamo's counters."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"]), int(sum(counters["graph_break"].values()))


@dataclasses.dataclass
class CompileState:
    """What compiling did: the modules compiled and the counters when it started."""

    mode: str
    modules: int = 0
    graphs_at_start: int = 0
    breaks_at_start: int = 0

    def counts(self) -> tuple[int, int]:
        """(graphs compiled, graph breaks) since compiling started."""
        graphs, breaks = dynamo_counts()
        return graphs - self.graphs_at_start, breaks - self.breaks_at_start


@contextlib.contextmanager
def compiled(pipe: Any, mode: str) -> Iterator[CompileState]:
    """The pipeline's denoiser compiled in `mode` for the block ("off": untouched); afterwards
    each module's compiled call is dropped and dynamo's caches are reset."""
    state = CompileState(mode)
    if mode == "off":
        yield state
        return
    select, options = COMPILERS[mode]
    modules = select(denoiser(pipe))
    state.graphs_at_start, state.breaks_at_start = dynamo_counts()
    for module in modules:
        module.compile(**options)
    state.modules = len(modules)
    try:
        yield state
    finally:
        for module in modules:
            module._compiled_call_impl = None
        torch._dynamo.reset()
