"""Run configuration: cell settings, the grid of cells, and suite files (TOML)."""

from __future__ import annotations

import dataclasses
import difflib
import itertools
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness import params as P
from harness.errors import DiffbenchError
from harness.metric import METRICS
from harness.models import DTYPES, MODELS, weights_source
from harness.stack import resolve_method

SUITES_DIR = Path(__file__).resolve().parents[1] / "suites"
COMPILE_MODES = ("off", "denoiser", "regional", "max-autotune")
# list-valued settings that span the grid: (plural key, Settings field)
GRID_AXES = (("models", "model"), ("prompts", "prompts"), ("seeds", "seed"),
             ("compile", "compile"))


@dataclass(frozen=True)
class Settings:
    """Generation settings of a cell; None takes the model's default."""

    model: str = P.param("tiny-sd", "registered model name")
    weights: str = P.param("default", "'none' (random), a local folder or a hub id")
    prompts: str = P.param("shapes", "prompt set name or file (.txt, .tsv/.csv, I2P .csv)")
    n_images: int = P.param(8, "images per cell", low=1, high=1_000_000)
    steps: int | None = P.param(None, "denoising steps (model default if unset)", low=1, high=1000)
    guidance: float | None = P.param(None, "classifier-free guidance scale", low=0.0, high=100.0)
    resolution: int | None = P.param(None, "image side in pixels", low=8, high=8192)
    seed: int = P.param(0, "base seed; image i uses a hash of (seed, i)", low=0, high=2**31 - 1)
    dtype: str = P.param("float32", "weights / activations dtype", choices=tuple(DTYPES))
    device: str = P.param("auto", "'auto' (cuda when present), 'cpu', 'cuda', 'cuda:1', ...")
    batch_size: int = P.param(4, "images per pipeline call", low=1, high=4096)
    compile: str = P.param("off", "torch.compile after the method: off, denoiser, regional "
                                  "(repeated blocks), max-autotune", choices=COMPILE_MODES)


@dataclass(frozen=True)
class Cell:
    """One leaderboard row: a model x method x setting x prompt set x seed x device."""

    model: str
    weights: str
    method: str
    params: str  # canonical JSON of the method config
    prompts: str
    n_images: int
    steps: int
    guidance: float
    resolution: int
    seed: int
    dtype: str
    device: str
    batch_size: int
    compile: str = "off"
    attack: str = "none"  # an attack on the method's pipeline (harness/attack.py), or none
    attack_params: str = "{}"  # canonical JSON of the attack config

    @property
    def key(self) -> str:
        """Config hash: identifies the cell's results on disk and in leaderboards. An eager,
        unattacked cell hashes without the compile and attack fields, so its key is the one it
        had before those axes."""
        identity = self.identity()
        if identity["compile"] == "off":
            del identity["compile"]
        return P.short_hash(identity)

    @property
    def baseline_key(self) -> str:
        """Key of the baseline cell with the same model and settings (not attacked)."""
        return dataclasses.replace(self, method="baseline", params="{}", attack="none",
                                   attack_params="{}").key

    @property
    def unattacked(self) -> Cell:
        return dataclasses.replace(self, attack="none", attack_params="{}")

    def identity(self) -> dict[str, Any]:
        """The cell's fields; the attack fields only when it is attacked."""
        identity = dataclasses.asdict(self)
        if identity["attack"] == "none":
            del identity["attack"], identity["attack_params"]
        return identity


