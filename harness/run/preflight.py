"""The whole grid checked before any cell starts: bad input is one line (exit 2), nothing written.

Each distinct setting is checked once: the suite name (it becomes a folder), models'
resolutions, weights folders (model_index.json, whole safetensors files), devices, prompt sets
(files parsed in full, errors name file and line) against n_images, metric names and options.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any

from harness.files import check_name
from harness.metric import METRICS, check_metric_options
from harness.models import MODELS, check_resolution, check_weights
from harness.prompts import load_prompts
from harness.run.config import RunConfig
from harness.run.devices import check_device


def _once(check: Callable[..., Any]) -> Callable[..., None]:
    """`check` called once per distinct argument tuple."""
    seen: set[Hashable] = set()

    def call(*args: Any) -> None:
        if args not in seen:
            check(*args)
            seen.add(args)

    return call


def check(config: RunConfig) -> None:
    """Raise DiffbenchError (one line) at the first bad input anywhere in the grid."""
    check_name(config.name, "suite name")
    for name in config.metrics:
        METRICS.get(name)
    check_metric_options(config.metric_options)
    resolution = _once(lambda m, r: check_resolution(MODELS.get(m), r))
    weights = _once(lambda m, w: check_weights(MODELS.get(m), w))
    device, prompts = _once(check_device), _once(load_prompts)
    for cell in config.cells:
        resolution(cell.model, cell.resolution)
        weights(cell.model, cell.weights)
        device(cell.device)
        prompts(cell.prompts, cell.n_images)
