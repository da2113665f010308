"""Faults: a write failing at each point, damaged files of every kind, kills at random moments.
Nothing finished is lost, no half-written file stays, and the next run heals the folder."""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from harness.cli import main
from harness.run.leaderboard import read_csv
from harness.run.store import CellStore

SUITE = """
name = "faults"
metrics = ["latency", "fidelity"]
[defaults]
model = "tiny-sd"
n_images = 2
steps = 3
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
params = { interval = 2 }
"""


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    path = tmp_path_factory.mktemp("suite") / "faults.toml"
    path.write_text(SUITE)
    return path


def run(suite, out, *extra):
    return main(["run", "--suite", str(suite), "--out", str(out), "--no-progress", *extra])


@pytest.fixture(scope="module")
def finished(suite, tmp_path_factory):
    out = tmp_path_factory.mktemp("finished")
    assert run(suite, out) == 0
    return out


def leftovers(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.endswith(".partial") or ".tmp" in p.name]


def cell_times(out: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in (out / "cells").glob("*.json")}


class FailingReplace:
    """os.replace that raises ENOSPC on its n-th call into `root` (the commit of a write)."""

    def __init__(self, root: Path, n: int):
        self.root, self.n, self.calls, self.real = str(root), n, 0, os.replace

    def __call__(self, src, dst, *args, **kwargs):
        if str(dst).startswith(self.root):
            self.calls += 1
            if self.calls == self.n:
                raise OSError(errno.ENOSPC, "No space left on device")
        return self.real(src, dst, *args, **kwargs)


def test_a_write_failing_at_each_point_stops_cleanly_and_resumes(suite, tmp_path, monkeypatch,
                                                                 capsys):
    counter = FailingReplace(tmp_path / "count", 0)
    monkeypatch.setattr(os, "replace", counter)
    assert run(suite, tmp_path / "count") == 0
    writes = counter.calls  # per cell images, JSON, CSV; the final CSV
    assert writes >= 7
    for n in range(1, writes + 1):
        out = tmp_path / f"fail{n}"
        monkeypatch.setattr(os, "replace", FailingReplace(out, n))
        capsys.readouterr()
        assert run(suite, out) == 1, n
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith(f"diffbench: error: cannot write {out}") and \
            "No space left on device" in err[-1] and "cells are finished and kept" in err[-1]
        assert "Traceback" not in "\n".join(err)
        assert leftovers(out) == [], n
        before = cell_times(out)
        monkeypatch.setattr(os, "replace", FailingReplace(out, 0))
        assert run(suite, out) == 0, n
        assert {k: v for k, v in cell_times(out).items() if k in before} == before  # kept
        assert [r["status"] for r in read_csv(out / "leaderboard.csv")] == ["ok", "ok"]


DAMAGE = {
    "cell JSON cut short": lambda store, key: store.path(key).write_text('{"key": "'),
    "cell JSON of the wrong shape": lambda store, key: store.path(key).write_text(
        json.dumps({"key": key, "status": "ok"})),
    "cell JSON naming another cell": lambda store, key: store.path(key).write_text(
        json.dumps({**json.loads(store.path(key).read_text()), "key": "0" * 12})),
    "images cut short": lambda store, key: store.images_path(key).write_bytes(
        store.images_path(key).read_bytes()[:100]),
    "images changed": lambda store, key: np.save(store.images_path(key),
                                                 255 - np.load(store.images_path(key))),
    "images missing": lambda store, key: store.images_path(key).unlink(),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_the_next_run_heals_a_damaged_cell(suite, finished, tmp_path, damage, capsys):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    store = CellStore(out)
    rows = {r["method"]: r for r in read_csv(out / "leaderboard.csv")}
    victim, other = rows["deepcache"]["config_hash"], rows["baseline"]["config_hash"]
    DAMAGE[damage](store, victim)
    (out / "cells" / ".tmp-left.json").write_text("{}")  # a kill between fsync and rename
    kept = cell_times(out)[f"{other}.json"]
    capsys.readouterr()
    assert run(suite, out) == 0
    err = capsys.readouterr().err
    assert "damaged" in err or "no images file" in err
    assert cell_times(out)[f"{other}.json"] == kept  # the healthy cell is not recomputed
    healed = {r["method"]: r for r in read_csv(out / "leaderboard.csv")}
    assert [r["status"] for r in healed.values()] == ["ok", "ok"]
    assert healed["deepcache"]["images_sha"] == rows["deepcache"]["images_sha"]
    assert store.finished(victim) and leftovers(out) == []
    assert run(suite, out) == 0  # and the folder stays quiet afterwards
    assert "damaged" not in capsys.readouterr().err


def test_kills_at_random_moments_lose_nothing(suite, tmp_path):
    """SIGKILL the CLI at seeded random moments, a bounded number of times; every file left is
    whole, a finished cell is never recomputed, and the last run completes the grid."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[3])}
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "harness", "run", "--suite", str(suite), "--out", str(out),
           "--no-progress"]
    rng = random.Random(13)
    seen: dict[str, int] = {}
    for _ in range(3):
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(2.0, 12.0))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        store = CellStore(out)
        assert store.damaged() == {}  # every cell file there is whole
        now = cell_times(out)
        assert {k: now[k] for k in seen} == seen  # finished cells untouched
        seen = now
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert {k: v for k, v in cell_times(out).items() if k in seen} == seen
    assert [r["status"] for r in read_csv(out / "leaderboard.csv")] == ["ok", "ok"]
    assert leftovers(out) == []


def test_exit_codes_of_every_subcommand(tmp_path, finished, capsys):
    """0 when every cell is ok, 1 when some cell failed (one line each), 2 for bad input."""
    out = tmp_path / "mixed"
    args = ["run", "--model", "tiny-dit", "--method", "baseline", "--method", "deepcache",
            "--n-images", "2", "--steps", "2", "--device", "cpu", "--out", str(out),
            "--no-progress", "--timing", "min_rounds=2,max_rounds=2,calls=1,warmup=0"]
    assert main(args) == 1  # deepcache needs a UNet: its cell fails, the baseline's does not
    err = capsys.readouterr().err
    assert "diffbench: failed: " in err and "deepcache" in err and "1 of 2 cells failed" in err
    assert main(["leaderboard", str(out)]) == 1
    assert main(["report", str(out)]) == 1
    assert main(["score", str(out), "--metrics", "fidelity"]) == 0  # the ok cell rescored
    csv = str(out / "leaderboard.csv")
    assert main(["compare", csv, csv]) == 0
    ok = str(finished)
    for argv in (["leaderboard", ok], ["report", ok, "--out", str(tmp_path / "rep")],
                 ["score", ok, "--metrics", "fidelity"]):
        assert main(argv) == 0, argv
    assert main(["score", ok, "--metrics", "nosuch"]) == 2