@dataclass(frozen=True)
class Timing:
    """How speed is measured in each cell: paired rounds of baseline and method calls on one
    pipeline (harness/run/timing.py), until the speedup interval is tight or the budget is spent.
    """

    calls: int = P.param(3, "calls per arm in a round; the round keeps each arm's fastest",
                         low=1, high=100)
    min_rounds: int = P.param(8, "paired rounds before the stopping rule is read", low=2,
                              high=10_000)
    max_rounds: int = P.param(60, "paired rounds at most (rejected ones included)", low=2,
                              high=10_000)
    target: float = P.param(0.02, "stop once the speedup interval's half-width is at most this "
                                  "share of the median", low=0.0, high=1.0)
    budget_s: float = P.param(90.0, "seconds of paired rounds per cell at most", low=0.0,
                              high=86_400.0)
    reject_k: float = P.param(5.0, "reject a round whose speedup lies beyond k scaled MADs of "
                                   "the median", low=1.0, high=1000.0)
    warmup: int = P.param(1, "untimed calls per arm before the warm-up check", low=0, high=100)
    warmup_max: int = P.param(10, "timed warm-up calls per arm at most, until two in a row "
                                  "agree (and compile nothing new)", low=1, high=1000)
    agree: float = P.param(0.05, "warm-up ends when two calls in a row differ by at most this "
                                 "share", low=0.0, high=10.0)
    threads: int = P.param(0, "torch CPU threads for the run; 0 keeps torch's default, fixed "
                              "and recorded", low=0, high=4096)
    flops: str = P.param("auto", "FLOP counting: real run, fake tensors, auto (fake on GPU "
                                 "models), off", choices=("auto", "real", "fake", "off"))

    def __post_init__(self) -> None:
        if self.min_rounds > self.max_rounds:
            raise DiffbenchError(f"timing.min_rounds={self.min_rounds} is above "
                                 f"timing.max_rounds={self.max_rounds}")


@dataclass(frozen=True)
class RunConfig:
    """Everything one run does: its cells and how they are measured."""

    name: str
    cells: tuple[Cell, ...]
    timing: Timing = Timing()
    metrics: tuple[str, ...] = ("latency", "stages", "memory", "flops", "fd_clip", "kd_clip",
                                "cmmd_clip", "clip_score", "adherence", "nsfw", "fidelity",
                                "concept")
    metric_options: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)


def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def make_cell(settings: Settings, method: str, method_params: Mapping[str, Any],
              attack: Mapping[str, Any] | None = None) -> Cell:
    """Validate names and parameters now, so bad input fails before any work starts."""
    from harness.attack import ATTACKS, NO_ATTACK

    spec, mspec = MODELS.get(settings.model), resolve_method(method)
    config = mspec.config(method_params)
    attack_name, attack_params = NO_ATTACK, "{}"
    if attack and attack.get("name", NO_ATTACK) != NO_ATTACK:
        attack_name = attack["name"]
        attack_config = ATTACKS.get(attack_name).config(attack.get("params", {}))
        attack_params = P.canonical_json(P.as_dict(attack_config))
    return Cell(
        model=settings.model, weights=weights_source(spec, settings.weights), method=method,
        params=P.canonical_json(P.as_dict(config)), prompts=settings.prompts,
        n_images=settings.n_images, steps=settings.steps or spec.steps,
        guidance=float(spec.guidance if settings.guidance is None else settings.guidance),
        resolution=settings.resolution or spec.resolution, seed=settings.seed,
        dtype=settings.dtype, device=resolve_device(settings.device),
        batch_size=settings.batch_size, compile=settings.compile, attack=attack_name,
        attack_params=attack_params,
    )


def expand_grid(defaults: Mapping[str, Any], methods: list[Mapping[str, Any]],
                attacks: list[Mapping[str, Any]] | None = None) -> tuple[Cell, ...]:
    """Cells = models x prompt sets x seeds x compile modes x methods x attacks; list values
    span it. `attacks` entries are {name, params}; "none" is the unattacked cell."""
    base = dict(defaults)
    axes = {}
    for plural, singular in GRID_AXES:
        value = base.pop(plural, base.pop(singular, None))
        if value is not None:
            axes[singular] = value if isinstance(value, list) else [value]
    cells = []
    for combo in itertools.product(*axes.values()):
        settings = P.build(Settings, {**base, **dict(zip(axes, combo))}, owner="settings")
        for entry in methods:
            entry = dict(entry)
            name = entry.pop("name", None)
            if name is None:
                raise DiffbenchError("every [[methods]] entry needs a name")
            extra = set(entry) - {"params"}
            if extra:
                raise DiffbenchError(f"[[methods]] '{name}' has unknown keys: {sorted(extra)}; "
                                     "put method parameters under params")
            for attack in attacks or [{"name": "none"}]:
                cells.append(make_cell(settings, name, entry.get("params", {}), attack))
    seen: dict[str, Cell] = {}
    for cell in cells:
        seen.setdefault(cell.key, cell)  # identical cells collapse to one
    return tuple(seen.values())


