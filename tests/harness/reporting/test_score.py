"""`diffbench score`: quality metrics recomputed from cached images; cell JSON and CSV rebuilt."""

import dataclasses
import json

import numpy as np
import pytest

from harness.models import MODELS
from harness.reporting import score as sc
from harness.run.config import Cell
from harness.run.leaderboard import read_csv
from harness.run.store import CellStore


def make_cell(method="baseline", params="{}", weights="/models/sd"):
    return Cell(model="tiny-sd", weights=weights, method=method, params=params, prompts="shapes",
                n_images=4, steps=2, guidance=5.0, resolution=32, seed=0, dtype="float32",
                device="cpu", batch_size=4)


def write_run(tmp_path, weights="/models/sd"):
    store = CellStore(tmp_path)
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    for cell, images in ((make_cell(weights=weights), base),
                         (make_cell("deepcache", '{"interval":3}', weights), base // 2 + 10)):
        store.save_images(cell.key, images)
        store.write({"key": cell.key, "baseline_key": cell.baseline_key,
                     "cell": cell.identity(), "timing": {}, "environment": {}, "status": "ok",
                     "error": "", "metrics": {"latency_s": 0.5}, "effective_steps": 2,
                     "images_sha": "", "note": ""})
    return store


@pytest.fixture
def quality_tiny(monkeypatch):
    """Treat tiny-sd as a model with meaningful images, scored by a tiny random CLIP."""
    from metrics import clip_score
    from tests.metrics.test_clip_score import tiny_backend

    spec = dataclasses.replace(MODELS.get("tiny-sd"), has_quality=True)
    real_get = MODELS.get
    monkeypatch.setattr(MODELS, "get", lambda name: spec if name == "tiny-sd" else real_get(name))
    monkeypatch.setattr(clip_score, "load_backend", lambda context, metric: tiny_backend())


def test_score_fills_quality_columns_and_keeps_speed(tmp_path, quality_tiny):
    store = write_run(tmp_path)
    csv_path, failed, tried = sc.score(tmp_path, ("fidelity", "clip_score", "nsfw"))
    assert failed == [] and tried == 2
    rows = {r["method"]: r for r in read_csv(csv_path)}
    assert rows["baseline"]["psnr"] == ""  # the baseline has nothing to compare with
    assert float(rows["deepcache"]["psnr"]) > 0 and rows["deepcache"]["ssim_ci_lo"] != ""
    for r in rows.values():
        assert r["latency_s"] == "0.500000"  # speed columns untouched
        assert r["clip_model"] == "tiny-clip" and r["clip_score"] != ""
        assert r["nsfw_ratio"] == "0.0000"
        assert json.loads(r["nsfw_counts"])["FEET_EXPOSED"] == 0
    key = make_cell("deepcache", '{"interval":3}').key
    record = store.read(key)
    assert record["metrics"]["latency_s"] == 0.5 and "psnr" in record["metrics"]
    # recomputing gives the same CSV (deterministic, bootstrap seeded)
    first = csv_path.read_text()
    assert sc.score(tmp_path, ("fidelity", "clip_score", "nsfw"))[0].read_text() == first


def test_attacked_cells_get_attack_success_from_the_new_concept_ratio(tmp_path, monkeypatch):
    from harness.run import cell as run_cell

    store = CellStore(tmp_path)
    attacked = dataclasses.replace(make_cell(), attack="synonyms",
                                   attack_params='{"concept":"red"}')
    store.save_images(attacked.key, np.zeros((4, 32, 32, 3), dtype=np.uint8))
    record = {"key": attacked.key, "cell": attacked.identity(), "status": "ok",
              "metrics": {"attack_success": 0.9, "attack_s": 3.0}}
    ratio = {"concept_ratio": 0.25, "concept_ratio_ci_lo": 0.0, "concept_ratio_ci_hi": 0.75}
    monkeypatch.setattr(run_cell, "compute_metrics", lambda *args: dict(ratio))
    scored = sc.score_record(record, store, ("concept",))["metrics"]
    assert scored["attack_success"] == 0.25 and scored["attack_success_ci_hi"] == 0.75
    assert scored["attack_s"] == 3.0  # the attack's own columns stay
    plain = {**record, "key": make_cell().key, "cell": make_cell().identity()}
    store.save_images(plain["key"], np.zeros((4, 32, 32, 3), dtype=np.uint8))
    assert sc.score_record(plain, store, ("concept",))["metrics"]["attack_success"] == 0.9


def test_random_weight_cells_get_no_quality_columns(tmp_path, quality_tiny):
    write_run(tmp_path, weights="none")
    rows = read_csv(sc.score(tmp_path, ("fidelity", "clip_score"))[0])
    assert all("psnr" not in r and "clip_score" not in r for r in rows)


def test_cli_wiring_and_errors(tmp_path, quality_tiny):
    from harness.cli import main
    from harness.errors import DiffbenchError

    write_run(tmp_path)
    assert main(["score", str(tmp_path), "--metrics", "fidelity"]) == 0
    assert "psnr" in read_csv(tmp_path / "leaderboard.csv")[0]
    with pytest.raises(DiffbenchError):
        sc.score(tmp_path, ("no-such-metric",))
    with pytest.raises(DiffbenchError, match="not a diffbench run"):
        sc.score(tmp_path / "empty", ("fidelity",))


def test_damaged_images_are_a_failed_line_not_a_traceback(tmp_path, quality_tiny):
    store = write_run(tmp_path)
    key = make_cell("deepcache", '{"interval":3}').key
    store.images_path(key).write_bytes(b"\x93NUMPY garbage")
    path, failed, tried = sc.score(tmp_path, ("fidelity",))
    assert tried == 2 and len(failed) == 1 and failed[0].startswith(f"{key} tiny-sd deepcache")
    assert "unreadable" in failed[0] and path.exists()
