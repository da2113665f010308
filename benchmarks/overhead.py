"""Overhead benchmark: ratios measured in one run (never timed unit tests).

1. hook overhead: DeepCache with interval 1 (hooks on, never reuses) vs baseline;
2. harness overhead: the harness's call path vs a bare pipeline call, and a whole runner cell
   vs the pipeline calls it makes;
3. DeepCache N (default 3) vs baseline: speedup and FLOPs ratio.
Timings interleave the variants and report medians, so drift hits every variant alike.

    python benchmarks/overhead.py                       # tiny-sd on CPU
    python benchmarks/overhead.py --model sd15 --weights none --dtype float16 --device cuda \
        --steps 50 --batch 1 --csv leaderboards/sd15-random-fp16-512-<gpu>.csv   # on a GPU
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness.method import METHODS  # noqa: E402
from harness.models import MODELS, load_pipeline, resolve_dtype  # noqa: E402
from harness.run.config import RunConfig, Settings, Timing, make_cell  # noqa: E402
from harness.run.generate import call_kwargs, generate  # noqa: E402
from harness.seeds import image_seed  # noqa: E402
from harness.steps import StepContext  # noqa: E402
from metrics.flops import count_flops, count_flops_fake  # noqa: E402
from metrics.latency import timed_call  # noqa: E402


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny-sd")
    p.add_argument("--weights", default="none")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--resolution", type=int, default=None)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--interval", type=int, default=3, help="DeepCache N for part 3")
    p.add_argument("--csv", help="also run baseline + DeepCache N through the runner into this CSV")
    return p.parse_args()


def median_times(variants: dict, repeats: int, device: str) -> dict[str, float]:
    """Interleaved timed calls of each variant (its method applied only around its own call,
    outside the timed region); median seconds per call."""
    times: dict[str, list[float]] = {name: [] for name in variants}
    for rep in range(repeats + 1):  # the first round is a warm-up
        for name, (method, fn) in variants.items():
            with method():
                seconds = timed_call(fn, device)[1]
            if rep:
                times[name].append(seconds)
    return {name: statistics.median(ts) for name, ts in times.items()}


def main() -> None:
    args = parse()
    spec = MODELS.get(args.model)
    steps, res = args.steps or spec.steps, args.resolution or spec.resolution
    pipe = load_pipeline(spec, args.weights, resolve_dtype(args.dtype), args.device)
    prompts = ["a large red circle on a blue background"] * args.batch
    seeds = [image_seed(0, i) for i in range(args.batch)]
    ctx = StepContext()

    def kwargs() -> dict:
        return call_kwargs(spec, prompts, seeds, steps, spec.guidance, res, {})

    def method(name: str, params: dict):
        mspec = METHODS.get(name)
        return lambda: mspec.apply(pipe, mspec.config(params), ctx)

    def bare():
        with torch.inference_mode():
            return pipe(**kwargs())

    def harness_call():
        return generate(pipe, ctx, kwargs())

    baseline, dc1 = method("baseline", {}), method("deepcache", {"interval": 1})
    dcn = method("deepcache", {"interval": args.interval})
    t = median_times({"bare": (baseline, bare), "harness": (baseline, harness_call),
                      "deepcache_n1": (dc1, harness_call),
                      f"deepcache_n{args.interval}": (dcn, harness_call)},
                     args.repeats, args.device)
    big = sum(p.numel() for p in pipe.unet.parameters()) > 2e8 if hasattr(pipe, "unet") else True
    counter = count_flops_fake if big else count_flops
    flops = {}
    for name, apply in (("base", baseline), ("dc", dcn)):
        with apply():
            flops[name] = counter(lambda: ctx.generate(pipe, **kwargs()), pipe=pipe) if big \
                else counter(lambda: ctx.generate(pipe, **kwargs()))

    print(f"model={args.model} device={args.device} dtype={args.dtype} steps={steps} "
          f"res={res} batch={args.batch} repeats={args.repeats}")
    name = f"deepcache_n{args.interval}"
    print("median s/call: " + "  ".join(f"{k} {v:.4f}" for k, v in t.items()))
    print(f"hook overhead   : deepcache N=1 speed / baseline speed = "
          f"{t['harness'] / t['deepcache_n1']:.3f}x (goal >= 0.98x)")
    print(f"harness overhead: harness call / bare call time = {t['harness'] / t['bare']:.3f}x")
    print(f"deepcache N={args.interval}: speedup {t['harness'] / t[name]:.3f}x, "
          f"FLOPs ratio {flops['dc'] / flops['base']:.4f} ({flops['dc']:.4g} / "
          f"{flops['base']:.4g} per call of {args.batch} images)")
    cell_overhead(args, spec, t["bare"])
    if args.csv:
        write_csv(args)


def cell_overhead(args: argparse.Namespace, spec, bare_s: float) -> None:
    """A whole runner cell vs the pipeline calls it makes (images + warm-up + repeats + profile)."""
    from harness.run.cell import PipelineCache
    from harness.run.local import run_cell
    from harness.run.store import CellStore

    settings = Settings(model=args.model, weights=args.weights, device=args.device,
                        dtype=args.dtype, steps=args.steps, resolution=args.resolution,
                        n_images=args.batch, batch_size=args.batch)
    cell = make_cell(settings, "baseline", {})
    config = RunConfig("bench", (cell,), Timing(repeats=3, warmup=1, flops="off"))
    pipes = PipelineCache()
    pipes.get(MODELS.get(args.model), cell)  # build outside the timed region
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        record = run_cell(cell, config, pipes, CellStore(tmp), {"device_name": args.device})
        wall = time.perf_counter() - start
    calls = 1 + 1 + 3 + 1  # images (one batch) + warm-up + repeats + profile
    print(f"runner cell     : {wall:.3f} s for {calls} calls = {wall / (calls * bare_s):.3f}x "
          f"the bare calls (status {record['status']})")


def write_csv(args: argparse.Namespace) -> None:
    """Baseline and DeepCache N through the full runner; the CSV lands where --csv says."""
    import shutil

    from harness.run.job import run

    settings = Settings(model=args.model, weights=args.weights, device=args.device,
                        dtype=args.dtype, steps=args.steps, resolution=args.resolution,
                        n_images=args.batch, batch_size=args.batch)
    cells = tuple(make_cell(settings, m, p) for m, p in
                  [("baseline", {}), ("deepcache", {"interval": args.interval})])
    with tempfile.TemporaryDirectory() as tmp:
        csv_path = run(RunConfig("bench", cells, Timing(repeats=5, warmup=2)), tmp,
                       progress=False)
        Path(args.csv).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(csv_path, args.csv)
    print(f"leaderboard: {args.csv}")


if __name__ == "__main__":
    main()
