"""Every registered metric has a contract test class; the "same" reduction; option checks."""

import importlib
import pkgutil

import pytest

import tests.metrics
from harness.metric import METRICS, REDUCTIONS, check_metric_options
from tests.metrics.contract import MetricContract, one_line_error


def contract_classes() -> list[type]:
    for info in pkgutil.iter_modules(tests.metrics.__path__):
        if info.name.startswith("test_"):
            importlib.import_module(f"tests.metrics.{info.name}")
    found, todo = [], list(MetricContract.__subclasses__())
    while todo:
        cls = todo.pop()
        found.append(cls)
        todo += cls.__subclasses__()
    return found


def test_every_registered_metric_has_a_contract_test_class():
    classes = contract_classes()
    covered = {cls.metric_name for cls in classes if cls.__name__.startswith("Test")}
    missing = sorted(set(METRICS.names()) - covered)
    assert not missing, f"registered metrics without a MetricContract test class: {missing}"
    names = [cls.metric_name for cls in classes]
    assert len(names) == len(set(names)), "one contract test class per metric"


def test_same_reduction_keeps_the_one_value_and_refuses_two():
    same = REDUCTIONS["same"]
    assert same("", "rss_peak") == same("rss_peak", "") == same("rss_peak", "rss_peak")
    assert same("rss_peak", None) == same(None, "rss_peak") == "rss_peak"
    assert same("", "") == ""
    with pytest.raises(ValueError, match="'cuda_allocated' and 'rss_peak'"):
        same("cuda_allocated", "rss_peak")


def test_option_checks_name_the_metric_and_suggest():
    check_metric_options({})
    check_metric_options({"nsfw": {"threshold": 0.5}, "latency": {}})
    with one_line_error(r"unknown metric 'fd_clp'; did you mean 'fd_clip'"):
        check_metric_options({"fd_clp": {}})
    with one_line_error(r"^\[metric_options\.nsfw\] has unknown option 'treshold'; did you mean "
                        r"'threshold'\? \(metric 'nsfw' options: classes, threshold\)$"):
        check_metric_options({"nsfw": {"treshold": 0.5}})
    with one_line_error(r"^\[metric_options\.latency\] has unknown option 'x' "
                        r"\(metric 'latency' options: none\)$"):
        check_metric_options({"latency": {"x": 1}})
    with one_line_error(r"^\[metric_options\] fd_clip = \[1, 2\] is not a table: write "
                        r"\[metric_options\.fd_clip\] with its options \(allowed: clip_model\)$"):
        check_metric_options({"fd_clip": [1, 2]})
    with one_line_error(r"^\[metric_options\] must be a table"):
        check_metric_options(3)
