"""The cell store: atomic checked writes, records validated on read, damaged files detected."""

import json
import os
import stat

import numpy as np
import pytest

from harness.errors import DiffbenchError
from harness.run.config import Cell
from harness.run.store import CellStore, images_digest, record_problem

IMAGES = np.arange(2 * 4 * 4 * 3, dtype=np.uint8).reshape(2, 4, 4, 3)


def make_cell(seed=0, n_images=2):
    return Cell(model="tiny-sd", weights="none", method="baseline", params="{}",
                prompts="shapes", n_images=n_images, steps=2, guidance=5.0, resolution=4,
                seed=seed, dtype="float32", device="cpu", batch_size=2)


def make_record(cell, status="ok", images=IMAGES):
    return {"key": cell.key, "baseline_key": cell.baseline_key, "cell": cell.identity(),
            "status": status, "error": "", "metrics": {},
            "images_sha": images_digest(images) if status == "ok" else ""}


def finished_cell(store, seed=0):
    cell = make_cell(seed)
    store.save_images(cell.key, IMAGES)
    store.write(make_record(cell))
    return cell


def test_write_is_atomic_readable_and_leaves_no_partial_file(tmp_path):
    store = CellStore(tmp_path)
    cell = finished_cell(store)
    assert store.read(cell.key)["status"] == "ok" and store.finished(cell.key)
    names = [p.name for d in (store.cells_dir, store.images_dir) for p in d.iterdir()]
    assert names == [f"{cell.key}.json", f"{cell.key}.npy"]


def test_result_files_get_the_users_umask(tmp_path):
    old = os.umask(0o022)
    try:
        cell = finished_cell(CellStore(tmp_path))
    finally:
        os.umask(old)
    for path in (tmp_path / "cells" / f"{cell.key}.json", tmp_path / "images" / f"{cell.key}.npy"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_error_records_are_not_finished(tmp_path):
    store = CellStore(tmp_path)
    cell = make_cell()
    store.write(make_record(cell, "error"))
    assert not store.finished(cell.key) and store.problem(cell.key) == "failed before"


@pytest.mark.parametrize("change, why", [
    (lambda r: [r], "not a JSON object"),
    (lambda r: {k: v for k, v in r.items() if k != "cell"}, "no cell field"),
    (lambda r: {**r, "status": "maybe"}, "not ok or error"),
    (lambda r: {**r, "metrics": []}, "not an object"),
    (lambda r: {**r, "cell": {**r["cell"], "colour": 1}}, "unknown or missing fields"),
    (lambda r: {**r, "cell": {**r["cell"], "seed": 7}}, "does not hash to its key"),
    (lambda r: {**r, "key": "0" * 12}, "is not its file name"),
])
def test_record_problems_are_named(change, why):
    cell = make_cell()
    assert why in record_problem(change(make_record(cell)), cell.key)
    assert record_problem(make_record(cell), cell.key) is None


def test_wrong_shaped_cell_file_is_skipped_not_a_crash(tmp_path, capsys):
    store = CellStore(tmp_path)
    good = finished_cell(store)
    bad = make_cell(seed=1)
    store.cells_dir.joinpath(f"{bad.key}.json").write_text(json.dumps({"key": bad.key, "x": 1}))
    assert [r["key"] for r in store.records()] == [good.key]
    assert "skipping damaged cell file" in capsys.readouterr().err
    assert not store.finished(bad.key) and "damaged" in store.problem(bad.key)
    assert list(store.damaged()) == [store.path(bad.key)]


def test_partial_and_legacy_temp_files_are_never_read_and_removed_on_lock(tmp_path, capsys):
    store = CellStore(tmp_path)
    cell = finished_cell(store)
    record = store.path(cell.key).read_text()
    leftovers = [store.cells_dir / f".{cell.key}.json.ab12cd34.partial",
                 store.cells_dir / ".tmp-x1y2.json", store.images_dir / f"{cell.key}.tmp.npy"]
    for path in leftovers:
        path.write_text(record)
    assert len(store.records()) == 1 and store.damaged() == {}
    with store.lock():
        pass
    assert not any(p.exists() for p in leftovers)
    assert "removed 3 half-written file(s)" in capsys.readouterr().err


@pytest.mark.parametrize("damage, why", [
    (lambda p: p.unlink(), "no images file"),
    (lambda p: p.write_bytes(p.read_bytes()[:60]), "unreadable"),
    (lambda p: np.save(p, IMAGES.astype(np.float32)), "not uint8"),
    (lambda p: np.save(p, IMAGES[:1]), "holds 1 images, not 2"),
    (lambda p: np.save(p, 255 - IMAGES), "does not match the digest"),
])
def test_damaged_images_are_detected(tmp_path, damage, why):
    store = CellStore(tmp_path)
    cell = finished_cell(store)
    damage(store.images_path(cell.key))
    assert why in store.problem(cell.key)
    with pytest.raises(DiffbenchError, match=why):
        store.load_images(cell.key)


def test_keys_from_file_contents_cannot_leave_the_folder(tmp_path):
    store = CellStore(tmp_path)
    for key in ("../../etc/x", "/abs", "ABCDEF012345", "abc"):
        with pytest.raises(DiffbenchError, match="not a cell key"):
            store.path(key)
        with pytest.raises(DiffbenchError, match="not a cell key"):
            store.images_path(key)
    record = make_record(make_cell())
    with pytest.raises(DiffbenchError, match="not a cell key"):
        store.write({**record, "key": "../x"})


def test_quarantine_keeps_the_file(tmp_path):
    store = CellStore(tmp_path)
    cell = finished_cell(store)
    moved = store.quarantine(store.path(cell.key), "test")
    assert moved.parent.name == "broken" and json.loads(moved.read_text())["key"] == cell.key
    assert store.records() == []


def test_second_lock_is_refused(tmp_path):
    store = CellStore(tmp_path)
    with store.lock():
        with pytest.raises(DiffbenchError, match="another diffbench run"):
            with CellStore(tmp_path).lock():
                pass
    with CellStore(tmp_path).lock():  # free again
        pass


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_folder_fails_before_work(tmp_path):
    tmp_path.chmod(0o500)
    try:
        with pytest.raises(DiffbenchError, match="not writable"):
            CellStore(tmp_path / "out").check_writable()
    finally:
        tmp_path.chmod(0o700)


def test_output_path_under_a_file_is_a_clear_error(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(DiffbenchError, match="not writable"):
        CellStore(tmp_path / "file" / "out").check_writable()


def test_records_sorted_and_schema_stamped(tmp_path):
    store = CellStore(tmp_path)
    cells = [finished_cell(store, seed) for seed in (3, 1, 2)]
    assert [r["key"] for r in store.records()] == sorted(c.key for c in cells)
    assert json.loads(store.path(cells[0].key).read_text())["schema"] == 1
