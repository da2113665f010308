import json
import os

import numpy as np
import pytest

from harness.errors import DiffbenchError
from harness.run.store import CellStore


def test_write_is_atomic_and_readable(tmp_path):
    store = CellStore(tmp_path)
    store.write({"key": "abc", "status": "ok"})
    assert store.read("abc")["status"] == "ok" and store.finished("abc")
    assert not any(p.name.startswith(".tmp-") for p in store.cells_dir.iterdir())


def test_error_records_are_not_finished(tmp_path):
    store = CellStore(tmp_path)
    store.write({"key": "k", "status": "error"})
    assert not store.finished("k")


def test_corrupt_file_is_reported_and_not_finished(tmp_path, capsys):
    store = CellStore(tmp_path)
    store.cells_dir.mkdir(parents=True)
    store.path("bad").write_text('{"key": "bad", "sta')
    assert store.read("bad") is None and not store.finished("bad")
    assert store.records() == []
    assert "corrupt cell file" in capsys.readouterr().err


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


def test_images_round_trip(tmp_path):
    store = CellStore(tmp_path)
    images = np.arange(2 * 4 * 4 * 3, dtype=np.uint8).reshape(2, 4, 4, 3)
    store.save_images("k", images)
    assert np.array_equal(store.load_images("k"), images)
    with pytest.raises(DiffbenchError, match="no cached images"):
        store.load_images("missing")


def test_records_sorted_and_schema_stamped(tmp_path):
    store = CellStore(tmp_path)
    for key in ("b", "a"):
        store.write({"key": key, "status": "ok"})
    assert [r["key"] for r in store.records()] == ["a", "b"]
    assert json.loads(store.path("a").read_text())["schema"] == 1
