"""FLOPs per image of every method on a real architecture, counted under fake tensors.

No real compute: the model is built with random weights and the whole generation (text encoder,
every denoising step with the method's caching / dropping, VAE decode) runs on fake tensors, so
SD-1.5 at 512x512 and 50 steps counts in about 15 s per cell on a CPU (the model itself is built
inside the fake mode too, in under a second: no weights are allocated). Prints a table of FLOPs
ratios against the baseline: the compute side of the speed targets, before any GPU timing.
Training methods (erasure suites) are counted with `structural_artifacts`: the structure of
their trained weights without the training, which cannot run under fake tensors.

    python benchmarks/arch_flops.py --suite gpu-sd15     # the methods of a suite file
    python benchmarks/arch_flops.py --suite gpu-dit --csv leaderboards/flops-dit-xl-2.csv
    python benchmarks/arch_flops.py --suite gpu-flux --dtype bfloat16   # FLUX.1-dev, 12B

The 12B FLUX.1-dev transformer and T5-XXL are never allocated either: at 1024 px the command
stays under 0.5 GB of memory and counts about 1 s per denoising step (28-step cell: ~27 s).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness.models import MODELS, ModelSpec, resolve_dtype  # noqa: E402
from harness.run.config import Cell, load_suite  # noqa: E402
from harness.run.generate import call_kwargs  # noqa: E402
from harness.seeds import image_seed  # noqa: E402
from harness.stack import resolve_method  # noqa: E402
from harness.steps import StepContext  # noqa: E402
from metrics.flops import count_flops_fake  # noqa: E402

PROMPT = "a photo of a cat"


def fake_pipeline(spec: ModelSpec, dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """(pipeline, its FakeTensorMode): the model's architecture built under fake tensors.

    No weight is allocated or initialised (SD-1.5: 0.5 s instead of 13 s of random init, 0 GB
    instead of 4). Built in float32, then every floating parameter and buffer is cast to `dtype`
    as `Module.to` would (which cannot swap fake parameters: DiT-XL/2's builder calls it). The
    scheduler is rebuilt outside the mode from its config, so its tables are real tensors, as
    `metrics.flops.real_scheduler` needs. Count with `mode` (count_flops_fake).
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode(allow_non_fake_inputs=True)
    with mode:
        pipe = spec.build_random(torch.float32)
        for component in pipe.components.values():
            if isinstance(component, torch.nn.Module) and dtype != torch.float32:
                _cast(component, dtype)
    pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe, mode


def _cast(module: torch.nn.Module, dtype: torch.dtype) -> None:
    """Floating parameters and buffers of `module` cast to `dtype` in place (entries replaced)."""
    for sub in module.modules():
        for name, p in sub._parameters.items():
            if p is not None and p.is_floating_point():
                sub._parameters[name] = torch.nn.Parameter(p.to(dtype), p.requires_grad)
        for name, b in sub._buffers.items():
            if b is not None and b.is_floating_point():
                sub._buffers[name] = b.to(dtype)


def structural_artifacts(method: str, pipe: Any, params: dict) -> dict[str, dict] | None:
    """Prepared artifacts of a cell's training methods with the structure of trained ones, for
    counting FLOPs without training (a training loop cannot run under fake tensors: it reads its
    losses with .item()). FLOPs depend on shapes, not weight values: the weight-editing methods
    (esd, sdd, uce) get no tensors (the weights stay as they are), prune_distill gets the removal
    mask its `remove` list implies. None when the cell trains nothing."""
    mspec = resolve_method(method)
    if not mspec.prepares:
        return None
    members = getattr(mspec, "members", None) or [mspec]
    out = {}
    for member in members:
        if not member.prepares:
            continue
        config = member.config(params.get(member.name, {}) if len(members) > 1 else params)
        if member.name == "prune_distill":
            from methods import prune_distill as pd

            unet = pipe.unet
            out[member.name] = {pd.MASK: pd.removed_mask(unet, pd.check_config(unet, config))}
        else:
            out[member.name] = {}
    return out


def cell_flops(pipe: Any, cell: Cell, mode: Any = None, steps: int | None = None,
               artifacts: dict[str, dict] | None = None) -> tuple[int, int]:
    """(FLOPs, steps run) of one image of `cell` under fake tensors, its method applied to `pipe`.

    `steps` replaces the cell's step count (a method's own step count still wins, as in a run);
    `mode`: the FakeTensorMode `pipe` was built in (fake_pipeline), else a fresh one is used;
    `artifacts`: prepared weights of training methods (default: structural_artifacts).
    """
    spec, mspec = MODELS.get(cell.model), resolve_method(cell.method)
    params = json.loads(cell.params)
    if artifacts is None:
        artifacts = structural_artifacts(cell.method, pipe, params)
    ctx = StepContext()
    with mspec.apply(pipe, mspec.config(params), ctx, artifacts) as handle:
        kwargs = call_kwargs(spec, [PROMPT], [image_seed(0, 0)], steps or cell.steps,
                             cell.guidance, cell.resolution, handle.call_kwargs)
        with torch.inference_mode():
            flops = count_flops_fake(lambda: ctx.generate(pipe, **kwargs), pipe=pipe, mode=mode)
    return flops, int(kwargs.get("num_inference_steps", steps or cell.steps))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--suite", default="gpu-sd15", help="suite whose cells are counted")
    p.add_argument("--dtype", default="float32", help="dtype the architecture is built in")
    p.add_argument("--csv", help="also write the table here")
    args = p.parse_args()
    config = load_suite(args.suite, {"device": "cpu", "dtype": args.dtype})
    first = config.cells[0]
    t0 = time.perf_counter()
    pipe, mode = fake_pipeline(MODELS.get(first.model), resolve_dtype(args.dtype))
    print(f"{first.model}: built under fake tensors in {time.perf_counter() - t0:.1f} s; "
          f"{first.resolution}px, {first.steps} steps, guidance {first.guidance}", flush=True)
    rows, base = [], None
    for cell in config.cells:
        t0 = time.perf_counter()
        flops, steps = cell_flops(pipe, cell, mode)
        base = flops if cell.method == "baseline" else base
        rows.append({"model": cell.model, "method": cell.method, "params": cell.params,
                     "steps": steps, "resolution": cell.resolution, "flops_per_image": flops,
                     "flops_ratio": f"{flops / base:.4f}" if base else ""})
        print(f"{cell.method:16s} {cell.params[:60]:60s} {flops / 1e12:9.3f} TFLOPs  "
              f"ratio {rows[-1]['flops_ratio']:6s}  ({time.perf_counter() - t0:.1f} s)",
              flush=True)
    if args.csv:
        with open(args.csv, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        print(f"wrote {args.csv}")


if __name__ == "__main__":
    main()
