"""UNet blocks (helpers, no method): removable resnet+attention pairs, skipping, training data.

Shared by the block-level training methods (`ase`, `prune_distill`). A *unit* is something a
diffusers `UNet2DConditionModel` can run without, keeping every skip connection valid:
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

The training pool is here too: x_0 latents with the text embedding of each, which training
batches noise at random timesteps (DDPM, eq. 4). `data = "real"`: the model's own training
images (ModelSpec.dataset; mini-sd: its world) encoded by the VAE, as the papers train on real
images; `"teacher"` (data-free): latents the unchanged teacher generates from the training
prompts with a few DDIM steps (classifier-free guidance `GUIDANCE`); `"auto"`: real when the
model has a dataset offline, else teacher.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from harness.errors import DiffbenchError
from methods._common import training as finetune

GUIDANCE = 5.0  # classifier-free guidance of the teacher's pool generations
UNCOND_PROB = 0.1  # share of training samples conditioned on "" (SD's caption dropout)

Passthrough = Callable[[tuple, dict], Any]


@dataclass(frozen=True)
class Unit:
    """A removable unit: its name and the (module, passthrough) parts that skipping replaces."""

    name: str
    parts: tuple[tuple[torch.nn.Module, Passthrough], ...]

    def parameters(self) -> Iterable[torch.nn.Parameter]:
        for module, _ in self.parts:
            yield from module.parameters()


def _hidden(args: tuple, kwargs: dict) -> Any:
    """A skipped resnet / mid block: its input tensor."""
    return args[0] if args else kwargs.get("hidden_states", kwargs.get("input_tensor"))


def _attention_output(args: tuple, kwargs: dict) -> Any:
    """A skipped Transformer2DModel: its input, as a tuple or an output object."""
    from diffusers.models.modeling_outputs import Transformer2DModelOutput

    hidden = _hidden(args, kwargs)
    return Transformer2DModelOutput(sample=hidden) if kwargs.get("return_dict", True) else (hidden,)


def _drop_skip(channels: int) -> Passthrough:
    """A skipped up-block resnet: the hidden part of cat([hidden, skip]), the skip ignored."""

    def passthrough(args: tuple, kwargs: dict) -> Any:
        return _hidden(args, kwargs)[:, :channels]

    return passthrough


def require_unet(pipe: Any, method: str) -> Any:
    """The pipeline's UNet2DConditionModel-like denoiser, or a one-line DiffbenchError."""
    unet = getattr(pipe, "unet", None)
    if unet is None or not hasattr(unet, "down_blocks") or not hasattr(unet, "up_blocks"):
        raise DiffbenchError(f"{method} needs a UNet pipeline (pipe.unet with down/up blocks); "
                             f"{type(pipe).__name__} has none")
    return unet


def _pair(block: Any, j: int, resnet_pass: Passthrough) -> tuple:
    attentions = list(getattr(block, "attentions", None) or [])
    parts = [(block.resnets[j], resnet_pass)]
    if j < len(attentions):
        parts.append((attentions[j], _attention_output))
    return tuple(parts)


def _resamples(resnet: Any) -> bool:
    return bool(getattr(resnet, "up", False) or getattr(resnet, "down", False))


