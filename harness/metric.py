"""Metric contract (torchmetrics style): declared mergeable states, update / compute / reset."""

from __future__ import annotations

import copy
import dataclasses
import difflib
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

from harness.errors import DiffbenchError
from harness.registry import Registry, plugin_loader


def _sum(a: Any, b: Any) -> Any:
    """Sum; dicts of counts add key by key."""
    if isinstance(a, Mapping):
        return {k: _sum(a.get(k, 0), b.get(k, 0)) for k in dict.fromkeys([*a, *b])}
    return a + b


def _empty(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value)


def _same(a: Any, b: Any) -> Any:
    """The one non-empty value of both sides (None and "" are empty), for scalar labels; two
    different non-empty values do not merge (e.g. peak memory measured as the CUDA allocator
    peak on one side and as process RSS on the other: their maximum would mean nothing)."""
    if _empty(a):
        return b
    if _empty(b) or a == b:
        return a
    raise ValueError(f"cannot merge different values {a!r} and {b!r} of one state")


REDUCTIONS: dict[str, Callable[[Any, Any], Any]] = {
    "sum": _sum,
    "max": max,
    "min": min,
    "cat": lambda a, b: list(a) + list(b),
    "same": _same,
}


@dataclasses.dataclass
class Observation:
    """What the runner saw in one pipeline call; each metric reads the fields it needs.

    Fields a phase did not measure stay None.
    """

    n_images: int
    seconds: float | None = None  # wall time of the call, device-synchronised on both ends
    baseline_seconds: float | None = None  # the baseline's call in the same paired round
    cpu_seconds: float | None = None  # process CPU seconds of the call
    rejected: bool = False  # a paired round the stall rule left out
    stage_seconds: dict[str, float] | None = None  # text_encoder / denoise / decode
    step_seconds: list[float] | None = None  # each denoiser forward of one call
    peak_bytes: int | None = None  # peak memory during the call
    memory_kind: str = ""  # what peak_bytes measures: cuda_allocated, rss_peak, rss_lifetime
    flops: int | None = None  # floating-point operations of the whole call
    images: Any = None  # uint8 tensor N x H x W x 3 (quality metrics)
    prompts: list[str] | None = None
    baseline_images: Any = None  # the baseline cell's images for the same prompts and seeds
    device: str = "cpu"


@dataclasses.dataclass(frozen=True)
class MetricContext:
    """What a metric may need to set itself up for a cell (e.g. which CLIP model scores it)."""

    cell: Any  # harness.run.config.Cell
    spec: Any  # harness.models.ModelSpec
    store: Any  # harness.run.store.CellStore (image cache, reference statistics)
    options: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)
    # per-metric options of the run: suite tables [metric_options.<name>]


class Metric:
    """Base class: subclasses declare states with `add_state` and implement update/compute.

    States merge exactly across shards with the declared reduction ("sum", "max", "min", "cat",
    or "same": one value every shard agrees on, empty sides ignored). Everything `update`
    observes lives in declared states; plain attributes hold only the configuration `for_cell`
    builds, which the merging side rebuilds the same way.
    `option_names`: the keys of the suite table `[metric_options.<name>]` the metric reads;
    `check_metric_options` refuses any other key when the suite is loaded.
    """

    name: ClassVar[str] = ""
    higher_is_better: ClassVar[bool | None] = None
    option_names: ClassVar[tuple[str, ...]] = ()

    def __init__(self) -> None:
        self._defaults: dict[str, Any] = {}
        self._reductions: dict[str, str] = {}

    def add_state(self, name: str, default: Any, reduce: str) -> None:
        if reduce not in REDUCTIONS:
            raise ValueError(f"unknown reduction {reduce!r}; use one of {sorted(REDUCTIONS)}")
        self._defaults[name] = copy.deepcopy(default)
        self._reductions[name] = reduce
        setattr(self, name, copy.deepcopy(default))

    @classmethod
    def for_cell(cls, context: MetricContext) -> Metric:
        """The metric configured for one cell; quality metrics pick extractors here."""
        return cls()

    def update(self, obs: Observation) -> None:
        raise NotImplementedError

    def compute(self) -> dict[str, float | None]:
        """Leaderboard columns of this metric."""
        raise NotImplementedError

    def reset(self) -> None:
        for name, default in self._defaults.items():
            setattr(self, name, copy.deepcopy(default))

    def state(self) -> dict[str, Any]:
        return {name: copy.deepcopy(getattr(self, name)) for name in self._defaults}

    def merge(self, other: Metric) -> None:
        """Fold another shard's state into this one."""
        self.merge_state(other.state())

    def merge_state(self, state: Mapping[str, Any]) -> None:
        """Fold a shard's `state()` (e.g. sent back by a worker) into this metric's state."""
        for name, reduce in self._reductions.items():
            mine, theirs = getattr(self, name), state.get(name)
            if theirs is None:
                continue
            setattr(self, name, copy.deepcopy(theirs) if mine is None
                    else REDUCTIONS[reduce](mine, theirs))


METRICS: Registry[type[Metric]] = Registry("metric", loader=plugin_loader("metrics"))


def check_metric_options(options: Any) -> None:
    """Refuse, in one line, a suite's `[metric_options]` that names an unknown metric, is not a
    table of tables, or gives a metric an option it does not read (`Metric.option_names`)."""
    if not isinstance(options, Mapping):
        raise DiffbenchError(f"[metric_options] must be a table of [metric_options.<metric>] "
                             f"tables, got {type(options).__name__}")
    for name, table in options.items():
        cls = METRICS.get(name)  # unknown metric names fail with a suggestion
        allowed = ", ".join(cls.option_names) or "none"
        if not isinstance(table, Mapping):
            raise DiffbenchError(f"[metric_options] {name} = {_short(table)} is not a table: "
                                 f"write [metric_options.{name}] with its options "
                                 f"(allowed: {allowed})")
        for key in table:
            if key in cls.option_names:
                continue
            close = difflib.get_close_matches(str(key), cls.option_names, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise DiffbenchError(f"[metric_options.{name}] has unknown option '{key}'{hint} "
                                 f"(metric '{name}' options: {allowed})")


def _short(value: Any, limit: int = 60) -> str:
    text = " ".join(repr(value).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def register_metric(name: str) -> Callable[[type[Metric]], type[Metric]]:
    """Class decorator for a Metric subclass; the only place its name is set."""

    def decorator(cls: type[Metric]) -> type[Metric]:
        cls.name = name
        return METRICS.register(name)(cls)

    return decorator