SECTIONS = {"name": str, "defaults": dict, "timing": dict, "methods": list, "attacks": list,
            "metrics": list, "metric_options": dict}  # suite file sections and their TOML types


def read_suite(path: Path) -> dict[str, Any]:
    """A suite file's tables, each of the right type; every problem one line naming the file."""
    if not path.is_file() and (SUITES_DIR / f"{path}.toml").is_file():
        path = SUITES_DIR / f"{path}.toml"
    if path.is_dir():
        raise DiffbenchError(f"suite {path} is a folder, not a TOML file")
    try:
        data = tomllib.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        names = sorted(p.stem for p in SUITES_DIR.glob("*.toml"))
        close = difflib.get_close_matches(str(path), names, n=1, cutoff=0.6)
        hint = f"; did you mean '{close[0]}'?" if close else f" (built-in: {', '.join(names)})"
        raise DiffbenchError(f"suite file not found: {path}{hint}") from None
    except OSError as exc:
        raise DiffbenchError(f"cannot read suite file {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise DiffbenchError(f"suite file {path} is not UTF-8 text (a TOML file?)") from None
    except tomllib.TOMLDecodeError as exc:
        raise DiffbenchError(f"suite file {path} is not valid TOML: {exc}") from None
    unknown = set(data) - set(SECTIONS)
    if unknown:
        raise DiffbenchError(f"suite file {path}: unknown sections {sorted(unknown)}; "
                             f"use {', '.join(SECTIONS)}")
    for key, kind in SECTIONS.items():
        if key in data and not isinstance(data[key], kind):
            shape = {str: "a string", dict: "a table", list: "an array"}[kind]
            raise DiffbenchError(f"suite file {path}: '{key}' must be {shape}, not "
                                 f"{type(data[key]).__name__} {data[key]!r}"[:200])
    for section in ("methods", "attacks"):
        for i, entry in enumerate(data.get(section, [])):
            if not isinstance(entry, dict) or not isinstance(entry.get("params", {}), dict):
                raise DiffbenchError(f"suite file {path}: {section}[{i}] must be a "
                                     f"[[{section}]] table with a name and a params table")
            if not isinstance(entry.get("name"), str):
                raise DiffbenchError(f"suite file {path}: {section}[{i}] needs a name string")
            extra = set(entry) - {"name", "params"}
            if section == "attacks" and extra:
                raise DiffbenchError(f"suite file {path}: [[attacks]] '{entry['name']}' has "
                                     f"unknown keys {sorted(extra)}; put its parameters under "
                                     "params")
    if not all(isinstance(m, str) for m in data.get("metrics", [])):
        raise DiffbenchError(f"suite file {path}: metrics must be an array of metric names")
    data.setdefault("name", path.stem)
    return data


def load_suite(path: str | Path, overrides: Mapping[str, Any] | None = None,
               methods: list[Mapping[str, Any]] | None = None,
               attacks: list[Mapping[str, Any]] | None = None) -> RunConfig:
    """Read a suite TOML; CLI overrides replace its defaults, CLI methods its methods and CLI
    attacks its attacks."""
    from harness.files import check_name
    from harness.metric import check_metric_options

    data = read_suite(Path(path))
    names = tuple(data.get("metrics", RunConfig.metrics))
    options = data.get("metric_options", {})
    for name in names:
        METRICS.get(name)  # unknown metric names fail now, with a suggestion
    check_metric_options(options)  # metric names, tables, option names (Metric.option_names)
    defaults = {**data.get("defaults", {}), **(overrides or {})}
    return RunConfig(
        name=check_name(data["name"], "suite name"),
        cells=expand_grid(defaults, methods or data.get("methods") or [{"name": "baseline"}],
                          attacks or data.get("attacks")),
        timing=P.build(Timing, data.get("timing"), owner="timing"),
        metrics=names,
        metric_options=options,
    )


def parse_method(text: str) -> dict[str, Any]:
    """CLI method spec 'name' or 'name:key=value,key=value'."""
    name, _, rest = text.partition(":")
    assignments = [item for item in rest.split(",") if item.strip()]
    return {"name": name.strip(), "params": P.parse_assignments(assignments, f"method '{name}'")}
