"""Model registry: how each model is built (random weights from configs) or loaded (pretrained)."""

from __future__ import annotations

import dataclasses
import importlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from harness.errors import DiffbenchError
from harness.registry import Registry

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
RANDOM_WEIGHTS = ("none", "random")  # build from configs with random weights (speed/FLOPs only)
EMBEDDED = "embedded"  # the weights folder shipped inside the package (spec.embedded_weights)


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """A registered model: defaults of its generation settings and how to get a pipeline."""

    name: str
    build_random: Callable[[torch.dtype], Any]  # random weights from the published configs
    pipeline_class: str  # diffusers class used by from_pretrained
    hub_id: str | None = None  # default pretrained weights
    resolution: int = 512
    steps: int = 50
    guidance: float = 7.5
    conditioning: str = "text"  # "text" prompts, or "class" labels (DiT)
    default_weights: str = "pretrained"  # "pretrained" (hub_id) or "none" (random)
    has_quality: bool = True  # False: a toy whose images carry no meaning
    description: str = ""
    call_kwargs: Callable[..., dict] = None  # (prompts, steps, guidance, resolution, generators)
    load_kwargs: dict = dataclasses.field(default_factory=dict)  # extra from_pretrained arguments
    embedded_weights: str | None = None  # a pipeline folder inside the package: the default
    # real training images: (n, seed) -> (N x 3 x H x W float in [0, 1], captions); None = none
    # offline (training methods then use teacher-generated data; mini-sd: its world)
    dataset: Callable[[int, int], tuple[torch.Tensor, list[str]]] | None = None
    # an embedded model trained on harness.mini's world: quality metrics score it with the
    # mini-CLIP, the world's real images and the zero-shot judge (metrics.bootstrap.is_embedded)
    embedded: bool = False

    def __post_init__(self) -> None:
        if self.call_kwargs is None:
            object.__setattr__(self, "call_kwargs", text_to_image_kwargs)


def text_to_image_kwargs(prompts: list[str], steps: int, guidance: float, resolution: int,
                         generators: list[torch.Generator]) -> dict:
    """Pipeline-call arguments of a text-to-image pipeline; images come back as float [0, 1]."""
    return dict(prompt=list(prompts), num_inference_steps=steps, guidance_scale=guidance,
                height=resolution, width=resolution, generator=generators, output_type="pt")


def _load_all_models() -> None:
    for module in ("harness.models.tiny", "harness.models.zoo", "harness.mini.pipeline"):
        importlib.import_module(module)


MODELS: Registry[ModelSpec] = Registry("model", loader=_load_all_models)


def register_model(name: str, **fields: Any) -> Callable[[Callable], Callable]:
    """Decorator on a `build_random(dtype) -> pipeline` function; the only place a name is set."""

    def decorator(build: Callable) -> Callable:
        doc = (build.__doc__ or "").strip().splitlines()
        spec = ModelSpec(name=name, build_random=build, description=doc[0] if doc else "", **fields)
        MODELS.register(name)(spec)
        return build

    return decorator


def resolve_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise DiffbenchError(f"unknown dtype '{name}'; choose one of {', '.join(DTYPES)}") from None


def weights_source(spec: ModelSpec, weights: str | None) -> str:
    """Canonical weights choice for a cell: 'none', a local path or a hub id."""
    if weights in (None, "", "default"):
        if spec.embedded_weights:
            return EMBEDDED
        return "none" if spec.default_weights == "none" else (spec.hub_id or "none")
    return "none" if weights in RANDOM_WEIGHTS else weights


def load_pipeline(spec: ModelSpec, weights: str, dtype: torch.dtype, device: str) -> Any:
    """A diffusers pipeline for the model: random weights, a local folder or a hub id."""
    if weights == "none":
        pipe = spec.build_random(dtype)
    elif weights == EMBEDDED:
        if not spec.embedded_weights:
            raise DiffbenchError(f"model '{spec.name}' ships no embedded weights")
        pipe = _from_pretrained(spec, spec.embedded_weights, dtype)
    else:
        pipe = _from_pretrained(spec, weights, dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def _from_pretrained(spec: ModelSpec, weights: str, dtype: torch.dtype) -> Any:
    import diffusers
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()  # the runner shows its own progress
    transformers_logging.disable_progress_bar()
    cls = getattr(diffusers, spec.pipeline_class)
    path = Path(os.path.expanduser(weights))
    looks_local = path.is_absolute() or weights.startswith(".") or path.exists()
    if looks_local and not path.is_dir():
        raise DiffbenchError(f"weights for model '{spec.name}' not found: no folder at {path}")
    try:
        return cls.from_pretrained(str(path) if looks_local else weights, dtype=dtype,
                                   **spec.load_kwargs)
    except OSError as exc:
        where = path if looks_local else f"hub id '{weights}' (local cache and network)"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DiffbenchError(f"cannot load weights for model '{spec.name}' from {where}: {first}; "
                             "use --weights none for random weights (speed only)") from None
