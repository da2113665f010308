"""Method stacks: `deepcache+tome` applies several adapters to one pipeline, left to right.

Each method declares the pipeline parts it changes (`register_method(..., touches=...)`); a
stack whose members share a part is refused with a one-line reason, before any work starts.
A stack's config is a frozen dataclass with one field per member holding that member's config,
so its canonical JSON is `{"deepcache": {...}, "tome": {...}}`. Parameters are given nested
(TOML: `params = { tome = { ratio = 0.5 } }`), prefixed (CLI: `tome.ratio=0.5`) or bare when
exactly one member has a field of that name.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator, Mapping
from typing import Any

from harness.errors import DiffbenchError
from harness.method import METHODS, MethodHandle, MethodSpec
from harness.steps import StepContext

SEP = "+"


def resolve_method(name: str) -> MethodSpec | StackSpec:
    """A registered method, or a stack for `a+b+...`; unknown or incompatible names raise."""
    if SEP not in name:
        return METHODS.get(name)
    return _stack(tuple(part.strip() for part in name.split(SEP)))


@functools.cache
def _stack(names: tuple[str, ...]) -> StackSpec:
    if any(not n for n in names):
        raise DiffbenchError(f"method stack '{SEP.join(names)}' has an empty member")
    if len(set(names)) != len(names):
        raise DiffbenchError(f"method stack '{SEP.join(names)}' names a method twice")
    members = tuple(METHODS.get(n) for n in names)
    for i, a in enumerate(members):
        if a.name == "baseline":
            raise DiffbenchError("baseline cannot be stacked: it is the unmodified pipeline")
        for b in members[i + 1:]:
            shared = a.touches & b.touches
            if shared:
                raise DiffbenchError(
                    f"methods '{a.name}' and '{b.name}' cannot be stacked: both change "
                    f"{', '.join(sorted(shared))}")
    config_cls = dataclasses.make_dataclass(
        "StackConfig", [(m.name, m.config_cls) for m in members], frozen=True)
    config_cls.__doc__ = f"Configs of the stacked methods {', '.join(names)}."
    return StackSpec(SEP.join(names), members, config_cls)


@dataclasses.dataclass(frozen=True)
class StackSpec:
    """Several methods applied in order to one pipeline; quacks like a MethodSpec."""

    name: str
    members: tuple[MethodSpec, ...]
    config_cls: type

    @property
    def touches(self) -> frozenset[str]:
        return frozenset().union(*(m.touches for m in self.members))

    @property
    def doc(self) -> str:
        return "stack: " + " + ".join(f"{m.name} ({m.doc})" for m in self.members)

    def fields(self) -> list[dataclasses.Field]:
        return [f for m in self.members for f in m.fields()]

    def config(self, params: Mapping[str, Any] | None = None) -> Any:
        """Route each parameter to its member, build and validate every member's config."""
        per: dict[str, dict[str, Any]] = {m.name: {} for m in self.members}
        owners: dict[str, list[str]] = {}
        for m in self.members:
            for f in m.fields():
                owners.setdefault(f.name, []).append(m.name)
        for key, value in (params or {}).items():
            if key in per and isinstance(value, Mapping):
                per[key].update(value)
                continue
            member, dot, field = key.partition(".")
            if dot and member in per:
                per[member][field] = value
            elif len(owners.get(key, [])) == 1:
                per[owners[key][0]][key] = value
            elif key in owners:
                raise DiffbenchError(f"parameter '{key}' of stack '{self.name}' is ambiguous; "
                                     f"write {' or '.join(f'{o}.{key}' for o in owners[key])}")
            else:
                known = ", ".join(f"{m}.{f}" for m, fs in
                                  ((m.name, [f.name for f in m.fields()]) for m in self.members)
                                  for f in fs) or "none"
                raise DiffbenchError(f"stack '{self.name}' has no parameter '{key}' "
                                     f"(parameters: {known})")
        return self.config_cls(**{m.name: m.config(per[m.name]) for m in self.members})

    @property
    def prepares(self) -> bool:
        return any(m.prepares for m in self.members)

    def apply(self, pipe: Any, config: Any, ctx: StepContext,
              artifacts: Mapping[str, Any] | None = None) -> StackHandle:
        """Apply members left to right; if one fails, the ones already applied are removed."""
        handles: list[MethodHandle] = []
        try:
            for m in self.members:
                handles.append(m.apply(pipe, getattr(config, m.name), ctx, artifacts))
        except BaseException:
            for h in reversed(handles):
                h.remove()
            raise
        return StackHandle(self.name, handles)


class StackStats(Mapping[str, int]):
    """The members' counters as one mapping (a counter two members keep is summed);
    `clear()` clears every member's."""

    def __init__(self, handles: list[MethodHandle]):
        self.handles = handles

    def merged(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for h in self.handles:
            for k, v in h.stats.items():
                out[k] = out.get(k, 0) + v
        return out

    def __getitem__(self, key: str) -> int:
        return self.merged()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.merged())

    def __len__(self) -> int:
        return len(self.merged())

    def clear(self) -> None:
        for h in self.handles:
            h.stats.clear()


class StackHandle:
    """The member handles; `remove()` undoes them in reverse order; `stats`: the members'
    counters."""

    def __init__(self, name: str, handles: list[MethodHandle]):
        self.name, self.handles = name, handles
        self.stats = StackStats(handles)
        self.call_kwargs: dict[str, Any] = {}
        self.report: dict[str, Any] = {k: v for h in handles for k, v in h.report.items()}
        for h in handles:
            clash = set(self.call_kwargs) & set(h.call_kwargs)
            if clash:
                self.remove()
                raise DiffbenchError(f"stack '{name}': '{h.name}' and an earlier member both set "
                                     f"pipeline argument(s) {sorted(clash)}")
            self.call_kwargs.update(h.call_kwargs)

    def remove(self) -> None:
        for h in reversed(self.handles):
            h.remove()

    def __enter__(self) -> StackHandle:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()