def down_units(unet: Any, i: int) -> list[Unit]:
    """Removable pairs of down block i, in forward order."""
    block = unet.down_blocks[i]
    return [Unit(f"down_blocks.{i}.{j}", _pair(block, j, _hidden))
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
    return [] if unet.mid_block is None else [Unit("mid_block", ((unet.mid_block, _hidden),))]


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


# --- training pool --------------------------------------------------------------------------
DATA_CHOICES = ("auto", "real", "teacher")
DATA_DOC = ("training x_0: 'real' (the model's training images, e.g. mini-sd's world, VAE-"
            "encoded), 'teacher' (generated by the unchanged model from the training prompts, "
            "data-free) or 'auto' (real when the model has a dataset offline)")
@dataclass
class Pool:
    """Teacher-generated x_0 latents, the text embedding of each, and the "" embedding."""

    latents: torch.Tensor
    cond: torch.Tensor
    uncond: torch.Tensor


@dataclass
class Batch:
    """One training batch: noisy latents x_t, timesteps, the noise, x_0 and the conditioning."""

    x_t: torch.Tensor
    t: torch.Tensor
    noise: torch.Tensor
    x0: torch.Tensor
    cond: torch.Tensor


@torch.no_grad()
def teacher_pool(pipe: Any, prompts: Sequence[str], size: int, steps: int,
                 generator: torch.Generator, chunk: int = 16) -> Pool:
    """`size` latents (prompts cycled) from the unchanged UNet: `steps` DDIM steps with CFG,
    `chunk` latents at a time (the initial noise is drawn at once: same pool for any chunk)."""
    if not prompts:
        raise DiffbenchError("training needs prompts (PrepareData.prompts is empty)")
    unet = pipe.unet
    texts = [prompts[i % len(prompts)] for i in range(size)]
    cond = finetune.text_embeddings(pipe, texts).to(unet.device, unet.dtype)
    uncond = finetune.text_embeddings(pipe, [""]).to(unet.device, unet.dtype)
    noise = torch.randn(finetune.latent_shape(pipe, size), generator=generator)
    latents = [_ddim(pipe, noise[i:i + chunk], cond[i:i + chunk], uncond, steps)
               for i in range(0, size, chunk)]
    return Pool(latents=torch.cat(latents), cond=cond, uncond=uncond)


@torch.no_grad()
def data_pool(pipe: Any, dataset: Callable[[int, int], tuple[torch.Tensor, list[str]]],
              size: int, seed: int, chunk: int = 64) -> Pool:
    """`size` real training images of the model (`dataset(size, seed)`), VAE-encoded (the
    posterior mean x scaling factor, as SD's latents), with their captions' text embeddings."""
    images, captions = dataset(size, seed)
    vae, unet = pipe.vae, pipe.unet
    pixels = (images * 2 - 1).to(vae.device, vae.dtype)
    latents = torch.cat([vae.encode(pixels[i:i + chunk]).latent_dist.mean
                         for i in range(0, size, chunk)]) * vae.config.scaling_factor
    cond = finetune.text_embeddings(pipe, captions).to(unet.device, unet.dtype)
    uncond = finetune.text_embeddings(pipe, [""]).to(unet.device, unet.dtype)
    return Pool(latents=latents.to(unet.device, unet.dtype), cond=cond, uncond=uncond)


def uses_real_data(source: str, data: Any) -> bool:
    """Whether `training_pool` takes the model's real images for this `data` choice."""
    return source == "real" or (source == "auto" and data.dataset is not None)


def pool_prompts(source: str, data: Any, prompts: Sequence[str]) -> tuple[str, ...]:
    """The prompts a training pool reads: none for real images (captions come with them)."""
    return () if uses_real_data(source, data) else tuple(prompts)


def training_pool(pipe: Any, source: str, data: Any, prompts: Sequence[str], size: int,
                  steps: int, generator: torch.Generator, owner: str) -> Pool:
    """The pool a method's `data` field asks for (see the module docstring); `data` is the
    PrepareData. "real" on a model without a dataset is a one-line error."""
    if uses_real_data(source, data):
        if data.dataset is None:
            raise DiffbenchError(f"{owner}.data='real': model {data.model} has no training "
                                 "images offline; use data='teacher' (generated)")
        return data_pool(pipe, data.dataset, size, data.seed)
    return teacher_pool(pipe, prompts, size, steps, generator)


def _ddim(pipe: Any, noise: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor,
          steps: int) -> torch.Tensor:
    """DDIM sampling (Song et al. 2021) with classifier-free guidance `GUIDANCE`."""
    unet = pipe.unet
    sched = finetune.ddim_scheduler(pipe, steps)
    x = (noise * sched.init_noise_sigma).to(unet.device, unet.dtype)
    uncond = uncond.expand(x.shape[0], -1, -1)
    for t in sched.timesteps:
        eps = unet(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([uncond, cond])).sample
        e_u, e_c = eps.chunk(2)
        x = sched.step(finetune.guided(e_u, e_c, GUIDANCE), t, x).prev_sample
    return x


def sample_batch(pipe: Any, pool: Pool, size: int, generator: torch.Generator,
                 uncond_prob: float = UNCOND_PROB) -> Batch:
    """Random pool items noised at random timesteps; a share conditioned on "" (for CFG)."""
    index = torch.randint(0, pool.latents.shape[0], (size,), generator=generator)
    drop = torch.rand(size, generator=generator) < uncond_prob
    x0 = pool.latents[index.to(pool.latents.device)]
    x_t, t, noise = finetune.noisy_latents(pipe, x0, generator)
    cond = pool.cond[index.to(pool.cond.device)].clone()
    cond[drop.to(cond.device)] = pool.uncond[0]
    return Batch(x_t=x_t, t=t, noise=noise, x0=x0, cond=cond)


def diffusion_target(pipe: Any, batch: Batch) -> torch.Tensor:
    """What the UNet should predict for the batch: the noise (epsilon) or the velocity v."""
    kind = pipe.scheduler.config.get("prediction_type", "epsilon")
    if kind == "epsilon":
        return batch.noise
    if kind == "v_prediction":
        return pipe.scheduler.get_velocity(batch.x0, batch.noise, batch.t)
    raise DiffbenchError(f"training supports epsilon or v_prediction UNets, not {kind!r}")
