"""The backend-free phases of one cell: plan, prepare, images, timing, profile, FLOPs, metric
states, finish, record. Each backend (local.py, ray.py) calls them; none calls a backend."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from harness.attack import NO_ATTACK
from harness.errors import MissingExtraError, WriteFailed
from harness.metric import METRICS, MetricContext, Observation
from harness.models import MODELS, ModelSpec, load_pipeline, resolve_dtype
from harness.prompts import load_prompts
from harness.run.config import Cell, RunConfig
from harness.run.generate import call_kwargs, generate, model_call
from harness.run.store import CellStore, images_digest
from harness.seeds import image_seed
from harness.stack import resolve_method
from harness.steps import StepContext

FAKE_FLOPS_ABOVE = 200_000_000  # parameters: count FLOPs under fake tensors above this size


@dataclass(frozen=True)
class Batch:
    """Prompts generated in one pipeline call, with their per-image seeds."""

    indices: tuple[int, ...]
    texts: tuple[str, ...]
    seeds: tuple[int, ...]
    guidance: float


class PipelineCache:
    """Keeps the last pipeline, so consecutive cells of one model build it once."""

    def __init__(self) -> None:
        self.key: tuple | None = None
        self.pipe: Any = None

    def get(self, spec: ModelSpec, cell: Cell) -> Any:
        key = (cell.model, cell.weights, cell.dtype, cell.device)
        if key != self.key:
            self.pipe = None  # free the previous model first
            if cell.device.startswith("cuda"):
                torch.cuda.empty_cache()
            self.pipe = load_pipeline(spec, cell.weights, resolve_dtype(cell.dtype), cell.device)
            self.key = key
        return self.pipe


def plan_batches(cell: Cell, prompts: Any) -> list[Batch]:
    """Consecutive prompts of equal guidance, batch_size at a time; seeds from (seed, index)."""
    batches: list[Batch] = []
    items = []
    for i, p in enumerate(prompts.prompts[: cell.n_images]):
        seed = p.seed if p.seed is not None else image_seed(cell.seed, i)
        guidance = p.guidance if p.guidance is not None else cell.guidance
        items.append((i, p.text, seed, guidance))
    while items:
        first = items[0][3]
        chunk = [it for it in items[: cell.batch_size]]
        chunk = chunk[: next((k for k, it in enumerate(chunk) if it[3] != first), len(chunk))]
        batches.append(Batch(*map(tuple, zip(*[it[:3] for it in chunk])), guidance=first))
        items = items[len(chunk):]
    return batches


class MethodSwitch:
    """A method applied to a pipeline that the paired timing takes off and puts back: remove()
    restores the pipeline exactly, and apply() again (with the same prepared weights) re-does
    it. The first handle's call arguments and report stand for every application."""

    def __init__(self, mspec: Any, pipe: Any, config: Any, ctx: StepContext,
                 artifacts: dict[str, Any]) -> None:
        self._apply = lambda: mspec.apply(pipe, config, ctx, artifacts)
        self.handle: Any = self._apply()
        self.call_kwargs, self.report = dict(self.handle.call_kwargs), dict(self.handle.report)

    def on(self) -> None:
        if self.handle is None:
            self.handle = self._apply()

    def off(self) -> None:
        if self.handle is not None:
            self.handle.remove()
            self.handle = None

    def __enter__(self) -> MethodSwitch:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.off()


@dataclass
class CellRun:
    """What one cell's phases share: the pipeline with the method applied, and its batches."""

    cell: Cell
    spec: ModelSpec
    pipe: Any
    ctx: StepContext
    overrides: dict
    batches: list[Batch]

    def kwargs(self, batch: Batch, overrides: dict | None = None) -> dict:
        return call_kwargs(self.spec, batch.texts, batch.seeds, self.cell.steps, batch.guidance,
                           self.cell.resolution,
                           self.overrides if overrides is None else overrides)

    def call(self, batch: Batch, overrides: dict | None = None) -> torch.Tensor:
        return generate(self.pipe, self.ctx, self.kwargs(batch, overrides))

    @property
    def effective_steps(self) -> int:
        return int(self.overrides.get("num_inference_steps", self.cell.steps))


