"""torchao speed: the denoiser's forward, baseline vs each torchao mode, timed in pairs.

One denoiser call of a real generation (its first, recorded by a pre-hook: latents, timestep,
text embeddings, at the model's default resolution) is replayed. For each mode the method is
applied and taken off between arms, as a runner cell's timing does (harness/run/cell.py's
MethodSwitch, harness/run/timing.py's paired protocol: warm-up until calls agree, ABBA rounds,
each arm's fastest of `calls` calls, stall rejection, stop once the median speedup's 95 %
interval is within `target` or the budget is spent). Printed per mode: speedup (baseline s /
quantised s) with its interval, the rounds, the quantised forward's seconds, its output's
relative error mean|y_q - y| / mean|y|, and the Linear weight bytes stored vs replaced.
Modes the device cannot run (fp8 below compute capability 8.9) print the method's reason.

    python benchmarks/torchao_speed.py --threads 1        # mini-sd on the CPU, the int8 modes
    python benchmarks/torchao_speed.py --model sd3.5-medium --device cuda --dtype bfloat16 \
        --modes int8_weight_only int8_dynamic fp8_weight_only fp8_dynamic
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness import params  # noqa: E402
from harness.errors import DiffbenchError  # noqa: E402
from harness.models import MODELS, load_pipeline, resolve_dtype, weights_source  # noqa: E402
from harness.run.cell import MethodSwitch  # noqa: E402
from harness.run.config import Timing  # noqa: E402
from harness.run.generate import call_kwargs, generate  # noqa: E402
from harness.run.timing import Arm, fixed_threads, paired_rounds  # noqa: E402
from harness.stack import resolve_method  # noqa: E402
from harness.steps import StepContext  # noqa: E402
from methods._common.unet import require_denoiser  # noqa: E402
from metrics.latency import DeviceClock, median_ci  # noqa: E402

MODES = next(f for f in resolve_method("torchao").fields()
             if f.name == "mode").metadata["choices"]
PROMPTS = ("a large red circle on a blue background", "a small green star on a white background")


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="mini-sd")
    p.add_argument("--weights", default="default", help="'none' (random), default, a folder")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--batch-size", type=int, default=2, help="prompts in the recorded call")
    p.add_argument("--modes", nargs="+", default=["int8_weight_only", "int8_dynamic"],
                   choices=list(MODES))
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    p.add_argument("--timing", default="min_rounds=8,budget_s=60",
                   help="K=V,... on top of the [timing] defaults")
    return p.parse_args()


def record_call(pipe: Any, spec: Any, denoiser: torch.nn.Module, batch: int) -> tuple:
    """(args, kwargs) of the denoiser's first call in a 2-step generation."""
    calls: list[tuple] = []
    hook = denoiser.register_forward_pre_hook(
        lambda _m, args, kwargs: calls.append((args, kwargs)) if not calls else None,
        with_kwargs=True)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(batch)]
    try:
        generate(pipe, StepContext(), call_kwargs(spec, prompts, list(range(batch)), 2, 5.0,
                                                  spec.resolution, {}))
    finally:
        hook.remove()
    return calls[0]


def first_tensor(out: Any) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out[0]


def main() -> None:
    args = parse()
    changes = params.parse_assignments(args.timing.split(",") if args.timing else [], "--timing")
    timing = params.build(Timing, {**dataclasses.asdict(Timing()), **changes}, "timing")
    spec = MODELS.get(args.model)
    pipe = load_pipeline(spec, weights_source(spec, args.weights), resolve_dtype(args.dtype),
                         args.device)
    kind, denoiser = require_denoiser(pipe, "torchao_speed")
    call_args, call_kw = record_call(pipe, spec, denoiser, args.batch_size)

    def forward() -> torch.Tensor:
        with torch.inference_mode():
            return first_tensor(denoiser(*call_args, **call_kw))

    mspec = resolve_method("torchao")
    clock = DeviceClock(args.device)
    with fixed_threads(args.threads) as threads:
        print(f"{args.model} ({kind}, {args.dtype}) on {args.device}, {threads} threads, batch "
              f"{args.batch_size}, torch {torch.__version__}")
        reference = forward()
        for mode in args.modes:
            try:
                switch = MethodSwitch(mspec, pipe, mspec.config({"mode": mode}), StepContext(),
                                      {})
            except DiffbenchError as err:
                print(f"{mode:17s} skipped: {err}")
                continue
            with switch:
                error = ((forward() - reference).abs().mean() / reference.abs().mean()).item()
                paired = paired_rounds(Arm("baseline", switch.off, forward),
                                       Arm(mode, switch.on, forward), timing, clock)
            kept = [b.wall / m.wall for b, m, bad in
                    zip(paired.baseline, paired.method, paired.rejected) if not bad]
            lo, hi = median_ci(kept)
            seconds = statistics.median(m.wall for m in paired.method)
            base_s = statistics.median(b.wall for b in paired.baseline)
            r = switch.report
            print(f"{mode:17s} speedup {statistics.median(kept):.3f} [{lo:.3f}, {hi:.3f}]  "
                  f"rounds {len(kept)}+{sum(paired.rejected)} rejected ({paired.stop})  "
                  f"{1000 * seconds:.1f} ms vs {1000 * base_s:.1f} ms  rel. error {error:.2e}  "
                  f"weights {r['weight_bytes_quantized'] / 2**20:.2f} / "
                  f"{r['weight_bytes_fp'] / 2**20:.2f} MiB "
                  f"({r['weight_bytes_quantized'] / r['weight_bytes_fp']:.3f}), "
                  f"{r['quantized_layers']} Linear")


if __name__ == "__main__":
    main()
