"""One run: a RunConfig in, cell records (and the CSV leaderboard) out, on a chosen backend."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from harness.errors import DiffbenchError
from harness.run import local, ray
from harness.run.config import Cell, RunConfig
from harness.run.leaderboard import write_leaderboard
from harness.run.store import CellStore

# backend name -> run_cells(cells, config, store, n_shards, written, progress, workers)
BACKENDS = {"local": local.run_cells, "ray": ray.run_cells}


def pending_cells(config: RunConfig, store: CellStore) -> list[Cell]:
    """Unfinished cells; one pipeline build per model, baselines first (fidelity needs them)."""
    todo = [c for c in config.cells if not store.finished(c.key)]
    todo.sort(key=lambda c: (c.model, c.weights, c.dtype, c.device, c.method != "baseline"))
    done = len(config.cells) - len(todo)
    if done:
        print(f"diffbench: resuming, {done} of {len(config.cells)} cells already finished",
              file=sys.stderr)
    wanted = {c.key for c in config.cells}
    other = [p.stem for p in store.cells_dir.glob("*.json") if p.stem not in wanted]
    if other:
        print(f"diffbench: {len(other)} cell(s) in {store.out_dir} are not in this grid (an "
              "earlier run); their rows stay in the leaderboard: delete their files under "
              "cells/ to drop them", file=sys.stderr)
    corrupt = store.corrupt_keys()
    if corrupt:
        print(f"diffbench: {len(corrupt)} corrupt cell file(s) will be recomputed: "
              f"{', '.join(sorted(corrupt))}", file=sys.stderr)
    return todo


def run(config: RunConfig, out_dir: str | Path, progress: bool = True, backend: str = "local",
        shards: int = 1, workers: int | None = None) -> Path:
    """Run every unfinished cell of the grid, then rebuild the CSV leaderboard; its path.

    backend "local": cells one after another in this process; "ray": cells and prompt shards
    as Ray tasks (harness.run.ray), `workers` CPUs for a local Ray. `shards` splits each
    cell's prompts.
    """
    if backend not in BACKENDS:
        raise DiffbenchError(f"unknown backend '{backend}'; choose {' or '.join(BACKENDS)}")
    store = CellStore(out_dir)
    csv_path = store.out_dir / "leaderboard.csv"
    with store.lock():
        todo = pending_cells(config, store)

        def written(record: dict[str, Any]) -> None:
            store.write(record)
            write_leaderboard(store.records(), csv_path)

        BACKENDS[backend](todo, config, store, shards, written, progress, workers)
        write_leaderboard(store.records(), csv_path)
    return csv_path