def phase_images(run: CellRun) -> torch.Tensor:
    """Generate every image of the cell (uint8 N x H x W x 3)."""
    return torch.cat([run.call(batch) for batch in run.batches])


def phase_timing(run: CellRun, switch: MethodSwitch, timing: Any,
                 compile_state: Any) -> tuple[list[Observation], dict[str, Any]]:
    """Paired rounds of the baseline (method removed) and the method on the first batch; the
    rounds as observations and the protocol's own columns."""
    from harness.run.timing import Arm, paired_rounds
    from metrics.latency import DeviceClock

    batch = run.batches[0]
    baseline = Arm("baseline", switch.off, lambda: run.call(batch, overrides={}))
    method = Arm("method", switch.on, lambda: run.call(batch))
    graphs_before = compile_state.counts()[0]
    paired = paired_rounds(baseline, method, timing, DeviceClock(run.cell.device))
    columns: dict[str, Any] = {"timing_stop": paired.stop, "warmup_calls": paired.warmup_calls,
                               "timing_s": paired.seconds}
    if compile_state.mode != "off":
        from harness.run.compile import dynamo_counts

        graphs, breaks = compile_state.counts()
        columns.update(compile_s=paired.warmup_s, graphs=graphs - graphs_before,
                       recompiles=dynamo_counts()[0] - paired.graphs_after_warmup,
                       graph_breaks=breaks)
    return paired.observations(len(batch.texts), run.cell.device), columns


def phase_profile(run: CellRun, calls: int = 1) -> Observation:
    """Stage timers, per-step times and the peak-memory probe on the last of `calls` calls (a
    compiled denoiser recompiles for the timers' hooks on the first)."""
    from metrics.memory import peak_memory
    from metrics.stages import stage_timer

    batch = run.batches[0]
    for _ in range(calls - 1):
        with stage_timer(run.pipe, run.cell.device):
            run.call(batch)
    with peak_memory(run.cell.device) as mem, stage_timer(run.pipe, run.cell.device) as stages:
        run.call(batch)
    return Observation(n_images=len(batch.texts), stage_seconds=dict(stages.seconds),
                       step_seconds=stages.step_seconds, peak_bytes=mem.peak_bytes,
                       memory_kind=mem.kind, device=run.cell.device)


def phase_flops(run: CellRun, mode: str) -> Observation | None:
    """FLOPs of a whole one-image generation (real run, or fake tensors for big models)."""
    from metrics.flops import count_flops, count_flops_fake

    if mode == "off":
        return None
    if mode == "auto":
        n_params = sum(p.numel() for m in run.pipe.components.values()
                       if isinstance(m, torch.nn.Module) for p in m.parameters())
        mode = "fake" if n_params > FAKE_FLOPS_ABOVE else "real"
    first = run.batches[0]
    one = Batch(first.indices[:1], first.texts[:1], first.seeds[:1], first.guidance)

    def call() -> Any:  # the bare call: no pixel checks, which fake tensors cannot answer
        with torch.inference_mode():
            return run.ctx.generate(run.pipe, **run.kwargs(one))

    flops = count_flops_fake(call, pipe=run.pipe) if mode == "fake" else count_flops(call)
    return Observation(n_images=1, flops=int(flops), device=run.cell.device)


def phase_prepare(cell: Cell, mspec: Any, pipe: Any,
                  method_config: Any) -> tuple[dict[str, Any], dict[str, float]]:
    """Weights of training methods (loaded from the artifact cache, or trained and cached) and
    the `train_s` column: the seconds their training took when it ran."""
    if not mspec.prepares:
        return {}, {}
    from harness.prepare import ArtifactCache, PrepareData, prepare_artifacts, train_seconds

    texts = tuple(load_prompts(cell.prompts).texts)
    model = MODELS.get(cell.model)
    data = PrepareData(model=f"{cell.model}@{cell.weights}", prompts=texts, seed=cell.seed,
                       device=cell.device, dataset=model.dataset, call_kwargs=model_call(model))
    cache = ArtifactCache()
    artifacts = prepare_artifacts(mspec, pipe, method_config, data, cache)
    seconds = train_seconds(mspec, method_config, data, cache)
    return artifacts, ({} if seconds is None else {"train_s": seconds})


