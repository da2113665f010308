"""End to end on tiny-sd: CSV columns filled, determinism, resume, failures become rows."""

import csv
import dataclasses
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from harness.run import cell as phases
from harness.run import job, local
from harness.run.config import load_suite
from harness.run.generate import to_uint8
from harness.run.leaderboard import MEASURED, read_csv
from harness.run.store import CellStore

SUITE = """
name = "t"
[defaults]
model = "tiny-sd"
n_images = 2
steps = 6
batch_size = 2
device = "cpu"
[timing]
min_rounds = 2
max_rounds = 2
calls = 1
warmup = 0
[[methods]]
name = "baseline"
[[methods]]
name = "deepcache"
params = { interval = 3 }
[[methods]]
name = "solver"
params = { scheduler = "dpmpp", steps = 4 }
"""


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    path = tmp_path_factory.mktemp("suite") / "t.toml"
    path.write_text(SUITE)
    return path


@pytest.fixture(scope="module")
def first_run(suite, tmp_path_factory):
    out = tmp_path_factory.mktemp("run1")
    return job.run(load_suite(suite), out, progress=False)


def test_csv_has_rows_with_performance_columns(first_run):
    rows = {r["method"]: r for r in read_csv(first_run)}
    assert set(rows) == {"baseline", "deepcache", "solver"}
    for r in rows.values():
        assert r["status"] == "ok", r["error"]
        for col in ("latency_s", "images_per_s", "peak_mem_mb", "flops_per_image",
                    "t_denoise_s", "speedup", "speedup_ci_lo", "speedup_ci_hi", "rounds",
                    "timing_stop", "threads", "cpu_s_per_image", "step_ms", "flops_ratio",
                    "device_name", "torch"):
            assert r[col] != "", (r["method"], col)
        assert float(r["speedup_ci_lo"]) <= float(r["speedup"]) <= float(r["speedup_ci_hi"])
        assert r["rounds"] == "2" and r["compile"] == "off"
        assert r["timing_stop"] in ("converged", "max_rounds")
    assert rows["baseline"]["flops_ratio"] == "1.0000"  # its speedup: an A/A test of the noise
    assert float(rows["deepcache"]["flops_ratio"]) < 0.9
    assert rows["solver"]["steps"] == "4" and float(rows["solver"]["flops_ratio"]) < 0.75
    assert rows["baseline"]["images_sha"] != rows["deepcache"]["images_sha"]


def test_two_runs_give_identical_non_timing_columns(suite, first_run, tmp_path):
    second = job.run(load_suite(suite), tmp_path, progress=False)
    a, b = read_csv(first_run), read_csv(second)
    assert [list(r) for r in a] == [list(r) for r in b]
    for ra, rb in zip(a, b):
        for col in ra:
            if col not in MEASURED:
                assert ra[col] == rb[col], col


def test_resume_skips_finished_cells(suite, tmp_path, monkeypatch):
    config = load_suite(suite)
    job.run(config, tmp_path, progress=False)
    store = CellStore(tmp_path)
    victim = config.cells[1].key
    store.path(victim).unlink()
    computed = []
    real = local.run_cell
    monkeypatch.setattr(local, "run_cell",
                        lambda cell, *a: computed.append(cell.key) or real(cell, *a))
    job.run(config, tmp_path, progress=False)
    assert computed == [victim]
    assert len(read_csv(tmp_path / "leaderboard.csv")) == 3


def test_cells_of_an_earlier_grid_are_named_on_stderr(suite, first_run, tmp_path, capsys):
    """A smaller grid run into a folder with more cells says their rows stay."""
    import shutil

    shutil.copytree(first_run.parent, tmp_path / "run", dirs_exist_ok=True)
    config = load_suite(suite)
    smaller = dataclasses.replace(config, cells=config.cells[:1])
    job.run(smaller, tmp_path / "run", progress=False)
    err = capsys.readouterr().err
    assert "2 cell(s) in" in err and "are not in this grid" in err
    assert len(read_csv(tmp_path / "run" / "leaderboard.csv")) == 3


