"""Prepared artifacts: weights a method trains or calibrates before it is applied.

See ARCHITECTURE.md, "How to add" (a method).

A method module that defines `prepare(pipe, config, data) -> dict[str, Tensor]` is a *training*
method: the runner calls `prepare` once per (model, weights, method, config), stores the returned
tensors as safetensors keyed by that hash, and hands them to `apply(pipe, config, ctx, artifact)`.
Re-runs (and other shards, other cells with the same config) load the file instead of training.
`prepare` must leave the pipeline exactly as it found it (train copies); the contract tests check.
The training budget (steps, learning rate) is part of the method's config, so it is in the hash;
so are the seed and the prompts prepare reads: the cell's prompt set, or what the module's
`training_prompts(config, data)` says it reads (none for erasure methods, which train on their
concept prompts only; the first n for calibration), so one training serves every prompt set
that gives it the same data.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from harness import params as P
from harness.cache import CACHE_ENV, cache_root
from harness.errors import DiffbenchError, WriteFailed
from harness.files import atomic_write

ARTIFACT_FORMAT = 1  # bump when a stored artifact's meaning changes


def _print(message: str) -> None:
    print(message, flush=True)


@dataclass(frozen=True)
class PrepareData:
    """What a prepare step may use: the model's identity, training prompts, seed, device, log,
    and the model's real training data when it has some."""

    model: str  # model name and weights source, e.g. "mini-sd@embedded"
    prompts: tuple[str, ...]  # training prompts: the cell's prompt set
    seed: int = 0
    device: str = "cpu"
    log: Callable[[str], None] = field(default=_print, compare=False)
    # the model's real training images, (n, seed) -> (images in [0, 1], captions); None if it
    # has none offline (ModelSpec.dataset; a fixed function of the model, so not in the key)
    dataset: Callable[[int, int], tuple[torch.Tensor, list[str]]] | None = field(
        default=None, compare=False)
    # the model's own pipeline-call arguments at its default resolution, (prompts, steps,
    # guidance, generators) -> kwargs (harness.run.generate.model_call); calibrating a
    # transformer runs the real pipeline with them. None: unknown (UNet-only preparation)
    call_kwargs: Callable[[list[str], int, float, list[torch.Generator]], dict] | None = field(
        default=None, compare=False)


def cache_dir() -> Path:
    return cache_root() / "prepared"


def artifact_key(data: PrepareData, method: str, config: Any) -> str:
    """Hash of everything the artifact depends on: model, training prompts (data.prompts) and
    seed, method, full config, format. (Not the device: weights trained on one device are reused
    on another.)"""
    return P.short_hash({"model": data.model, "prompts": P.short_hash(list(data.prompts)),
                         "seed": data.seed, "method": method, "config": P.as_dict(config),
                         "format": ARTIFACT_FORMAT})


class ArtifactCache:
    """Artifacts as `<method>-<key>.safetensors` + `.json` (meta) under one folder; atomic writes.

    `root=None` keeps them in memory only (tests)."""

    def __init__(self, root: str | Path | None = "default"):
        self.root = cache_dir() if root == "default" else (Path(root) if root else None)
        self._memory: dict[str, dict[str, torch.Tensor]] = {}
        self._meta: dict[str, dict[str, Any]] = {}

    def path(self, method: str, key: str) -> Path:
        assert self.root is not None
        return self.root / f"{method}-{key}.safetensors"

    def load(self, method: str, key: str) -> dict[str, torch.Tensor] | None:
        if self.root is None:
            return self._memory.get(f"{method}-{key}")
        path = self.path(method, key)
        if not path.exists():
            return None
        from safetensors.torch import load_file

        if self.meta(method, key).get("method") != method:
            print(f"diffbench: ignoring prepared weights {path}: their meta file is missing or "
                  "damaged; retraining", flush=True)
            return None
        try:
            return load_file(str(path))
        except Exception as exc:  # noqa: BLE001 - a broken file is retrained, never trusted
            print(f"diffbench: ignoring unreadable prepared weights {path} ({exc}); retraining",
                  flush=True)
            return None

    def meta(self, method: str, key: str) -> dict[str, Any]:
        """What `save` recorded beside the weights (training seconds, config); {} if unknown."""
        if self.root is None:
            return dict(self._meta.get(f"{method}-{key}", {}))
        try:
            meta = json.loads(self.path(method, key).with_suffix(".json").read_text())
        except (OSError, ValueError):
            return {}
        return meta if isinstance(meta, dict) else {}

    def save(self, method: str, key: str, tensors: Mapping[str, torch.Tensor],
             meta: Mapping[str, Any]) -> None:
        tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
        if self.root is None:
            self._memory[f"{method}-{key}"] = tensors
            self._meta[f"{method}-{key}"] = dict(meta)
            return
        from safetensors.torch import save

        path = self.path(method, key)
        try:  # meta first: weights without their meta are only missing train_s, never wrong
            atomic_write(path.with_suffix(".json"), json.dumps(dict(meta), indent=1, default=str))
            atomic_write(path, save(tensors, metadata={"method": method, "key": key}))
        except WriteFailed as exc:
            raise WriteFailed(exc.path, exc.os_error,
                              f"set {CACHE_ENV} to a writable folder") from None


def member_key(member: Any, config: Any, data: PrepareData) -> str:
    """A method's artifact key over the prompts its prepare step reads (MethodSpec.
    training_prompts): a method that ignores the cell's prompts is trained once for all sets."""
    prompts = tuple(member.training_prompts(config, data))
    return artifact_key(replace(data, prompts=prompts), member.name, config)


def prepare_artifacts(spec: Any, pipe: Any, config: Any, data: PrepareData,
                      cache: ArtifactCache) -> dict[str, dict[str, torch.Tensor]]:
    """Artifacts of every training member of a method or stack, by member name; cached."""
    members = getattr(spec, "members", (spec,))
    out: dict[str, dict[str, torch.Tensor]] = {}
    for member in members:
        if not member.prepares:
            continue
        member_config = getattr(config, member.name) if len(members) > 1 else config
        key = member_key(member, member_config, data)
        tensors = cache.load(member.name, key)
        if tensors is None:
            data.log(f"[prepare] {member.name} {key}: training (cached for later runs)")
            start = time.perf_counter()
            tensors = member.prepare(pipe, member_config, data)
            seconds = time.perf_counter() - start
            if not tensors:
                raise DiffbenchError(f"method '{member.name}': prepare returned no weights")
            cache.save(member.name, key, tensors, {
                "method": member.name, "model": data.model, "config": P.as_dict(member_config),
                "seconds": round(seconds, 2), "created": time.strftime("%Y-%m-%dT%H:%M:%S")})
            data.log(f"[prepare] {member.name} {key}: done in {seconds:.1f} s")
        out[member.name] = tensors
    return out


def train_seconds(spec: Any, config: Any, data: PrepareData, cache: ArtifactCache) -> float | None:
    """Seconds the prepare steps of a method or stack took when their artifacts were made
    (recorded in the cache, so a re-run that loads them reports the same time); None if unknown."""
    members = getattr(spec, "members", (spec,))
    total, known = 0.0, False
    for member in members:
        if not member.prepares:
            continue
        member_config = getattr(config, member.name) if len(members) > 1 else config
        seconds = cache.meta(member.name, member_key(member, member_config, data))
        if isinstance(seconds.get("seconds"), (int, float)):
            total, known = total + float(seconds["seconds"]), True
    return total if known else None
