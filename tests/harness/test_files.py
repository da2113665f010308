"""Atomic writes with the user's umask; safe names; paths kept inside their folder."""

import errno
import os
import stat

import pytest

from harness.errors import DiffbenchError, WriteFailed
from harness.files import atomic_write, check_name, clean_partial, inside


@pytest.mark.parametrize("content", [b"bytes", "text", lambda fh: fh.write(b"writer")])
def test_atomic_write_forms_and_mode(tmp_path, content):
    old = os.umask(0o027)
    try:
        path = atomic_write(tmp_path / "sub" / "f", content)
    finally:
        os.umask(old)
    assert path.read_bytes() in (b"bytes", b"text", b"writer")
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert [p.name for p in path.parent.iterdir()] == ["f"]


def test_failed_write_keeps_the_old_file_and_leaves_no_partial(tmp_path):
    path = atomic_write(tmp_path / "f", "old")

    def full(fh):
        fh.write(b"new, half")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(WriteFailed, match=r"cannot write .*/f: No space left on device"):
        atomic_write(path, full)
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["f"]


def test_other_errors_also_leave_no_partial(tmp_path):
    def boom(fh):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(tmp_path / "f", boom)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["../x", "a/b", "/abs", "", ".hidden", "a..b", "x" * 129, 5])
def test_unsafe_names_are_refused(name):
    with pytest.raises(DiffbenchError, match="not a safe name"):
        check_name(name, "suite name")


def test_inside_keeps_paths_in_their_folder(tmp_path):
    assert inside(tmp_path, "ok-1.2", "name") == tmp_path / "ok-1.2"
    (tmp_path / "link").symlink_to("/")
    with pytest.raises(DiffbenchError, match="points outside"):
        inside(tmp_path, "link", "name")


def test_clean_partial_removes_only_leftovers(tmp_path):
    for name in (".a.json.1234.partial", ".tmp-x.json", "k.tmp.npy", "k.npy", "k.json"):
        (tmp_path / name).write_text("")
    assert clean_partial(tmp_path, tmp_path / "missing") == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k.json", "k.npy"]
