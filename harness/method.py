"""Method adapter contract: a registered frozen config + `apply(pipe, config, ctx) -> handle`."""

from __future__ import annotations

import dataclasses
import sys
import weakref
from collections.abc import Callable, Mapping
from typing import Any

import torch

from harness import params as P
from harness.errors import DiffbenchError
from harness.registry import Registry, plugin_loader
from harness.steps import StepContext

_MISSING = object()


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    """A registered method: its name, config class and the module that holds `apply`."""

    name: str
    config_cls: type
    module: str
    touches: frozenset[str] = frozenset()  # pipeline parts it changes; stacks may not share one

    @property
    def doc(self) -> str:
        """First line of the module docstring; of the config's when the module holds several
        methods (ptq_minmax and lsq), so each gets its own description."""
        shared = sum(spec.module == self.module for _, spec in METHODS.items()) > 1
        module_doc = sys.modules[self.module].__doc__ or ""
        text = ((self.config_cls.__doc__ or module_doc) if shared
                else (module_doc or self.config_cls.__doc__ or "")).strip()
        return text.splitlines()[0] if text else ""

    def config(self, params: Mapping[str, Any] | None = None) -> Any:
        """Build and validate the method's frozen config from a parameter mapping."""
        return P.build(self.config_cls, params, owner=self.name)

    @property
    def prepares(self) -> bool:
        """True for training methods: the module defines `prepare(pipe, config, data)`."""
        return hasattr(sys.modules[self.module], "prepare")

    def training_prompts(self, config: Any, data: Any) -> tuple[str, ...]:
        """The prompts `prepare` trains on, which key its artifact: the module's
        `training_prompts(config, data)` when it defines one (e.g. () for methods that train on
        their concept prompts only), else all of data.prompts."""
        chosen = getattr(sys.modules[self.module], "training_prompts", None)
        return tuple(chosen(config, data)) if chosen else tuple(data.prompts)

    def prepare(self, pipe: Any, config: Any, data: Any) -> dict[str, torch.Tensor]:
        """Train or calibrate: the artifact (tensors) `apply` needs; see harness/prepare.py."""
        return sys.modules[self.module].prepare(pipe, config, data)

    def apply(self, pipe: Any, config: Any, ctx: StepContext,
              artifacts: Mapping[str, Mapping[str, torch.Tensor]] | None = None) -> MethodHandle:
        """Apply to `pipe`; a training method takes its prepared artifact from `artifacts`."""
        module = sys.modules[self.module]
        if not self.prepares:
            return module.apply(pipe, config, ctx)
        artifact = (artifacts or {}).get(self.name)
        if artifact is None:
            raise DiffbenchError(f"method '{self.name}' needs prepared weights; get them with "
                                 "harness.prepare.prepare_artifacts (the runner does this)")
        return module.apply(pipe, config, ctx, artifact)

    def fields(self) -> list[dataclasses.Field]:
        return list(dataclasses.fields(self.config_cls))


METHODS: Registry[MethodSpec] = Registry("method", loader=plugin_loader("methods"))


def register_method(name: str, touches: tuple[str, ...] = ()) -> Callable[[type], type]:
    """Class decorator for a method's frozen config dataclass; the only place a name is set.

    `touches` names the parts of a pipeline the method changes (e.g. "scheduler",
    "unet.block_outputs", "attention.tokens"); a stack of methods that share one is refused.
    """
    if "+" in name:
        raise ValueError(f"method name {name!r}: '+' joins methods into a stack")

    def decorator(config_cls: type) -> type:
        if not dataclasses.is_dataclass(config_cls) or not config_cls.__dataclass_params__.frozen:
            raise TypeError(f"method '{name}': config must be a frozen dataclass")
        spec = MethodSpec(name, config_cls, config_cls.__module__, frozenset(touches))
        METHODS.register(name)(spec)
        config_cls.method_name = name
        return config_cls

    return decorator


_APPLIED: weakref.WeakKeyDictionary[Any, set[str]] = weakref.WeakKeyDictionary()


class MethodHandle:
    """Every change a method made to a pipeline, undone in reverse order by `remove()`.

    Changes go through `swap_attr` (attributes, including instance `forward` overrides,
    restored exactly, absence included) and `add_hook` (torch hook handles).
    `call_kwargs` are pipeline-call arguments the method sets (e.g. the step count);
    `report` holds values the method states about itself (bits, weight bytes), which become
    leaderboard columns of the cell (`method_note`: a line for the row's note column instead);
    `stats` holds counters the method updates while it runs
    (an adaptive cache's calls and skips), read into the cell's columns after its images.
    """

    def __init__(self, pipe: Any, name: str, config: Any):
        applied = _APPLIED.setdefault(pipe, set())
        if name in applied:
            raise DiffbenchError(f"method '{name}' is already applied to this pipeline; "
                                 "remove() its handle first")
        applied.add(name)
        self.pipe, self.name, self.config = pipe, name, config
        self.call_kwargs: dict[str, Any] = {}
        self.report: dict[str, float | int | str] = {}  # leaderboard columns (e.g. weight_bits)
        self.stats: dict[str, int] = {}  # counters updated while applied (e.g. cache_skips)
        self._undo: list[Callable[[], None]] = []
        self._removed = False

    def swap_attr(self, obj: Any, attr: str, value: Any) -> None:
        """Set obj.attr = value, remembering the instance's own previous value (or absence)."""
        own = obj.__dict__ if not isinstance(obj, torch.nn.Module) else None
        if isinstance(obj, torch.nn.Module):
            for store in ("_modules", "_parameters", "_buffers"):
                if attr in obj.__dict__[store]:
                    own = obj.__dict__[store]
                    break
            else:
                own = obj.__dict__
        previous = own.get(attr, _MISSING)

        def undo() -> None:
            if previous is _MISSING:
                delattr(obj, attr)
            else:
                setattr(obj, attr, previous)

        setattr(obj, attr, value)
        self._undo.append(undo)

    def add_hook(self, hook_handle: Any) -> None:
        """Track a torch RemovableHandle (forward / pre-forward hook)."""
        self._undo.append(hook_handle.remove)

    def on_remove(self, fn: Callable[[], None]) -> None:
        """Run fn on remove (e.g. to drop cached tensors)."""
        self._undo.append(fn)

    def remove(self) -> None:
        """Undo every change, most recent first; idempotent."""
        if self._removed:
            return
        for undo in reversed(self._undo):
            undo()
        self._undo.clear()
        _APPLIED.get(self.pipe, set()).discard(self.name)
        self._removed = True

    def __enter__(self) -> MethodHandle:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()
