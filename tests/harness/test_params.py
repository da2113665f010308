from dataclasses import dataclass

import pytest

from harness import params as P
from harness.errors import DiffbenchError


@dataclass(frozen=True)
class Cfg:
    interval: int = P.param(3, "every N", low=1, high=10)
    scale: float = P.param(0.5, "scale", low=0.0, high=1.0)
    mode: str = P.param("a", "mode", choices=("a", "b"))
    flag: bool = P.param(False, "flag")
    steps: int | None = P.param(None, "optional", low=1)


def test_build_coerces_cli_strings():
    cfg = P.build(Cfg, {"interval": "4", "scale": "0.25", "flag": "true", "steps": "7"}, "m")
    assert cfg == Cfg(interval=4, scale=0.25, flag=True, steps=7)


def test_out_of_range_names_field_and_range():
    with pytest.raises(DiffbenchError, match=r"m.interval=0 is out of range; allowed \[1, 10\]"):
        P.build(Cfg, {"interval": 0}, "m")


def test_bad_choice_lists_choices():
    with pytest.raises(DiffbenchError, match="choose one of 'a', 'b'"):
        P.build(Cfg, {"mode": "c"}, "m")


def test_unknown_field_did_you_mean():
    with pytest.raises(DiffbenchError, match="did you mean 'interval'"):
        P.build(Cfg, {"intervall": 2}, "m")


def test_unparseable_value():
    with pytest.raises(DiffbenchError, match="cannot read 'x' as int"):
        P.build(Cfg, {"interval": "x"}, "m")


def test_fractional_int_refused():
    with pytest.raises(DiffbenchError):
        P.build(Cfg, {"interval": 2.5}, "m")


def test_canonical_json_and_hash_are_order_independent():
    a, b = {"b": 1, "a": (1, 2)}, {"a": [1, 2], "b": 1}
    assert P.canonical_json(a) == P.canonical_json(b) == '{"a":[1,2],"b":1}'
    assert P.short_hash(a) == P.short_hash(b) and len(P.short_hash(a)) == 12


def test_parse_assignments():
    assert P.parse_assignments(["a=1", " b = x "]) == {"a": "1", "b": "x"}
    with pytest.raises(DiffbenchError, match="name=value"):
        P.parse_assignments(["oops"])
