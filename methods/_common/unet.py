"""The denoiser graph (helpers, no method): one denoiser check, removable UNet units, skipping.

A *unit* is something a diffusers `UNet2DConditionModel` can run without, keeping every skip
connection valid:
- `mid_block`: the whole middle block (input and output shapes always agree);
- `down_blocks.i.j`: resnet j of down block i plus its attention j (when the block has one),
  if the resnet keeps the channel count (a skipped pair returns its input, so the skip tensor
  the down path stores after it has the shape the up path expects);
- `up_blocks.i.j`: resnet j of up block i plus its attention j, if the resnet's own hidden
  input (before the skip tensor is concatenated to it) has its output's channel count: the
  skipped resnet returns that hidden part and ignores the skip tensor, as BK-SDM's removal of
  an up-stage pair drops the skip connection it consumed (Kim et al., arXiv 2305.15798).
Resamplers and channel-changing resnets always run. Skipping replaces the modules' `forward`
through a setter (a MethodHandle's `swap_attr`, or `setattr` on a training copy), so a
skipped module is never executed and the handle restores it exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from harness.errors import DiffbenchError


# --- the denoiser ------------------------------------------------------------------------------
def has_blocks(unet: Any) -> bool:
    """A UNet2DConditionModel-like denoiser: it has down and up blocks."""
    return hasattr(unet, "down_blocks") and hasattr(unet, "up_blocks")


def require_unet(pipe: Any, method: str, parts: str = "pipe.unet with down/up blocks",
                 found: Callable[[Any], Any] = has_blocks, kind: str = "UNet") -> Any:
    """The pipeline's UNet when `found(unet)` holds, else the one-line DiffbenchError
    "<method> needs a <kind> pipeline (<parts>); <pipeline class> has none"."""
    unet = getattr(pipe, "unet", None)
    if unet is None or not found(unet):
        raise DiffbenchError(f"{method} needs a {kind} pipeline ({parts}); "
                             f"{type(pipe).__name__} has none")
    return unet


def require_transformer(pipe: Any, method: str) -> list[torch.nn.Module]:
    """The transformer denoiser's blocks (pipe.transformer.transformer_blocks), or a one-line
    DiffbenchError naming what the pipeline lacks."""
    transformer = getattr(pipe, "transformer", None)
    if transformer is None:
        raise DiffbenchError(f"{method} needs a transformer denoiser (pipe.transformer); "
                             f"{type(pipe).__name__} has none")
    blocks = getattr(transformer, "transformer_blocks", None)
    if not blocks:
        raise DiffbenchError(f"{method} needs transformer blocks (transformer.transformer_blocks);"
                             f" {type(transformer).__name__} has none")
    return list(blocks)


def require_denoiser(pipe: Any, method: str) -> tuple[str, Any]:
    """("transformer", pipe.transformer) when it has transformer blocks, else ("UNet",
    pipe.unet) when it has down blocks, else a one-line DiffbenchError."""
    transformer = getattr(pipe, "transformer", None)
    if getattr(transformer, "transformer_blocks", None):
        return "transformer", transformer
    unet = getattr(pipe, "unet", None)
    if unet is not None and hasattr(unet, "down_blocks"):
        return "UNet", unet
    raise DiffbenchError(f"{method} needs a transformer (pipe.transformer with "
                         f"transformer_blocks) or a UNet (pipe.unet); {type(pipe).__name__} "
                         "has neither")


# --- removable units ---------------------------------------------------------------------------
Passthrough = Callable[[tuple, dict], Any]


@dataclass(frozen=True)
class Unit:
    """A removable unit: its name and the (module, passthrough) parts that skipping replaces."""

    name: str
    parts: tuple[tuple[torch.nn.Module, Passthrough], ...]

    def parameters(self) -> Iterable[torch.nn.Parameter]:
        for module, _ in self.parts:
            yield from module.parameters()


def hidden_passthrough(args: tuple, kwargs: dict) -> Any:
    """A skipped resnet / mid block / transformer block: its input tensor."""
    return args[0] if args else kwargs.get("hidden_states", kwargs.get("input_tensor"))


def attention_passthrough(args: tuple, kwargs: dict) -> Any:
    """A skipped Transformer2DModel: its input, as a tuple or an output object."""
    from diffusers.models.modeling_outputs import Transformer2DModelOutput

    hidden = hidden_passthrough(args, kwargs)
    return Transformer2DModelOutput(sample=hidden) if kwargs.get("return_dict", True) else (hidden,)


def _drop_skip(channels: int) -> Passthrough:
    """A skipped up-block resnet: the hidden part of cat([hidden, skip]), the skip ignored."""

    def passthrough(args: tuple, kwargs: dict) -> Any:
        return hidden_passthrough(args, kwargs)[:, :channels]

    return passthrough


def _pair(block: Any, j: int, resnet_pass: Passthrough) -> tuple:
    attentions = list(getattr(block, "attentions", None) or [])
    parts = [(block.resnets[j], resnet_pass)]
    if j < len(attentions):
        parts.append((attentions[j], attention_passthrough))
    return tuple(parts)


def _resamples(resnet: Any) -> bool:
    return bool(getattr(resnet, "up", False) or getattr(resnet, "down", False))


def down_units(unet: Any, i: int) -> list[Unit]:
    """Removable pairs of down block i, in forward order."""
    block = unet.down_blocks[i]
    return [Unit(f"down_blocks.{i}.{j}", _pair(block, j, hidden_passthrough))
            for j, r in enumerate(block.resnets)
            if r.in_channels == r.out_channels and not _resamples(r)]


def up_units(unet: Any, i: int) -> list[Unit]:
    """Removable pairs of up block i, in forward order (hidden input channels == output)."""
    block = unet.up_blocks[i]
    reversed_channels = list(unet.config.block_out_channels)[::-1]
    out = []
    for j, r in enumerate(block.resnets):
        hidden = block.resnets[j - 1].out_channels if j else reversed_channels[max(i - 1, 0)]
        if hidden == r.out_channels and r.in_channels > hidden and not _resamples(r):
            out.append(Unit(f"up_blocks.{i}.{j}", _pair(block, j, _drop_skip(hidden))))
    return out


def mid_units(unet: Any) -> list[Unit]:
    if unet.mid_block is None:
        return []
    return [Unit("mid_block", ((unet.mid_block, hidden_passthrough),))]


def all_units(unet: Any) -> list[Unit]:
    """Every removable unit in forward order (down blocks, mid block, up blocks)."""
    units = [u for i in range(len(unet.down_blocks)) for u in down_units(unet, i)]
    units += mid_units(unet)
    return units + [u for i in range(len(unet.up_blocks)) for u in up_units(unet, i)]


def depth_order(unet: Any) -> list[Unit]:
    """Removable units deepest first (ASE's exit order): the mid block, then level by level
    from the deepest, the down pairs last-to-first followed by the mirrored up pairs."""
    units = mid_units(unet)
    n = len(unet.down_blocks)
    for level in reversed(range(n)):
        units += list(reversed(down_units(unet, level))) + up_units(unet, n - 1 - level)
    return units


def select_units(unet: Any, names: Sequence[str], where: str) -> list[Unit]:
    """The units named (forward order); an unknown or unremovable name is a one-line error."""
    names = [str(n).strip() for n in names if str(n).strip()]
    units = all_units(unet)
    known = {u.name: u for u in units}
    for name in names:
        if name not in known:
            allowed = ", ".join(known) or "none"
            raise DiffbenchError(f"{where}: {name!r} is not a removable unit of this UNet "
                                 f"(resnets that change channels or resolution always run); "
                                 f"removable: {allowed}")
    return [u for u in units if u.name in set(names)]


def drop_count(step: int, num_steps: int, drop_max: int, schedule: str, until: float) -> int:
    """Blocks skipped at `step` (ASE's time-dependent exit schedule, Moon et al. 2024); 0 outside
    the dropping span."""
    span = until * num_steps
    if not 0 <= step < span:
        return 0
    if schedule == "step":
        return drop_max
    return min(drop_max, math.ceil(drop_max * (1 - step / span) - 1e-9))


def skip_units(swap: Callable[[Any, str, Any], None], units: Sequence[Unit],
               dropped: Callable[[int], bool] | None = None) -> None:
    """Make unit r return its passthrough while dropped(r) (always when dropped is None)."""
    for rank, unit in enumerate(units):
        for module, passthrough in unit.parts:
            swap(module, "forward", _skippable(rank, module.forward, passthrough, dropped))


def _skippable(rank: int, forward: Callable[..., Any], passthrough: Passthrough,
               dropped: Callable[[int], bool] | None) -> Callable[..., Any]:
    def run(*args: Any, **kwargs: Any) -> Any:
        if dropped is None or dropped(rank):
            return passthrough(args, kwargs)
        return forward(*args, **kwargs)

    return run


def to_dtype(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Cast `module` in place, skipped when already of `dtype` (diffusers warns on casts)."""
    if any(p.dtype != dtype for p in module.parameters()):
        torch.nn.Module.to(module, dtype)
    return module


def unit_parameter_names(unet: Any, units: Sequence[Unit]) -> set[str]:
    """Dotted names (in `unet`) of the parameters that belong to `units`."""
    ids = {id(p) for u in units for p in u.parameters()}
    return {name for name, p in unet.named_parameters() if id(p) in ids}


def active_parameters(unet: Any, removed: Sequence[Unit]) -> int:
    """Parameters a forward pass uses when `removed` are skipped."""
    skipped = {id(p) for u in removed for p in u.parameters()}
    return sum(p.numel() for p in unet.parameters() if id(p) not in skipped)


def capture_block_outputs(unet: Any, store: dict[str, torch.Tensor],
                          skip: Sequence[str] = ()) -> list[Any]:
    """Forward hooks storing each down block's, the mid block's and each up block's output
    (BK-SDM's feature-distillation points); returns the hook handles to remove."""
    blocks = [(f"down_blocks.{i}", b) for i, b in enumerate(unet.down_blocks)]
    blocks += [("mid_block", unet.mid_block)] if unet.mid_block is not None else []
    blocks += [(f"up_blocks.{i}", b) for i, b in enumerate(unet.up_blocks)]

    def hook(name: str) -> Callable[..., None]:
        def store_output(module: Any, args: Any, output: Any) -> None:
            store[name] = output[0] if isinstance(output, tuple) else output

        return store_output

    return [b.register_forward_hook(hook(name)) for name, b in blocks if name not in skip]
