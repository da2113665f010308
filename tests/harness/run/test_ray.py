"""Sharding invariance: 1 shard and N shards (in process, or as local Ray tasks) give the same
images and the same metric values; metric states merge exactly."""

import json

import numpy as np
import pytest

from harness.run import cell as phases
from harness.run import job
from harness.run.config import load_suite
from harness.run.leaderboard import read_csv
from harness.run.store import CellStore

SUITE = """
name = "shards"
[defaults]
model = "{model}"
n_images = 6
steps = 4
batch_size = 2
device = "cpu"
[timing]
min_rounds = 2
max_rounds = 2
calls = 1
warmup = 0
flops = "off"
[[methods]]
name = "baseline"
[[methods]]
name = "deepcache"
params = {{ interval = 2 }}
"""
# Timing, memory and environment columns are measurements; everything else must agree.
QUALITY = ("images_sha", "fd_clip", "fd_clip_ci_lo", "fd_clip_ci_hi", "clip_score",
           "clip_score_ci_lo", "clip_score_ci_hi", "nsfw_ratio", "psnr", "psnr_ci_lo", "ssim",
           "status", "n_images")


def run_rows(tmp_path, name, model="mini-sd", **kwargs):
    path = tmp_path / f"{model}.toml"
    path.write_text(SUITE.format(model=model))
    csv_path = job.run(load_suite(path), tmp_path / name, progress=False, **kwargs)
    return {r["method"]: r for r in read_csv(csv_path)}, CellStore(tmp_path / name)


@pytest.fixture(scope="module")
def one_shard(tmp_path_factory):
    return run_rows(tmp_path_factory.mktemp("one"), "one")


def assert_same_quality(a, b):
    assert a.keys() == b.keys()
    for method in a:
        assert a[method]["status"] == "ok", a[method]["error"]
        assert b[method]["status"] == "ok", b[method]["error"]
        for col in QUALITY:
            assert a[method].get(col) == b[method].get(col), (method, col)


def test_shard_batches_are_contiguous_and_balanced():
    batches = list(range(5))
    assert phases.shard_batches(batches, 2) == [[0, 1], [2, 3, 4]]
    assert phases.shard_batches(batches, 1) == [batches]
    assert phases.shard_batches(batches, 9) == [[b] for b in batches]  # never empty shards


def test_in_process_shards_give_identical_rows(one_shard, tmp_path):
    rows1, store1 = one_shard
    rows3, store3 = run_rows(tmp_path, "three", shards=3)
    assert_same_quality(rows1, rows3)
    assert rows1["baseline"]["fd_clip"] != ""  # a real value was compared
    for key in [r["config_hash"] for r in rows1.values()]:
        assert np.array_equal(store1.load_images(key), store3.load_images(key))
    record = json.loads(store3.path(rows3["deepcache"]["config_hash"]).read_text())
    assert record["shards"] == 3


def test_ray_shards_give_identical_rows(one_shard, tmp_path, monkeypatch):
    ray = pytest.importorskip("ray", reason="Ray not installed (pip install 'diffbench[ray]')")
    from harness.run import ray as ray_backend

    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    ray_backend.init_ray(num_cpus=2)
    try:
        rows, _ = run_rows(tmp_path, "ray", backend="ray", shards=2)
    finally:
        ray.shutdown()
    assert_same_quality(one_shard[0], rows)


def test_unknown_backend_is_refused(tmp_path):
    from harness.errors import DiffbenchError

    with pytest.raises(DiffbenchError, match="unknown backend 'slurm'"):
        run_rows(tmp_path, "x", model="tiny-sd", backend="slurm")


def test_a_failed_shard_keeps_the_worker_traceback(tmp_path, monkeypatch):
    """A shard that raises in a worker becomes an error row whose cell JSON holds the worker's
    traceback (the exception crosses processes without its frames, as a note)."""
    import pickle

    from harness.run import ray as ray_backend

    def broken(*args, **kwargs):
        raise RuntimeError("shard exploded\nsecond line")

    monkeypatch.setattr(phases, "measure_shard", broken)
    path = tmp_path / "suite.toml"
    path.write_text(SUITE.format(model="tiny-sd"))
    config = load_suite(path)
    cell = config.cells[0]
    out = ray_backend.shard_task(cell, config, str(tmp_path), 0, 1)
    out = pickle.loads(pickle.dumps(out))  # as Ray returns it
    record = ray_backend._join(cell, config, CellStore(tmp_path), [out])
    assert record["status"] == "error"
    assert record["error"] == "RuntimeError: shard exploded"
    assert "in the Ray worker (shard 0)" in record["traceback"]
    assert "in broken" in record["traceback"]
