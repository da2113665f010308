import csv
import math

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


# --- measured intervals (speedup_ci_*, latency_ci_*) --------------------------------------

IDENT = {"model": "tiny-sd", "method": "deepcache", "params": "{}", "config_hash": "dc",
         "status": "ok", "error": ""}


def write_rows(path, *rows):
    """A leaderboard CSV from hand-made rows (the runner's interval columns included)."""
    cols = list(dict.fromkeys(c for r in rows for c in [*IDENT, *r]))
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, cols, restval="")
        writer.writeheader()
        writer.writerows({**IDENT, **r} for r in rows)
    return path


def by_column(diffs):
    return {d.column: d for d in diffs}


def test_real_ten_percent_speed_loss_with_tight_interval_fails(tmp_path):
    ref = write_rows(tmp_path / "ref.csv", {"speedup": "1.6000", "latency_s": "0.100000"})
    # 12 % slower, intervals tight (+-1 %): wholly beyond the 10 % band edge
    new = write_rows(tmp_path / "new.csv", {
        "speedup": "1.4080", "speedup_ci_lo": "1.3940", "speedup_ci_hi": "1.4220",
        "latency_s": "0.112000", "latency_ci_lo": "0.111000", "latency_ci_hi": "0.113000"})
    d = by_column(compare(new, ref))
    assert d["speedup"].regression and d["latency_s"].regression
    # an interval whose far end just reaches inside the band is not (yet) a regression
    edge = write_rows(tmp_path / "edge.csv", {
        "speedup": "1.4080", "speedup_ci_lo": "1.3900", "speedup_ci_hi": "1.4410",
        "latency_s": "0.112000", "latency_ci_lo": "0.109000", "latency_ci_hi": "0.113000"})
    d = by_column(compare(edge, ref))
    assert not d["speedup"].regression and not d["latency_s"].regression


def test_noisy_run_whose_interval_straddles_the_band_passes(tmp_path):
    ref = write_rows(tmp_path / "ref.csv", {"speedup": "1.6000", "latency_s": "0.100000"})
    # point values beyond the band (would fail on points), intervals reach back across it
    new = write_rows(tmp_path / "new.csv", {
        "speedup": "1.4000", "speedup_ci_lo": "1.1000", "speedup_ci_hi": "1.7000",
        "latency_s": "0.115000", "latency_ci_lo": "0.090000", "latency_ci_hi": "0.140000"})
    diffs = compare(new, ref)
    assert {"speedup", "latency_s"} <= set(by_column(diffs))
    assert not any(d.regression for d in diffs)


def test_missing_or_broken_interval_falls_back_to_point_comparison(tmp_path):
    ref = write_rows(tmp_path / "ref.csv", {"speedup": "1.6000", "latency_s": "0.100000"})
    wide = {"speedup_ci_lo": "1.1000", "speedup_ci_hi": "1.7000",
            "latency_ci_lo": "0.090000", "latency_ci_hi": "0.140000"}
    for name, extra in [("none", {}),
                        ("partial", {"speedup_ci_lo": "1.1000", "latency_ci_hi": "0.14"}),
                        ("empty", dict.fromkeys(wide, "")),
                        ("nan", dict.fromkeys(wide, "nan")),
                        ("inverted", {"speedup_ci_lo": "1.7", "speedup_ci_hi": "1.1",
                                      "latency_ci_lo": "0.14", "latency_ci_hi": "0.09"})]:
        new = write_rows(tmp_path / f"{name}.csv",
                         {"speedup": "1.4000", "latency_s": "0.115000", **extra})
        d = by_column(compare(new, ref))
        assert d["speedup"].regression and d["latency_s"].regression, name
        assert "[" not in d["speedup"].new, name
    fine = write_rows(tmp_path / "fine.csv", {"speedup": "1.5000", "latency_s": "0.105000"})
    assert not any(d.regression for d in compare(fine, ref))


def test_rendered_table_shows_the_interval(tmp_path):
    ref = write_rows(tmp_path / "ref.csv", {"speedup": "1.6000", "latency_s": "0.100000"})
    new = write_rows(tmp_path / "new.csv", {
        "speedup": "1.52", "speedup_ci_lo": "1.49", "speedup_ci_hi": "1.55",
        "latency_s": "0.102000", "latency_ci_lo": "0.101000", "latency_ci_hi": "0.104000"})
    text = render(compare(new, ref))
    assert "1.52 [1.49, 1.55]" in text and "0.102000 [0.101000, 0.104000]" in text
    assert "1.6000" in text and "-5.0%" in text


