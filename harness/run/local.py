"""Local backend: the cells one after another in this process, their shards in turn."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from harness.run.cell import PipelineCache, cell_record, finish_cell, measure_shard
from harness.run.config import Cell, RunConfig
from harness.run.devices import environment
from harness.run.store import CellStore


def run_cell(cell: Cell, config: RunConfig, pipes: PipelineCache, store: CellStore,
             env: dict[str, str], n_shards: int = 1) -> dict[str, Any]:
    """A cell in this process, its shards one after another."""
    def measure() -> dict[str, Any]:
        shards = [measure_shard(cell, config, pipes, store, k, n_shards) for k in range(n_shards)]
        return finish_cell(cell, config, store, env, shards)

    return cell_record(cell, config, env, measure)


def environments() -> Callable[[str], dict[str, str]]:
    """environment(device), computed once per device."""
    cache: dict[str, dict[str, str]] = {}
    return lambda device: cache.setdefault(device, environment(device))


def run_cells(cells: list[Cell], config: RunConfig, store: CellStore, n_shards: int,
              written: Callable[[dict[str, Any]], None], progress: bool = True,
              workers: int | None = None) -> None:
    """Every cell in order, each record handed to `written` as soon as it is made."""
    pipes, env_of = PipelineCache(), environments()
    bar = _progress(cells, progress)
    for cell in bar:
        if hasattr(bar, "set_postfix_str"):
            bar.set_postfix_str(f"{cell.model} {cell.method} {cell.params}"[:60])
        written(run_cell(cell, config, pipes, store, env_of(cell.device), n_shards))


def _progress(items: list, enabled: bool) -> Any:
    if not enabled:
        return items
    from tqdm import tqdm

    return tqdm(items, desc="diffbench", unit="cell", file=sys.stderr, dynamic_ncols=True)
