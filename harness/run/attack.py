"""The attack phase of an attacked cell: search (or load the cached result), then the cell's
prompts rewritten and the result installed while its images are made (harness/attack.py)."""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Any

import torch

from harness import params as P
from harness.attack import ATTACKS, AttackResult, AttackTarget, rewrite
from harness.cache import cache_root
from harness.method import MethodHandle
from harness.prepare import ArtifactCache
from harness.run.generate import call_kwargs, generate

ATTACK_FORMAT = 1  # bump when a stored attack result's meaning changes


def attack_key(cell: Any, config: Any) -> str:
    """Everything the result depends on: the unattacked cell (model, weights, method and its
    config, prompts, seed, steps, guidance), the attack and its config."""
    return P.short_hash({"cell": cell.unattacked.key, "attack": cell.attack,
                         "config": P.as_dict(config), "format": ATTACK_FORMAT})


def _meta(result: AttackResult, name: str, seconds: float) -> dict[str, Any]:
    return {"method": name, "text": result.text, "prompts": list(result.prompts),
            "info": dict(result.info), "seconds": round(seconds, 2),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S")}


def find(cell: Any, spec: Any, config: Any, pipe: Any, target: AttackTarget,
         cache: ArtifactCache | None = None) -> tuple[AttackResult, float]:
    """The attack's result and the seconds its search took (cached under
    $DIFFBENCH_CACHE/attacks like prepared weights, so a re-run reports the same cost)."""
    cache = cache or ArtifactCache(cache_root() / "attacks")
    key = attack_key(cell, config)
    tensors = cache.load(cell.attack, key)
    meta = cache.meta(cell.attack, key)
    if tensors is not None and "seconds" in meta:
        return AttackResult(text=meta.get("text", ""), prompts=tuple(meta.get("prompts", ())),
                            tensors=tensors, info=meta.get("info", {})), float(meta["seconds"])
    target.log(f"[attack] {cell.attack} {key}: searching (cached for later runs)")
    start = time.perf_counter()
    result = spec.search(pipe, config, target)
    seconds = time.perf_counter() - start
    tensors = dict(result.tensors) or {"none": torch.zeros(1)}
    cache.save(cell.attack, key, tensors, _meta(result, cell.attack, seconds))
    target.log(f"[attack] {cell.attack} {key}: done in {seconds:.1f} s")
    return dataclasses.replace(result, tensors=tensors), seconds


def columns(cell: Any, result: AttackResult, seconds: float) -> dict[str, Any]:
    """The row's attack columns besides attack_success (which the concept column gives)."""
    out: dict[str, Any] = {"attack_s": round(seconds, 2), "attack_text": result.text}
    for name in ("objective", "queries"):
        if name in result.info:
            out[f"attack_{name}"] = result.info[name]
    return out


def success_columns(metrics: dict[str, Any]) -> dict[str, Any]:
    """attack_success: the concept ratio under attack, with its interval."""
    return {f"attack_success{suffix}": metrics[f"concept_ratio{suffix}"]
            for suffix in ("", "_ci_lo", "_ci_hi") if f"concept_ratio{suffix}" in metrics}


def phase_attack(run: Any, switch: Any, prompts: Any,
                 context: Any) -> tuple[MethodHandle, dict[str, Any]]:
    """Search the cell's attack against its method's pipeline (or load the cached result),
    install it and rewrite the prompts of `run.batches` (a harness.run.cell.CellRun); the
    installed result's handle (remove() it after the images) and the row's columns. `switch`
    takes the cell's method off and puts it back (for the original model's images)."""
    from metrics.concept import concept_detector

    cell = run.cell
    texts = [p.text for p in prompts.prompts[: cell.n_images]]

    def make(batch: list[str], seeds: list[int], steps: int) -> torch.Tensor:
        """Images of the pipeline as it is now, batch_size per call, `steps` steps."""
        overrides = {**run.overrides, "num_inference_steps": steps}
        size = cell.batch_size
        return torch.cat([generate(run.pipe, run.ctx, call_kwargs(
            run.spec, batch[i:i + size], seeds[i:i + size], steps, cell.guidance,
            cell.resolution, overrides)) for i in range(0, len(batch), size)])

    spec = ATTACKS.get(cell.attack)
    config = spec.config(json.loads(cell.attack_params))
    rewritten, handle, row = run_attack(cell, spec, config, run.pipe, switch, make, texts,
                                        concept_detector(context, config.concept))
    run.batches = [dataclasses.replace(b, texts=tuple(rewritten[i] for i in b.indices))
                   for b in run.batches]
    return handle, row


def run_attack(cell: Any, spec: Any, config: Any, pipe: Any, switch: Any, make: Any,
               texts: list[str], detector: Any) -> tuple[list[str], MethodHandle, dict[str, Any]]:
    """Search (or load) the attack; the rewritten prompts (all of the cell's, in order), the
    installed result's handle and the row's columns. `make(texts, seeds, steps)` generates on
    the pipeline as it is at the time of the call."""

    def original(prompts: list[str], seeds: list[int], steps: int) -> torch.Tensor:
        switch.off()
        try:
            return make(prompts, seeds, steps)
        finally:
            switch.on()

    target = AttackTarget(concept=config.concept, prompts=tuple(texts), seed=cell.seed,
                          device=cell.device, generate=make, original=original,
                          concept_prob=detector, log=lambda m: print(m, flush=True))
    result, seconds = find(cell, spec, config, pipe, target)
    handle = spec.apply(pipe, config, result)
    return rewrite(texts, config.concept, result), handle, columns(cell, result, seconds)
