import pytest

from harness.errors import DiffbenchError
from harness.reporting.compare import Tolerance, compare, parse_tolerances, render
from harness.run.leaderboard import render_csv
from tests.harness.run.test_leaderboard import record


def write(path, recs):
    path.write_text(render_csv(recs))
    return path


def test_identical_leaderboards_have_no_regression(tmp_path):
    recs = [record("base", "baseline", 0.1, 1000.0)]
    diffs = compare(write(tmp_path / "a.csv", recs), write(tmp_path / "b.csv", recs))
    assert diffs and not any(d.regression for d in diffs)


def test_slower_run_is_a_regression_and_faster_is_not(tmp_path):
    ref = write(tmp_path / "ref.csv", [record("base", "baseline", 0.1, 1000.0)])
    slow = write(tmp_path / "slow.csv", [record("base", "baseline", 0.2, 1000.0)])
    fast = write(tmp_path / "fast.csv", [record("base", "baseline", 0.05, 1000.0)])
    assert any(d.regression and d.column == "latency_s" for d in compare(slow, ref))
    assert not any(d.regression for d in compare(fast, ref))
    assert "REGRESSION" in render(compare(slow, ref), only_changes=True)


def test_flops_drift_and_missing_or_failed_rows(tmp_path):
    ref = write(tmp_path / "ref.csv", [record("base", "baseline", 0.1, 1000.0),
                                       record("dc", "deepcache", 0.1, 500.0)])
    new = write(tmp_path / "new.csv", [record("base", "baseline", 0.1, 1001.0),
                                       record("dc", "deepcache", None, None, status="error")])
    bad = {(d.column) for d in compare(new, ref) if d.regression}
    assert bad == {"flops_per_image", "status"}
    gone = write(tmp_path / "gone.csv", [record("base", "baseline", 0.1, 1000.0)])
    assert [d.column for d in compare(gone, ref) if d.regression] == ["row"]


def test_tolerance_directions():
    assert Tolerance("lower", rel=0.1).regressed(1.2, 1.0)
    assert not Tolerance("lower", rel=0.1).regressed(1.05, 1.0)
    assert Tolerance("higher", rel=0.1).regressed(0.8, 1.0)
    band = Tolerance("both", abs=0.5)
    assert band.regressed(1.6, 1.0) and not band.regressed(0.6, 1.0)


def test_parse_tolerances():
    tols = parse_tolerances({"latency_s": "0.5", "clip_score": "both:0:1.5"})
    assert tols["latency_s"] == Tolerance("lower", 0.5, 0.0)
    assert tols["clip_score"] == Tolerance("both", 0.0, 1.5)
    with pytest.raises(DiffbenchError, match="tolerance"):
        parse_tolerances({"latency_s": "fast"})