def test_failing_cell_becomes_error_row_and_grid_goes_on(suite, tmp_path, monkeypatch):
    real = phases.phase_images

    def flaky(run):
        if run.cell.method == "deepcache":
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(run)

    monkeypatch.setattr(phases, "phase_images", flaky)
    rows = {r["method"]: r for r in read_csv(job.run(load_suite(suite), tmp_path,
                                                        progress=False))}
    assert rows["deepcache"]["status"] == "error"
    assert "out of memory" in rows["deepcache"]["error"]
    assert "\n" not in rows["deepcache"]["error"] and "traceback" not in rows["deepcache"]
    record = CellStore(tmp_path).read(rows["deepcache"]["config_hash"])
    assert record["traceback"].startswith("Traceback (most recent call last)")
    assert "in flaky" in record["traceback"] and "out of memory" in record["traceback"]
    assert rows["solver"]["status"] == "ok" and rows["baseline"]["status"] == "ok"
    monkeypatch.setattr(phases, "phase_images", real)  # a re-run retries the failed cell
    rows = {r["method"]: r for r in read_csv(job.run(load_suite(suite), tmp_path,
                                                        progress=False))}
    assert rows["deepcache"]["status"] == "ok"


def test_nan_images_are_an_error():
    with pytest.raises(FloatingPointError, match="NaN"):
        to_uint8(torch.full((1, 3, 2, 2), float("nan")))


def test_images_do_not_depend_on_batch_size(suite, tmp_path):
    """Same seeds per image whatever the batching: equal up to float rounding of batched
    kernels (at most one uint8 level on a few pixels), bit-identical for equal batch sizes."""
    images = {}
    for bs in (1, 2):
        config = load_suite(suite, {"batch_size": bs}, [{"name": "baseline"}])
        job.run(config, tmp_path / str(bs), progress=False)
        images[bs] = CellStore(tmp_path / str(bs)).load_images(config.cells[0].key)
    diff = np.abs(images[1].astype(int) - images[2].astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3


def test_killed_run_resumes_without_recomputing(suite, tmp_path):
    """SIGKILL a CLI run after its first cell lands; the re-run computes only the rest."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[3])}
    cmd = [sys.executable, "-m", "harness", "run", "--suite", str(suite), "--out",
           str(tmp_path), "--no-progress", "--timing", "min_rounds=3,max_rounds=3"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    cells = tmp_path / "cells"
    deadline = time.time() + 120
    while time.time() < deadline and not list(cells.glob("*.json")):
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = {p.name: p.stat().st_mtime_ns for p in cells.glob("*.json")}
    assert 1 <= len(finished) < 3, "kill landed too late to test resuming"
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "resuming" in out.stderr
    for name, mtime in finished.items():
        assert (cells / name).stat().st_mtime_ns == mtime  # not recomputed
    with open(tmp_path / "leaderboard.csv") as fh:
        assert [r["status"] for r in csv.DictReader(fh)] == ["ok"] * 3


def test_training_method_row_reports_train_seconds_also_when_loaded(tmp_path, monkeypatch):
    """`train_s` is the prepare time of the run that trained the artifact; a second run loads
    the artifact (no retraining) and reports the same seconds."""
    monkeypatch.setenv("DIFFBENCH_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "train.toml"
    path.write_text(SUITE.split("[[methods]]")[0] + """[[methods]]
name = "baseline"
[[methods]]
name = "ase"
params = { drop_max = 1, steps = 2, batch_size = 2, data_size = 2, data_steps = 1 }
""")
    first = {r["method"]: r for r in read_csv(job.run(load_suite(path), tmp_path / "a",
                                                          progress=False))}
    assert first["baseline"]["train_s"] == "" and float(first["ase"]["train_s"]) > 0
    assert len(list((tmp_path / "cache" / "prepared").glob("ase-*.safetensors"))) == 1
    again = {r["method"]: r for r in read_csv(job.run(load_suite(path), tmp_path / "b",
                                                          progress=False))}
    assert again["ase"]["train_s"] == first["ase"]["train_s"]
    assert again["ase"]["images_sha"] == first["ase"]["images_sha"]


def test_method_note_and_counters_reach_the_row(tmp_path):
    """A method's `method_note` joins the row's note (random weights: the fixed schedule said)
    and its stats become columns counted over the cell's images only."""
    path = tmp_path / "dit.toml"
    path.write_text(SUITE.replace('model = "tiny-sd"', 'model = "tiny-dit"').split(
        "[[methods]]")[0] + """[[methods]]
name = "fbcache"
params = { threshold = 0.08, rate = 0.5 }
""")
    row, = read_csv(job.run(load_suite(path), tmp_path / "run", progress=False))
    assert row["status"] == "ok", row["error"]
    assert row["note"] == ("toy model: quality not meaningful; fixed schedule: 0.5 of the steps "
                           "skipped, not the threshold's decision")
    # one batch of 2 images, 6 steps: 6 calls, steps 1 and 3 skip (fixed_rate_computes)
    assert (row["cache_calls"], row["cache_skips"]) == ("6", "2")