def shard_batches(batches: list[Batch], n_shards: int) -> list[list[Batch]]:
    """Contiguous, balanced groups of whole batches: images do not depend on the shard count."""
    n = max(1, min(n_shards, len(batches)))
    cuts = [round(k * len(batches) / n) for k in range(n + 1)]
    return [batches[cuts[k]:cuts[k + 1]] for k in range(n)]


def images_observation(cell: Cell, store: CellStore, prompts: Any, images: torch.Tensor,
                       indices: list[int]) -> Observation:
    """Images of prompts `indices` for quality metrics, with the baseline's when cached."""
    baseline = None
    if cell.baseline_key != cell.key and store.images_path(cell.baseline_key).exists():
        baseline = torch.from_numpy(store.load_images(cell.baseline_key))[indices]
    texts = [prompts.prompts[i].text for i in indices]
    return Observation(n_images=len(images), images=images, prompts=texts,
                       baseline_images=baseline, device=cell.device)


def metric_states(names: tuple[str, ...], observations: list[Observation],
                  context: MetricContext) -> dict[str, dict[str, Any]]:
    """Each metric's state after every observation (mergeable across shards), or its note."""
    states: dict[str, dict[str, Any]] = {}
    for name in names:
        try:
            metric = METRICS.get(name).for_cell(context)
        except MissingExtraError as exc:  # an optional package is absent: say so in the row
            states[name] = {"__note__": str(exc)}
            continue
        for obs in observations:
            metric.update(obs)
        states[name] = metric.state()
    return states


def compute_metrics(names: tuple[str, ...], shard_states: list[dict[str, dict[str, Any]]],
                    context: MetricContext) -> dict[str, Any]:
    """Merge the shards' states of every metric in shard order; their columns and notes."""
    columns: dict[str, Any] = {}
    for name in names:
        note = next((s[name]["__note__"] for s in shard_states if "__note__" in s[name]), None)
        if note is not None:
            columns[f"{name}_note"] = note
            continue
        metric = METRICS.get(name).for_cell(context)
        for states in shard_states:
            metric.merge_state(states[name])
        columns.update(metric.compute())
    return columns


def derived_columns(columns: dict[str, Any], env: dict[str, str], dtype: str) -> dict[str, Any]:
    """Achieved TFLOP/s and MFU from FLOPs per image and throughput."""
    from harness.run.devices import peak_tflops
    from metrics.flops import achieved_tflops, mfu

    flops, ips = columns.get("flops_per_image"), columns.get("images_per_s")
    if not flops or not ips:
        return {}
    achieved = achieved_tflops(flops * ips, 1.0)
    peak = peak_tflops(env.get("device_name", ""), resolve_dtype(dtype))
    return {"tflops_achieved": achieved, "mfu": mfu(flops * ips, 1.0, peak) if peak else None}


def metric_context(cell: Cell, config: RunConfig, store: CellStore) -> MetricContext:
    return MetricContext(cell=cell, spec=MODELS.get(cell.model), store=store,
                         options=config.metric_options)


