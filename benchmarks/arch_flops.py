"""FLOPs per image of every method on a real architecture, counted under fake tensors.

No real compute: the model is built with random weights and the whole generation (text encoder,
every denoising step with the method's caching / dropping, VAE decode) runs on fake tensors, so
SD-1.5 at 512x512 and 50 steps counts in seconds on a CPU. Prints a table of FLOPs ratios
against the baseline: the compute side of the speed targets, before any GPU timing.

    python benchmarks/arch_flops.py --suite gpu-sd15     # the methods of a suite file
    python benchmarks/arch_flops.py --suite gpu-dit --csv leaderboards/flops-dit-xl-2.csv
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness.models import MODELS, load_pipeline  # noqa: E402
from harness.run.config import load_suite  # noqa: E402
from harness.run.generate import call_kwargs  # noqa: E402
from harness.seeds import image_seed  # noqa: E402
from harness.stack import resolve_method  # noqa: E402
from harness.steps import StepContext  # noqa: E402
from metrics.flops import count_flops_fake  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--suite", default="gpu-sd15", help="suite whose cells are counted")
    p.add_argument("--csv", help="also write the table here")
    args = p.parse_args()
    config = load_suite(args.suite, {"device": "cpu", "dtype": "float32"})
    first = config.cells[0]
    spec = MODELS.get(first.model)
    t0 = time.perf_counter()
    pipe = load_pipeline(spec, "none", torch.float32, "cpu")
    print(f"{first.model}: built in {time.perf_counter() - t0:.1f} s; {first.resolution}px, "
          f"{first.steps} steps, guidance {first.guidance}", flush=True)
    rows, base = [], None
    for cell in config.cells:
        mspec = resolve_method(cell.method)
        ctx = StepContext()
        with mspec.apply(pipe, mspec.config(json.loads(cell.params)), ctx) as handle:
            kwargs = call_kwargs(spec, ["a photo of a cat"], [image_seed(0, 0)], cell.steps,
                                 cell.guidance, cell.resolution, handle.call_kwargs)
            with torch.inference_mode():
                flops = count_flops_fake(lambda c=ctx, k=kwargs: c.generate(pipe, **k), pipe=pipe)
        base = flops if cell.method == "baseline" else base
        rows.append({"model": cell.model, "method": cell.method, "params": cell.params,
                     "steps": kwargs.get("num_inference_steps", cell.steps),
                     "resolution": cell.resolution, "flops_per_image": flops,
                     "flops_ratio": f"{flops / base:.4f}" if base else ""})
        print(f"{cell.method:16s} {cell.params[:60]:60s} {flops / 1e12:9.3f} TFLOPs  "
              f"ratio {rows[-1]['flops_ratio']}", flush=True)
    if args.csv:
        with open(args.csv, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        print(f"wrote {args.csv}")


if __name__ == "__main__":
    main()
