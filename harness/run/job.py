"""One run: a RunConfig in, cell records (and the CSV leaderboard) out, on a chosen backend."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from harness.errors import DiffbenchError, WriteFailed
from harness.run import local, preflight, ray
from harness.run.config import Cell, RunConfig
from harness.run.leaderboard import write_leaderboard
from harness.run.store import CellStore

# backend name -> run_cells(cells, config, store, n_shards, written, progress, workers)
BACKENDS = {"local": local.run_cells, "ray": ray.run_cells}


def _say(message: str) -> None:
    print(f"diffbench: {message}", file=sys.stderr)


def pending_cells(config: RunConfig, store: CellStore) -> list[Cell]:
    """Unfinished cells; one pipeline build per model, baselines first (fidelity needs them).
    Damaged cell files move aside into broken/; an ok cell whose images are damaged is named
    and recomputed."""
    for path, problem in store.damaged().items():
        store.quarantine(path, problem)
    todo = []
    for cell in config.cells:
        record = store.read(cell.key)
        if record is None or record["status"] != "ok":
            todo.append(cell)
            continue
        problem = store.images_problem(cell.key, cell.n_images, record.get("images_sha"))
        if problem:
            _say(f"cell {cell.key} ({cell.model} {cell.method}): {problem}; recomputing")
            if store.images_path(cell.key).exists():
                store.quarantine(store.images_path(cell.key), "damaged images")
            todo.append(cell)
    todo.sort(key=lambda c: (c.model, c.weights, c.dtype, c.device, c.method != "baseline"))
    done = len(config.cells) - len(todo)
    if done:
        _say(f"resuming, {done} of {len(config.cells)} cells already finished")
    wanted = {c.key for c in config.cells}
    other = [p.stem for p in store.cell_files() if p.stem not in wanted]
    if other:
        _say(f"{len(other)} cell(s) in {store.out_dir} are not in this grid (an earlier run); "
             "their rows stay in the leaderboard: delete their files under cells/ to drop them")
    return todo


def failure_line(key: str, model: str, method: str, params: str, error: str) -> str:
    """How a failed cell is named on stderr: key, model, method, params, error."""
    return f"{key} {model} {method} {params}: {error}"


def failures(config: RunConfig, store: CellStore) -> list[str]:
    """One line per cell of the grid that has no ok result."""
    lines = []
    for cell in config.cells:
        record = store.read(cell.key)
        if record is None or record["status"] != "ok":
            error = record.get("error", "") if record else "no result"
            lines.append(failure_line(cell.key, cell.model, cell.method, cell.params, error))
    return lines


def run(config: RunConfig, out_dir: str | Path, progress: bool = True, backend: str = "local",
        shards: int = 1, workers: int | None = None) -> Path:
    """Check the whole grid, run every unfinished cell, rebuild the CSV leaderboard; its path.

    backend "local": cells one after another in this process; "ray": cells and prompt shards
    as Ray tasks (harness.run.ray), `workers` CPUs for a local Ray. `shards` splits each
    cell's prompts. Bad input raises DiffbenchError before anything is written; a failed write
    (disk full, read-only) raises WriteFailed saying how many cells are finished.
    """
    if backend not in BACKENDS:
        raise DiffbenchError(f"unknown backend '{backend}'; choose {' or '.join(BACKENDS)}")
    preflight.check(config)
    store = CellStore(out_dir)
    csv_path = store.out_dir / "leaderboard.csv"
    with store.lock():
        todo = pending_cells(config, store)
        done = [0]

        def written(record: dict[str, Any]) -> None:
            store.write(record)
            done[0] += record["status"] == "ok"
            write_leaderboard(store.records(), csv_path)

        try:
            BACKENDS[backend](todo, config, store, shards, written, progress, workers)
            write_leaderboard(store.records(), csv_path)
        except WriteFailed as exc:
            finished = len(config.cells) - len(todo) + done[0]
            raise WriteFailed(exc.path, exc.os_error,
                              f"{finished} of {len(config.cells)} cells are finished and kept; "
                              "run again to resume") from None
    return csv_path
