"""Ray backend: every prompt shard of every cell is a Ray task with one GPU (one CPU on CPU).

The driver plans the grid, submits baselines first (fidelity metrics read their images), and
joins each cell's shards in shard order: images concatenate, metric states merge (the
declared reductions of `harness.metric`), so 1 shard and N shards give the same row. Ray's
usual settings pick the cluster (`RAY_ADDRESS`, `ray start --head`); with none, a local Ray
starts for the run. Workers build their pipelines once per process and read / write the run
folder, so on a cluster it must be on a shared file system.
"""

from __future__ import annotations

import os
import traceback
from collections.abc import Callable
from typing import Any

from harness.errors import MissingExtraError
from harness.run import cell as phases
from harness.run.config import Cell, RunConfig
from harness.run.devices import environment
from harness.run.store import CellStore

_PIPES: Any = None  # per worker process: the last pipeline built (cell.PipelineCache)


def shard_task(cell: Cell, config: RunConfig, out_dir: str, shard: int,
               n_shards: int, threads: int | None = None) -> dict[str, Any]:
    """Body of one Ray task: the shard's images and metric states, the worker's environment.

    `threads`: torch intra-op threads, the driver's count, so CPU kernels reduce in the same
    order as in a local run and the images are bit-identical (Ray gives a CPU task 1 thread).
    """
    global _PIPES
    import torch

    if threads and not cell.device.startswith("cuda"):
        torch.set_num_threads(threads)
    if _PIPES is None:
        _PIPES = phases.PipelineCache()
    try:
        out = phases.measure_shard(cell, config, _PIPES, CellStore(out_dir), shard, n_shards)
    except Exception as exc:  # noqa: BLE001 - returned, so the driver writes an error row
        exc.add_note(f"in the Ray worker (shard {shard}):\n{traceback.format_exc().rstrip()}")
        return {"shard": shard, "error": exc}
    out["environment"] = environment(cell.device) if shard == 0 else None
    return out


def init_ray(num_cpus: int | None = None) -> Any:
    """Connect to the cluster Ray's settings name, or start a local one."""
    try:
        import ray
    except ImportError:
        raise MissingExtraError("the ray backend needs Ray: pip install 'diffbench[ray]'") from None
    if not ray.is_initialized():
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # local runs: no token to hand out
        kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
        if not os.environ.get("RAY_ADDRESS") and num_cpus:
            kwargs["num_cpus"] = num_cpus
        ray.init(**kwargs)
    return ray


def run_cells(cells: list[Cell], config: RunConfig, store: CellStore, n_shards: int,
            written: Callable[[dict[str, Any]], None], progress: bool = True,
            workers: int | None = None) -> None:
    """Submit every shard, baselines in a first wave; write each cell once its shards are in."""
    import torch

    ray = init_ray(workers)
    remote = ray.remote(shard_task)
    threads = torch.get_num_threads()
    waves = [[c for c in cells if c.method == "baseline"],
             [c for c in cells if c.method != "baseline"]]
    for wave in waves:
        pending: dict[Any, tuple[Cell, int]] = {}
        for cell in wave:
            gpus = 1 if cell.device.startswith("cuda") else 0
            for k in range(n_shards):
                ref = remote.options(num_gpus=gpus, num_cpus=0 if gpus else 1).remote(
                    cell, config, str(store.out_dir), k, n_shards, threads)
                pending[ref] = (cell, k)
        results: dict[str, list[dict[str, Any]]] = {}
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            cell, _ = pending.pop(done[0])
            results.setdefault(cell.key, []).append(ray.get(done[0]))
            if len(results[cell.key]) == n_shards:
                written(_join(cell, config, store, results.pop(cell.key)))
                if progress:
                    print(f"diffbench: {cell.model} {cell.method} {cell.params} done", flush=True)


def _join(cell: Cell, config: RunConfig, store: CellStore,
          shards: list[dict[str, Any]]) -> dict[str, Any]:
    """The cell's record from its shards; a failed shard makes it an error row."""
    env = next((s["environment"] for s in shards if s.get("environment")), None)
    env = env or environment(cell.device)

    def measure() -> dict[str, Any]:
        failed = next((s["error"] for s in shards if "error" in s), None)
        if failed is not None:
            raise failed
        return phases.finish_cell(cell, config, store, env, shards)

    return phases.cell_record(cell, config, env, measure)
