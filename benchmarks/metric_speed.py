"""Metric speed: images/s of each quality metric on a run's cached images (no generation).

Each metric scores the same cell twice through `harness.reporting.score.score_record`; the
first pass loads its network and caches reference statistics, the second is timed. Prints one
line a metric.

    diffbench run --out runs/default && python benchmarks/metric_speed.py runs/default
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness.reporting.score import QUALITY_METRICS, score_record  # noqa: E402
from harness.run.store import CellStore  # noqa: E402

HEADLINE = {"fid": "fid", "fd_clip": "fd_clip", "clip_score": "clip_score", "nsfw": "nsfw_ratio",
            "concept": "concept_ratio", "fidelity": "psnr"}  # metric -> its main column


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir")
    p.add_argument("--metrics", nargs="+", default=list(QUALITY_METRICS))
    p.add_argument("--concept", default="red", help="concept the concept-ratio metric looks for")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    store = CellStore(args.run_dir)
    records = [r for r in store.records() if r.get("status") == "ok"
               and r["cell"]["method"] != "baseline" and store.images_path(r["key"]).exists()]
    if not records:
        raise SystemExit(f"{args.run_dir}: no finished non-baseline cell with cached images")
    record = max(records, key=lambda r: r["cell"]["n_images"])
    n = record["cell"]["n_images"]
    options = {"concept": {"concept": args.concept}}
    print(f"cell {record['key']} ({record['cell']['model']} {record['cell']['method']}), "
          f"{n} images, {torch.get_num_threads()} threads")
    for name in args.metrics:
        score_record(record, store, [name], options)  # warm: load networks, cache statistics
        start = time.perf_counter()
        columns = score_record(record, store, [name], options)["metrics"]
        seconds = time.perf_counter() - start
        column = HEADLINE.get(name, name)
        value = f"{column}={columns.get(column)} {columns.get(column + '_note', '')}"
        print(f"{name:12s} {n / seconds:9.1f} images/s  ({seconds:.3f} s)  {value}")


if __name__ == "__main__":
    main()