def test_images_per_s_takes_its_interval_from_the_latency_bounds(tmp_path):
    ref = write_rows(tmp_path / "ref.csv", {"images_per_s": "10.0000", "latency_s": "0.100000"})
    noisy = write_rows(tmp_path / "noisy.csv", {
        "images_per_s": "8.6957", "latency_s": "0.115000",
        "latency_ci_lo": "0.090000", "latency_ci_hi": "0.140000"})
    d = by_column(compare(noisy, ref))
    assert not d["images_per_s"].regression and not d["latency_s"].regression
    assert d["images_per_s"].new == "8.6957 [7.1429, 11.1111]"
    tight = write_rows(tmp_path / "tight.csv", {
        "images_per_s": "8.6957", "latency_s": "0.115000",
        "latency_ci_lo": "0.114000", "latency_ci_hi": "0.116000"})
    assert by_column(compare(tight, ref))["images_per_s"].regression
    for bad in ("0", "-0.1", ""):
        broken = write_rows(tmp_path / "broken.csv", {
            "images_per_s": "8.6957", "latency_ci_lo": bad, "latency_ci_hi": "0.140000"})
        d = by_column(compare(broken, ref))["images_per_s"]
        assert d.regression and d.new == "8.6957", bad


def test_interval_rule_on_the_tolerance_itself():
    higher, lower = Tolerance("higher", rel=0.1), Tolerance("lower", rel=0.1, abs=0.01)
    assert higher.regressed(0.8, 1.0, (0.79, 0.89)) and not higher.regressed(0.8, 1.0, (0.7, 0.91))
    assert lower.regressed(1.2, 1.0, (1.12, 1.3)) and not lower.regressed(1.2, 1.0, (1.1, 1.3))
    both = Tolerance("both", abs=0.5)
    assert both.regressed(2.0, 1.0, (1.6, 2.4)) and both.regressed(0.0, 1.0, (-0.5, 0.4))
    assert not both.regressed(2.0, 1.0, (1.4, 2.4))


# --- input checks ----------------------------------------------------------------------

@pytest.mark.parametrize("spec", ["nan", "inf", "-0.1", "lower:nan", "higher:0.1:-inf",
                                  "both:0:-1", "lower:1e999"])
def test_tolerance_values_must_be_finite_and_non_negative(spec):
    with pytest.raises(DiffbenchError, match=r"finite number >= 0") as err:
        parse_tolerances({"latency_s": spec})
    assert "\n" not in str(err.value) and "latency_s" in str(err.value)


@pytest.mark.parametrize("spec", ["fast", "sideways:0.1", "lower:0.1:0:9", "0.1:0.2", "lower:"])
def test_unparsable_tolerance_is_one_line(spec):
    with pytest.raises(DiffbenchError, match="must be REL or") as err:
        parse_tolerances({"latency_s": spec})
    assert "\n" not in str(err.value)


def test_unknown_tolerance_column_suggests_the_nearest():
    with pytest.raises(DiffbenchError, match="did you mean 'latency_s'") as err:
        parse_tolerances({"latncy_s": "0.2"})
    assert "unknown tolerance column 'latncy_s'" in str(err.value)
    assert "\n" not in str(err.value)
    with pytest.raises(DiffbenchError, match="unknown tolerance column 'zzz'") as err:
        parse_tolerances({"zzz": "0.2"})
    assert "did you mean" not in str(err.value)


def test_tolerance_rejects_bad_values_when_built_directly():
    for args in [("sideways",), ("lower", math.nan), ("higher", 0.1, -1.0)]:
        with pytest.raises(DiffbenchError):
            Tolerance(*args)


def test_nothing_compared_is_an_error_not_a_pass(tmp_path):
    new = write_rows(tmp_path / "new.csv", {"speedup": "1.5", "latency_s": "0.1"})
    empty = tmp_path / "empty.csv"
    empty.write_text(",".join(IDENT) + "\n")
    with pytest.raises(DiffbenchError, match="nothing was compared"):
        compare(new, empty)
    # rows match, but no tolerance column is a number in the reference
    blank = write_rows(tmp_path / "blank.csv", {"speedup": "", "latency_s": "n/a"})
    with pytest.raises(DiffbenchError, match="nothing was compared") as err:
        compare(new, blank)
    assert "\n" not in str(err.value)
    # no reference row in the new leaderboard at all: the wrong file, not a regression
    other = write_rows(tmp_path / "other.csv", {"config_hash": "x", "speedup": "1.5"})
    with pytest.raises(DiffbenchError, match="no row of reference .* is in"):
        compare(other, new)


def test_a_missing_row_is_a_regression(tmp_path):
    new = write_rows(tmp_path / "new.csv", {"speedup": "1.5"})
    ref = write_rows(tmp_path / "ref.csv", {"speedup": "1.5"},
                     {"config_hash": "gone", "speedup": "1.5"})
    assert [d.column for d in compare(new, ref) if d.regression] == ["row"]


@pytest.mark.parametrize("content", [b"\x89PNG\r\n\x1a\n\x00\x00garbage\xff",
                                     b"a,b,c\n1,2,3\n", b"", b"model,method\n"])
def test_a_file_that_is_no_leaderboard_is_one_line(tmp_path, content):
    new = write_rows(tmp_path / "new.csv", {"speedup": "1.5"})
    bad = tmp_path / "bad.csv"
    bad.write_bytes(content)
    for args in ((new, bad), (bad, new)):
        with pytest.raises(DiffbenchError) as err:
            compare(*args)
        assert "\n" not in str(err.value) and str(bad) in str(err.value)
