"""Model registry: how each model is built (random weights from configs) or loaded (pretrained)."""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import re
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from harness.errors import DiffbenchError
from harness.files import inside
from harness.registry import Registry

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
RANDOM_WEIGHTS = ("none", "random")  # build from configs with random weights (speed/FLOPs only)
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")  # org/name; anything else: a path
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
    # image sides the pipeline accepts: multiples of this (SD pipelines check 8; a patched
    # transformer needs VAE factor x patch size); None: the size is fixed by the weights (DiT)
    resolution_multiple: int | None = 8

    def __post_init__(self) -> None:
        if self.call_kwargs is None:
            object.__setattr__(self, "call_kwargs", text_to_image_kwargs)


def text_to_image_kwargs(prompts: list[str], steps: int, guidance: float, resolution: int,
                         generators: list[torch.Generator]) -> dict:
    """Pipeline-call arguments of a text-to-image pipeline; images come back as float [0, 1]."""
    return dict(prompt=list(prompts), num_inference_steps=steps, guidance_scale=guidance,
                height=resolution, width=resolution, generator=generators, output_type="pt")


def _load_all_models() -> None:
    for module in ("harness.models.tiny", "harness.models.zoo", "harness.models.flow_zoo",
                   "harness.mini.pipeline", "harness.mini.mmdit"):
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
    path, local = Path(os.path.expanduser(weights)), looks_local(weights)
    if local:
        check_pipeline_folder(path, spec.name)
    try:
        return cls.from_pretrained(str(path) if local else weights, dtype=dtype,
                                   **spec.load_kwargs)
    except OSError as exc:
        where = path if local else f"hub id '{weights}' (local cache and network)"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DiffbenchError(f"cannot load weights for model '{spec.name}' from {where}: {first}; "
                             "use --weights none for random weights (speed only)") from None


def check_resolution(spec: ModelSpec, resolution: int) -> None:
    """Refuse an image side the model's pipeline would reject (or silently ignore)."""
    multiple = spec.resolution_multiple
    if multiple is None and resolution != spec.resolution:
        raise DiffbenchError(f"resolution={resolution}: model '{spec.name}' generates "
                             f"{spec.resolution}x{spec.resolution} only (fixed by its weights)")
    if multiple is not None and (resolution % multiple or resolution < multiple):
        below, above = max(multiple, resolution - resolution % multiple), \
            resolution - resolution % multiple + multiple
        raise DiffbenchError(f"resolution={resolution}: model '{spec.name}' needs a multiple of "
                             f"{multiple} (e.g. {below} or {above})")


def looks_local(weights: str) -> bool:
    """A weights argument names a local folder (else it is a hub id)."""
    path = Path(os.path.expanduser(weights))
    return (path.is_absolute() or weights.startswith((".", "~")) or path.exists()
            or not HUB_ID.fullmatch(weights))


def check_weights(spec: ModelSpec, weights: str) -> None:
    """Before any work: a local or embedded weights folder exists, is a diffusers pipeline
    folder (model_index.json naming component folders that exist) and its safetensors files
    are whole (header and data length). Hub ids are checked when they are loaded."""
    if weights in RANDOM_WEIGHTS:
        return
    if weights == EMBEDDED:
        if not spec.embedded_weights:
            raise DiffbenchError(f"model '{spec.name}' ships no embedded weights")
        check_pipeline_folder(Path(spec.embedded_weights), spec.name, "; this installation lacks "
                              "the embedded weights (reinstall diffbench, or --weights none)")
    elif looks_local(weights):
        check_pipeline_folder(Path(os.path.expanduser(weights)), spec.name)
    elif os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(weights, "model_index.json"), str):
            raise DiffbenchError(f"weights for model '{spec.name}': hub id '{weights}' is not in "
                                 "the local Hugging Face cache and HF_HUB_OFFLINE is set")


def check_pipeline_folder(path: Path, model: str, hint: str = "") -> None:
    """One line naming what is wrong with a pipeline folder, or nothing."""
    where = f"weights for model '{model}'"
    if not path.exists():
        raise DiffbenchError(f"{where} not found: no folder at {path}{hint}")
    if not path.is_dir():
        raise DiffbenchError(f"{where}: {path} is a file, not a pipeline folder{hint}")
    index_path = path / "model_index.json"
    if not index_path.is_file():
        raise DiffbenchError(f"{where}: {path} has no model_index.json (not a diffusers "
                             f"pipeline folder; write one with pipe.save_pretrained){hint}")
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DiffbenchError(f"{where}: {index_path} is not valid JSON "
                             f"({type(exc).__name__}){hint}") from None
    if not isinstance(index, dict):
        raise DiffbenchError(f"{where}: {index_path} is not a JSON object{hint}")
    for name, entry in index.items():
        if name.startswith("_") or not isinstance(entry, list) or None in entry:
            continue
        folder = inside(path, name, f"{index_path} component")
        if not folder.is_dir():
            raise DiffbenchError(f"{where}: {index_path} names component '{name}' but "
                                 f"{folder} is not a folder{hint}")
        for file in sorted(folder.glob("*.safetensors")):
            problem = safetensors_problem(file)
            if problem:
                raise DiffbenchError(f"{where}: {file} is damaged ({problem}){hint}")


def safetensors_problem(path: Path) -> str | None:
    """Why a safetensors file is not whole (header unreadable, data shorter than the header
    says), or None. Reads the header only."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                return "shorter than its 8-byte header length"
            (n,) = struct.unpack("<Q", head)
            if n > min(size - 8, 100_000_000):
                return "header length beyond the file"
            header = json.loads(fh.read(n))
    except (OSError, ValueError) as exc:
        return f"unreadable header ({type(exc).__name__})"
    if not isinstance(header, dict):
        return "header is not a JSON object"
    ends = [e["data_offsets"][1] for k, e in header.items()
            if k != "__metadata__" and isinstance(e, dict) and len(e.get("data_offsets", ())) == 2]
    if ends and max(ends) > size - 8 - n:
        return f"data ends at {max(ends)} bytes but only {size - 8 - n} are present (truncated)"
    return None
