"""Baseline: the pipeline as it is; every speedup and FLOPs ratio is measured against it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from harness.method import MethodHandle, register_method
from harness.steps import StepContext


@register_method("baseline")
@dataclass(frozen=True)
class BaselineConfig:
    """No parameters: the unmodified pipeline."""


def apply(pipe: Any, config: BaselineConfig, ctx: StepContext) -> MethodHandle:
    """Change nothing; the handle still refuses a second application like every method."""
    return MethodHandle(pipe, "baseline", config)
