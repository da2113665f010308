"""The shared training loop of the mini model's stages: seeds, lr schedule, checkpoints, resume."""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path
from typing import Any


def log(message: str) -> None:
    print(time.strftime("%H:%M:%S ") + message, flush=True)


def stage_seed(seed: int, stage: str, step: int) -> int:
    """A distinct deterministic seed per (run seed, stage, step)."""
    offset = {"clip": 0, "vae": 1, "unet": 2, "assemble": 3, "clip-tune": 4, "mmdit": 5}[stage]
    return (seed * 1_000_003 + offset * 100_000_007 + step) % (2**62)


def lr_at(step: int, total: int, peak: float, warmup: int = 100, floor: float = 0.05) -> float:
    """Linear warm-up, then cosine decay to floor * peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def fmt_time(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else \
        f"{seconds // 60}m{seconds % 60:02d}s"


def optimizer_tensors(opt: Any) -> dict[str, Any]:
    """AdamW state as flat named tensors (safetensors holds no nested objects)."""
    out = {}
    for index, state in opt.state_dict()["state"].items():
        for name, value in state.items():
            out[f"opt.{index}.{name}"] = value.detach().clone().contiguous()
    return out


def load_optimizer_tensors(opt: Any, tensors: dict[str, Any]) -> None:
    sd = opt.state_dict()
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("opt."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    sd["state"] = state
    opt.load_state_dict(sd)


class Checkpoint:
    """`<work>/<stage>/ckpt.safetensors` (models, EMA, optimizer) + `state.json` (step, time)."""

    def __init__(self, work: Path, stage: str, every_minutes: float):
        self.dir = work / stage
        self.dir.mkdir(parents=True, exist_ok=True)
        self.every = every_minutes * 60
        self.last = time.monotonic()

    @property
    def final(self) -> Path:
        return self.dir / "final"

    def load(self) -> tuple[dict, dict[str, Any]] | None:
        from safetensors.torch import load_file

        state_path, tensor_path = self.dir / "state.json", self.dir / "ckpt.safetensors"
        if not (state_path.is_file() and tensor_path.is_file()):
            return None
        return json.loads(state_path.read_text()), load_file(str(tensor_path))

    def save(self, state: dict, tensors: dict[str, Any]) -> None:
        from safetensors.torch import save_file

        tmp = self.dir / "ckpt.tmp.safetensors"
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
        os.replace(tmp, self.dir / "ckpt.safetensors")
        (self.dir / "state.tmp.json").write_text(json.dumps(state, indent=1))
        os.replace(self.dir / "state.tmp.json", self.dir / "state.json")
        self.last = time.monotonic()

    def due(self) -> bool:
        return time.monotonic() - self.last >= self.every


def prefixed(prefix: str, module: Any) -> dict[str, Any]:
    return {f"{prefix}.{k}": v.detach().clone() for k, v in module.state_dict().items()}


def unprefixed(prefix: str, tensors: dict[str, Any]) -> dict[str, Any]:
    n = len(prefix) + 1
    return {k[n:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}


def train_loop(stage: str, args: argparse.Namespace, work: Path, total: int,
               modules: dict[str, Any], opt: Any, step_fn: Any, peak_lr: float,
               after_step: Any = None) -> dict:
    """The shared loop: resume, lr schedule, progress lines, periodic checkpoints."""
    ckpt = Checkpoint(work, stage, args.checkpoint_minutes)
    state = {"stage": stage, "step": 0, "seconds": 0.0, "seed": args.seed, "total": total}
    loaded = ckpt.load()
    if loaded is not None:
        saved, tensors = loaded
        if saved.get("seed") != args.seed:
            raise SystemExit(f"{ckpt.dir} holds a checkpoint of seed {saved.get('seed')}, "
                             f"not {args.seed}; remove it or pass --work elsewhere")
        for name, module in modules.items():
            module.load_state_dict(unprefixed(name, tensors))
        load_optimizer_tensors(opt, tensors)
        state.update(saved, total=total)
        log(f"[{stage}] resumed at step {state['step']} ({fmt_time(state['seconds'])} so far)")

    def save() -> None:
        tensors = {}
        for name, module in modules.items():
            tensors.update(prefixed(name, module))
        tensors.update(optimizer_tensors(opt))
        ckpt.save(state, tensors)

    start, start_step, smooth = time.monotonic(), state["step"], None
    while state["step"] < total:
        step = state["step"]
        for group in opt.param_groups:
            group["lr"] = lr_at(step, total, peak_lr)
        t0 = time.monotonic()
        loss = step_fn(step)
        if after_step is not None:
            after_step(step)
        state["seconds"] += time.monotonic() - t0
        state["step"] = step + 1
        smooth = loss if smooth is None else 0.98 * smooth + 0.02 * loss
        if state["step"] % args.log_every == 0 or state["step"] == total:
            rate = (state["step"] - start_step) / max(1e-9, time.monotonic() - start)
            eta = (total - state["step"]) / max(rate, 1e-9)
            log(f"[{stage}] step {state['step']}/{total} loss {loss:.4f} (avg {smooth:.4f}) "
                f"lr {opt.param_groups[0]['lr']:.2e} {rate:.2f} steps/s ETA {fmt_time(eta)}")
        if ckpt.due():
            save()
    save()
    state["loss_avg"] = smooth
    return state


def write_info(path: Path, state: dict, **extra: Any) -> None:
    info = {k: state[k] for k in ("stage", "step", "seconds", "seed") if k in state}
    info.update(extra)
    (path / "train_info.json").write_text(json.dumps(info, indent=1) + "\n")


def optimizer_step(opt: Any, model: Any, loss: Any) -> float:
    """One optimiser step on `loss` with the gradient norm clipped at 1; the loss as a float."""
    import torch

    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return float(loss.detach())


def ema_updater(model: Any, ema: Any, max_decay: float) -> Any:
    """`train_loop`'s after_step: `ema` <- EMA of `model`, decay min(max, (1 + s) / (10 + s))."""
    import torch

    params, ema_params = list(model.parameters()), list(ema.parameters())

    def update(step: int) -> None:
        decay = min(max_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, [p.detach() for p in params], 1 - decay)

    return update
