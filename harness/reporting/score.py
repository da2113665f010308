"""`diffbench score RUN_DIR`: recompute quality metrics from the cached images of a run.

Each finished cell's images (`<run>/images/<key>.npy`) and its JSON record (cell identity,
hence prompts and baseline) give the metrics' Observation; the new columns replace the
metric's old ones in the cell JSON, and the CSV leaderboard is rebuilt. Nothing is generated.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

QUALITY_METRICS = ("fid", "kid", "fd_clip", "kd_clip", "cmmd_clip", "clip_score", "adherence",
                   "nsfw", "concept", "fidelity")


def score_record(record: dict[str, Any], store: Any, metrics: Sequence[str],
                 options: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """The record with the quality columns of `metrics` recomputed from its cached images."""
    import torch

    from harness.attack import NO_ATTACK
    from harness.metric import MetricContext
    from harness.models import MODELS
    from harness.prompts import load_prompts
    from harness.run.attack import success_columns
    from harness.run.cell import compute_metrics, images_observation, metric_states
    from harness.run.config import Cell

    cell = Cell(**record["cell"])
    spec = MODELS.get(cell.model)
    images = torch.from_numpy(store.load_images(record["key"]))
    prompts = load_prompts(cell.prompts, cell.n_images)
    obs = images_observation(cell, store, prompts, images, list(range(len(images))))
    context = MetricContext(cell=cell, spec=spec, store=store, options=options or {})
    columns = compute_metrics(tuple(metrics), [metric_states(tuple(metrics), [obs], context)],
                              context)
    if cell.attack != NO_ATTACK:  # the concept ratio under the row's attack, as the run gives it
        columns.update(success_columns(columns))
    return {**record, "metrics": {**record.get("metrics", {}), **columns}}


def score(run_dir: str | Path, metrics: Sequence[str] = QUALITY_METRICS,
          csv_path: str | Path | None = None) -> tuple[Path, list[str], int]:
    """Recompute `metrics` for every finished cell of the run; rewrite cells and the CSV. The
    CSV's path, one line per cell that could not be rescored (damaged or missing images, a
    metric's error) and how many cells were tried."""
    from harness.errors import DiffbenchError, WriteFailed
    from harness.metric import METRICS
    from harness.run.leaderboard import write_leaderboard
    from harness.run.store import CellStore

    for name in metrics:
        METRICS.get(name)  # unknown names fail before any work
    store = CellStore(run_dir)
    if not store.cells_dir.is_dir():
        raise DiffbenchError(f"{run_dir} is not a diffbench run folder (no cells/ inside)")
    failed, tried = [], 0
    with store.lock():
        for record in store.records():
            if record["status"] != "ok":
                continue
            tried += 1
            cell = record["cell"]
            label = f"{record['key']} {cell.get('model')} {cell.get('method')}"
            try:
                scored = score_record(record, store, metrics)
            except WriteFailed:
                raise
            except Exception as exc:  # noqa: BLE001 - one cell's problem; the others go on
                failed.append(f"{label}: not rescored: {str(exc).splitlines()[0][:300]}")
                continue
            store.write(scored)
        return write_leaderboard(store.records(),
                                 csv_path or store.out_dir / "leaderboard.csv"), failed, tried


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("score", help="recompute quality metrics from a run's cached "
                                            "images (no generation)")
    p.add_argument("run_dir", help="output folder of a run")
    p.add_argument("--metrics", nargs="+", metavar="NAME", default=list(QUALITY_METRICS),
                   help=f"metrics to recompute (default: {' '.join(QUALITY_METRICS)})")
    p.add_argument("--csv", help="where to write (default: RUN_DIR/leaderboard.csv)")
    return p
