"""Attack contract: a registered frozen config + `search(pipe, config, target) -> AttackResult`.

An attack tries to bring an erased concept back on the cell's (erased) pipeline. It searches
once (seeded, its cost in seconds recorded, the result cached like prepared weights) and its
result is applied to every prompt of the cell: the concept's word in the prompt is replaced by
the result's `text` (a substitute prompt fragment), and a result with tensors may also change
the pipeline while the images are made (e.g. a learned token embedding), undone afterwards
through a MethodHandle. See ARCHITECTURE.md, "How to add" (an attack).
"""

from __future__ import annotations

import dataclasses
import re
import sys
from collections.abc import Callable, Mapping
from typing import Any

import torch

from harness import params as P
from harness.method import MethodHandle
from harness.registry import Registry, plugin_loader

NO_ATTACK = "none"


@dataclasses.dataclass(frozen=True)
class AttackResult:
    """What a search found: the fragment that replaces the concept word in each prompt (or
    `prompts`, replacement prompts used in turn), tensors `apply` needs, and the search's own
    numbers (objective values, queries) for the record."""

    text: str = ""
    prompts: tuple[str, ...] = ()
    tensors: Mapping[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    info: Mapping[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class AttackTarget:
    """What an attack may use: the concept, the cell's prompts and seed, the erased pipeline's
    images, the original (method removed) pipeline's images, and the concept detector."""

    concept: str
    prompts: tuple[str, ...]  # the cell's prompts (those that name the concept)
    seed: int
    device: str
    # (prompts, seeds, steps) -> uint8 N x H x W x 3 images of the erased pipeline
    generate: Callable[[list[str], list[int], int], torch.Tensor]
    # the same with the cell's method taken off (the model before erasure)
    original: Callable[[list[str], list[int], int], torch.Tensor]
    # uint8 images -> per-image probability that the concept is present (float64, N)
    concept_prob: Callable[[torch.Tensor], torch.Tensor]
    log: Callable[[str], None] = print


@dataclasses.dataclass(frozen=True)
class AttackSpec:
    """A registered attack: its name, config class and the module that holds `search`."""

    name: str
    config_cls: type
    module: str

    @property
    def doc(self) -> str:
        text = (sys.modules[self.module].__doc__ or self.config_cls.__doc__ or "").strip()
        return text.splitlines()[0] if text else ""

    def config(self, params: Mapping[str, Any] | None = None) -> Any:
        return P.build(self.config_cls, params, owner=f"attack '{self.name}'")

    def fields(self) -> list[dataclasses.Field]:
        return list(dataclasses.fields(self.config_cls))

    def search(self, pipe: Any, config: Any, target: AttackTarget) -> AttackResult:
        return sys.modules[self.module].search(pipe, config, target)

    def apply(self, pipe: Any, config: Any, result: AttackResult) -> MethodHandle:
        """Install what the result needs while the images are made; remove() undoes it."""
        handle = MethodHandle(pipe, f"attack:{self.name}", config)
        install = getattr(sys.modules[self.module], "apply", None)
        if install is not None:
            install(pipe, config, result, handle)
        return handle


ATTACKS: Registry[AttackSpec] = Registry("attack", loader=plugin_loader("attacks"))


def register_attack(name: str) -> Callable[[type], type]:
    """Class decorator for an attack's frozen config dataclass; the only place a name is set.
    Every config has a `concept` field: the word the attack brings back."""

    def decorator(config_cls: type) -> type:
        if not dataclasses.is_dataclass(config_cls) or not config_cls.__dataclass_params__.frozen:
            raise TypeError(f"attack '{name}': config must be a frozen dataclass")
        if "concept" not in {f.name for f in dataclasses.fields(config_cls)}:
            raise TypeError(f"attack '{name}': config needs a `concept` field")
        ATTACKS.register(name)(AttackSpec(name, config_cls, config_cls.__module__))
        config_cls.attack_name = name
        return config_cls

    return decorator


def concept_pattern(concept: str) -> re.Pattern[str]:
    """The concept as a whole word or phrase, case-insensitive."""
    return re.compile(rf"\b{re.escape(concept.strip())}\b", re.IGNORECASE)


def spells(text: str, concept: str) -> bool:
    """True when `text` writes the concept, also with spaces or punctuation inside it."""
    squash = re.sub(r"[^a-z0-9]", "", text.lower())
    return re.sub(r"[^a-z0-9]", "", concept.lower()) in squash


def rewrite(prompts: list[str], concept: str, result: AttackResult) -> list[str]:
    """The attacked prompts: the result's prompts in turn, or each prompt with the concept
    replaced by the result's text (a prompt without the concept gets the text in front)."""
    if result.prompts:
        return [result.prompts[i % len(result.prompts)] for i in range(len(prompts))]
    pattern = concept_pattern(concept)
    out = []
    for text in prompts:
        new, n = pattern.subn(result.text, text)
        out.append(" ".join((new if n else f"{result.text} {text}").split()))
    return out