def measure_shard(cell: Cell, config: RunConfig, pipes: PipelineCache, store: CellStore,
                  shard: int = 0, n_shards: int = 1) -> dict[str, Any]:
    """Images and metric states of one shard of a cell; shard 0 also measures FLOPs (eager),
    then, compiled as the cell says, speed (paired with the baseline) and memory. The method
    and the compilation are undone whatever happens."""
    from harness.run.compile import compiled
    from harness.run.timing import fixed_threads

    spec, mspec = MODELS.get(cell.model), resolve_method(cell.method)
    prompts = load_prompts(cell.prompts, cell.n_images)
    groups = shard_batches(plan_batches(cell, prompts), n_shards)
    batches = groups[shard] if shard < len(groups) else []
    observations: list[Observation] = []
    pipe = pipes.get(spec, cell)
    ctx = StepContext()
    method_config = mspec.config(json.loads(cell.params))
    artifacts, trained = phase_prepare(cell, mspec, pipe, method_config)
    attacked = cell.attack != NO_ATTACK
    with fixed_threads(config.timing.threads) as threads, \
            MethodSwitch(mspec, pipe, method_config, ctx, artifacts) as switch:
        run = CellRun(cell, spec, pipe, ctx, switch.call_kwargs, batches)
        report = {**switch.report, **trained, "threads": threads}
        if attacked:  # rewrites run.batches' prompts; the handle holds what it installed
            from harness.run.attack import phase_attack

            attack, attack_columns = phase_attack(run, switch, prompts,
                                                  metric_context(cell, config, store))
        if shard == 0 and not attacked:  # an attacked row measures the attack, not the speed
            flops = phase_flops(run, config.timing.flops)
            observations += [flops] if flops else []
        with compiled(pipe, cell.compile) as compile_state:
            if shard == 0 and not attacked:
                rounds, columns = phase_timing(run, switch, config.timing, compile_state)
                observations += rounds
                report.update(columns)
                observations.append(phase_profile(run, 1 if cell.compile == "off" else 2))
            switch.handle.stats.clear()  # counters of the images' calls only
            with attack if attacked else contextlib.nullcontext():
                images = phase_images(run) if batches else torch.zeros(0, dtype=torch.uint8)
            report.update(switch.handle.stats)
            report.update(attack_columns if attacked else {})
    indices = [i for b in batches for i in b.indices]
    if batches:
        observations.append(images_observation(cell, store, prompts, images, indices))
    states = metric_states(config.metrics, observations, metric_context(cell, config, store))
    return {"shard": shard, "images": images, "indices": indices, "states": states,
            "effective_steps": run.effective_steps, "report": report}


def finish_cell(cell: Cell, config: RunConfig, store: CellStore, env: dict[str, str],
                shards: list[dict[str, Any]]) -> dict[str, Any]:
    """Join the shards in order: save the images, merge metric states, derive columns."""
    shards = sorted(shards, key=lambda s: s["shard"])
    images = torch.cat([s["images"] for s in shards if len(s["indices"])])
    store.save_images(cell.key, images)
    context = metric_context(cell, config, store)
    columns = compute_metrics(config.metrics, [s["states"] for s in shards], context)
    columns.update(shards[0].get("report", {}))
    if cell.attack != NO_ATTACK:
        from harness.run.attack import success_columns

        columns.update(success_columns(columns))
    columns.update(derived_columns(columns, env, cell.dtype))
    spec = MODELS.get(cell.model)
    random_weights = cell.weights == "none"
    note = ("random weights: quality not measured" if random_weights and spec.has_quality
            else "" if spec.has_quality else "toy model: quality not meaningful")
    method_note = str(columns.pop("method_note", "") or "")  # what the method says of the row
    note = "; ".join(n for n in (note, method_note) if n)
    return {"metrics": columns, "effective_steps": shards[0]["effective_steps"],
            "images_sha": images_digest(images.numpy()), "note": note, "shards": len(shards)}


def cell_record(cell: Cell, config: RunConfig, env: dict[str, str],
                measure: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """A cell's record; a failure (exception, OOM, NaN images) becomes an error record."""
    record = {"key": cell.key, "baseline_key": cell.baseline_key, "cell": cell.identity(),
              "timing": dataclasses.asdict(config.timing), "environment": env}
    try:
        return {**record, "status": "ok", "error": "", **measure()}
    except WriteFailed:
        raise  # the disk, not the cell: the run stops (job.run says how far it got)
    except Exception as exc:  # noqa: BLE001 - any failure becomes a row; the grid goes on
        if cell.device.startswith("cuda") and torch.cuda.is_available():
            torch.cuda.empty_cache()
        return {**record, **error_fields(exc), "metrics": {}, "effective_steps": None,
                "images_sha": "", "note": ""}


def error_fields(exc: BaseException) -> dict[str, str]:
    """A failure as record fields: `error`, its first line (the CSV column), and `traceback`,
    the whole formatted traceback (kept in the cell JSON only)."""
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return {"status": "error", "error": f"{type(exc).__name__}: {message}"[:500],
            "traceback": "".join(traceback.format_exception(exc))}
