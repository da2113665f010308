"""Frozen config dataclasses: documented fields with ranges, parsing from dicts/strings, hashing."""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import types
import typing
from collections.abc import Mapping
from typing import Any

from harness.errors import DiffbenchError


def param(default: Any, doc: str, *, low: float | None = None, high: float | None = None,
          choices: tuple | None = None) -> Any:
    """A documented config field; `low`/`high` bound numbers (inclusive), `choices` values."""
    meta = {"doc": doc, "low": low, "high": high, "choices": choices}
    return dataclasses.field(default=default, metadata=meta)


def validate(config: Any, owner: str) -> None:
    """Raise DiffbenchError naming the field and its allowed range when a value is out of it."""
    for f in dataclasses.fields(config):
        value, meta = getattr(config, f.name), f.metadata
        if value is None:
            continue
        where = f"{owner}.{f.name}={value!r}"
        items = value if isinstance(value, tuple) else (value,)
        if any(isinstance(v, float) and not math.isfinite(v) for v in items):
            raise DiffbenchError(f"{where} is not a finite number")
        if meta.get("choices") is not None and value not in meta["choices"]:
            allowed = ", ".join(repr(c) for c in meta["choices"])
            raise DiffbenchError(f"{where} is not allowed; choose one of {allowed}")
        low, high = meta.get("low"), meta.get("high")
        if (low is not None and value < low) or (high is not None and value > high):
            lo = "-inf" if low is None else low
            hi = "inf" if high is None else high
            raise DiffbenchError(f"{where} is out of range; allowed [{lo}, {hi}]")


def _coerce(value: Any, kind: Any, where: str) -> Any:
    """Convert a CLI string / TOML value to the field's declared type (Optional unwrapped)."""
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        if value is None:
            return None
        kind = next(a for a in typing.get_args(kind) if a is not type(None))
    kind = typing.get_origin(kind) or kind
    try:
        if kind is bool:
            if isinstance(value, str):
                if value.lower() in ("1", "true", "yes", "on"):
                    return True
                if value.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError(value)
            if isinstance(value, (bool, int)):
                return bool(value)
            raise ValueError(value)
        if kind is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if kind is float:
            return float(value)
        if kind is str:
            return str(value)
        if kind is tuple:
            items = value.split(",") if isinstance(value, str) else list(value)
            return tuple(int(v) if str(v).strip().lstrip("-").isdigit() else v for v in items)
    except (TypeError, ValueError):
        raise DiffbenchError(f"{where}: cannot read {value!r} as {kind.__name__}") from None
    return value


def build(config_cls: type, params: Mapping[str, Any] | None, owner: str) -> Any:
    """Instantiate a frozen config from a mapping, refusing unknown fields with a suggestion."""
    params = dict(params or {})
    hints = typing.get_type_hints(config_cls)
    names = [f.name for f in dataclasses.fields(config_cls)]
    for key in params:
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1, cutoff=0.5)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            known = ", ".join(names) or "none"
            raise DiffbenchError(f"{owner} has no parameter '{key}'{hint} (parameters: {known})")
    values = {k: _coerce(v, hints[k], f"{owner}.{k}") for k, v in params.items()}
    config = config_cls(**values)
    validate(config, owner)
    return config


def as_dict(config: Any) -> dict[str, Any]:
    """Config fields as plain JSON-able values (tuples become lists)."""
    return json.loads(canonical_json(dataclasses.asdict(config)))


def canonical_json(obj: Any) -> str:
    """Stable JSON: sorted keys, no spaces, tuples as lists."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=list)


def short_hash(obj: Any, n: int = 12) -> str:
    """First n hex digits of the sha256 of the canonical JSON of obj."""
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()[:n]


def parse_assignments(items: list[str] | None, what: str = "parameter") -> dict[str, str]:
    """Parse ["k=v", ...] from the CLI into a dict; a missing '=' is a one-line error."""
    out: dict[str, str] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise DiffbenchError(f"{what} '{item}' must look like name=value")
        out[key.strip()] = value.strip()
    return out
