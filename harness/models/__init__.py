"""The model room: the registry (`registry.py`), published-config zoo (`zoo.py`), tiny test
builds (`tiny.py`) and their building blocks (`build.py`). Its API is re-exported here."""

from harness.models.registry import (
    DTYPES,
    EMBEDDED,
    MODELS,
    RANDOM_WEIGHTS,
    ModelSpec,
    check_resolution,
    check_weights,
    load_pipeline,
    register_model,
    resolve_dtype,
    text_to_image_kwargs,
    weights_source,
)

__all__ = ["DTYPES", "EMBEDDED", "MODELS", "RANDOM_WEIGHTS", "ModelSpec", "check_resolution",
           "check_weights", "load_pipeline",
           "register_model", "resolve_dtype", "text_to_image_kwargs", "weights_source"]
