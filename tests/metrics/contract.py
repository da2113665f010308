"""The contract every registered metric passes (harness/metric.py): states declared with their
reductions, shards merged into a fresh metric equal one pass, reset empties the state, and the
suite's `[metric_options.<name>]` keys are checked against the options the metric declares.

Each registered metric has one `Test...(MetricContract)` class in its test module that builds
the metric offline (tiny random backends, injected extractors / detectors) and gives
observations; tests/metrics/test_contract.py fails when a registered metric has none.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any, ClassVar

import numpy as np
import pytest

from harness.errors import DiffbenchError
from harness.metric import METRICS, REDUCTIONS, Metric, Observation, check_metric_options


@contextmanager
def one_line_error(pattern: str) -> Iterator[None]:
    """The block raises a DiffbenchError matching `pattern` whose message is a single line."""
    with pytest.raises(DiffbenchError, match=pattern) as err:
        yield
    assert "\n" not in str(err.value)


class RecordingOptions(Mapping):
    """A metric's option table that records every key the metric looks up."""

    def __init__(self, values: Mapping[str, Any]) -> None:
        self.values, self.read = dict(values), set()

    def __getitem__(self, key: str) -> Any:
        self.read.add(key)
        return self.values[key]

    def get(self, key: str, default: Any = None) -> Any:
        self.read.add(key)
        return self.values.get(key, default)

    def __contains__(self, key: object) -> bool:
        self.read.add(key)
        return key in self.values

    def __iter__(self) -> Iterator[str]:
        return iter(self.values)

    def __len__(self) -> int:
        return len(self.values)


def cell_context(options: Mapping[str, Any] | None = None, embedded: bool = False) -> Any:
    """A MetricContext-like object for a non-baseline cell of a model with quality metrics."""
    cell = SimpleNamespace(model="m", weights="some/model", device="cpu", params="{}",
                           key="cell", baseline_key="baseline")
    spec = SimpleNamespace(name="m", has_quality=True, embedded=embedded)
    return SimpleNamespace(cell=cell, spec=spec, store=None, options=options or {})


def assert_same(a: Any, b: Any) -> None:
    """Equal values, recursing into dicts, lists and numpy arrays (bit-exact)."""
    if isinstance(a, Mapping):
        assert isinstance(b, Mapping) and a.keys() == b.keys(), (a, b)
        for key in a:
            assert_same(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), (a, b)
        for x, y in zip(a, b, strict=True):
            assert_same(x, y)
    elif isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        np.testing.assert_array_equal(a, b)
    else:
        assert a == b, (a, b)


def load_suite_text(tmp_path: Path, body: str) -> Any:
    from harness.run.config import load_suite

    path = tmp_path / "suite.toml"
    path.write_text('[defaults]\ndevice = "cpu"\n\n' + body)
    return load_suite(path)


class MetricContract:
    """Mixin: subclasses set `metric_name` and implement `make_metric` and `observations`.

    `observations` should make compute() differ from a fresh metric's, with values whose
    reductions are exact (integers, dyadic fractions), so merged shards equal one pass bit for
    bit. For the option check, `option_values(tmp_path)` gives options under which `for_cell`
    reads every declared option, and `patch_offline` replaces what `for_cell` would download.
    """

    metric_name: ClassVar[str] = ""
    embedded: ClassVar[bool] = False  # for_cell's context is the embedded model (mini-sd)

    def make_metric(self) -> Metric:
        raise NotImplementedError

    def observations(self) -> list[Observation]:
        raise NotImplementedError

    def option_values(self, tmp_path: Path) -> dict[str, Any]:
        return {}

    def patch_offline(self, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
        """Replace heavy or online pieces `for_cell` would load (default: nothing)."""

    def fed(self, observations: list[Observation]) -> Metric:
        metric = self.make_metric()
        for obs in observations:
            metric.update(obs)
        return metric

    # --- the contract ---------------------------------------------------------------------
    def test_is_the_registered_class(self):
        cls = METRICS.get(self.metric_name)
        metric = self.make_metric()
        assert isinstance(metric, cls) and cls.name == self.metric_name
        assert all(isinstance(o, str) for o in cls.option_names)
        assert len(set(cls.option_names)) == len(cls.option_names)

    def test_states_are_declared_with_reductions(self):
        metric = self.make_metric()
        assert metric.state(), "a metric without declared states merges nothing"
        assert set(metric._reductions) == set(metric.state())
        assert set(metric._reductions.values()) <= set(REDUCTIONS)

    def test_update_changes_only_declared_states(self):
        """What update() observes lives in states: the merging side rebuilds the rest."""
        metric = self.make_metric()
        states = set(metric.state())

        def config() -> dict[str, Any]:
            return {k: v for k, v in vars(metric).items()
                    if k not in states and not k.startswith("_")}

        before = config()
        for obs in self.observations():
            metric.update(obs)
        after = config()
        assert before.keys() == after.keys()
        for key, value in before.items():
            assert after[key] is value or after[key] == value, f"{key} changed in update()"

    def test_halves_merged_into_fresh_metric_equal_one_pass(self):
        obs = self.observations()
        assert len(obs) >= 2
        whole = self.fed(obs)
        assert whole.compute() != self.make_metric().compute(), "observations measure nothing"
        half = len(obs) // 2
        a, b = self.fed(obs[:half]), self.fed(obs[half:])
        merged = self.make_metric()
        merged.merge_state(a.state())
        merged.merge_state(b.state())
        assert_same(merged.compute(), whole.compute())
        assert_same(merged.state(), whole.state())

    def test_reset_empties_the_state(self):
        obs = self.observations()
        metric = self.fed(obs)
        metric.reset()
        assert_same(metric.state(), self.make_metric().state())
        assert_same(metric.compute(), self.make_metric().compute())
        for o in obs:
            metric.update(o)
        assert_same(metric.compute(), self.fed(obs).compute())

    def test_unknown_option_is_a_one_line_error(self, tmp_path):
        name = self.metric_name
        with one_line_error(rf"^\[metric_options\.{name}\] has unknown option 'no_such_option' "
                            rf"\(metric '{name}' options: "):
            load_suite_text(tmp_path, f"[metric_options.{name}]\nno_such_option = 1\n")
        for option in METRICS.get(name).option_names:
            typo = option[:-1]
            with one_line_error(rf"unknown option '{typo}'; did you mean '{option}'\?"):
                load_suite_text(tmp_path, f"[metric_options.{name}]\n{typo} = 1\n")

    def test_declared_options_pass_the_check(self):
        names = METRICS.get(self.metric_name).option_names
        check_metric_options({self.metric_name: dict.fromkeys(names, "x")})
        check_metric_options({self.metric_name: {}})

    def test_non_table_options_are_a_one_line_error(self, tmp_path):
        name = self.metric_name
        with one_line_error(rf"^\[metric_options\] {name} = 3 is not a table"):
            load_suite_text(tmp_path, f"[metric_options]\n{name} = 3\n")

    def test_declared_options_are_the_ones_for_cell_reads(self, monkeypatch, tmp_path):
        cls = METRICS.get(self.metric_name)
        values = self.option_values(tmp_path)
        assert set(values) <= set(cls.option_names)
        self.patch_offline(monkeypatch, tmp_path)
        options = RecordingOptions(values)
        cls.for_cell(cell_context({self.metric_name: options}, embedded=self.embedded))
        assert options.read == set(cls.option_names)
