"""Files diffbench writes: atomic, with the user's umask; safe names; paths kept in their folder."""

from __future__ import annotations

import contextlib
import os
import re
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import IO

from harness.errors import DiffbenchError, WriteFailed

# Names that become file or folder names (suite names, cell keys): no separators, no "..".
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}")
PARTIAL = ".partial"  # suffix of files being written; no reader globs it, `clean_partial` removes


def check_name(name: str, what: str) -> str:
    """`name` when it is safe as one path component, else a one-line error naming `what`."""
    if not isinstance(name, str) or not SAFE_NAME.fullmatch(name) or ".." in name:
        raise DiffbenchError(f"{what} {name!r} is not a safe name: use letters, digits and "
                             "._+- (no '/', no '..', at most 128 characters)")
    return name


def inside(folder: str | Path, name: str, what: str) -> Path:
    """folder / name, refused when it would leave `folder` (a name taken from file contents)."""
    folder = Path(folder)
    path = folder / check_name(name, what)
    if not path.resolve().is_relative_to(folder.resolve()):
        raise DiffbenchError(f"{what} {name!r} points outside {folder}")
    return path


def file_mode() -> int:
    """The mode a plain `open(path, 'w')` would give: 0o666 less the process umask."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write(path: str | Path, content: bytes | str | Callable[[IO[bytes]], None]) -> Path:
    """Write `content` (bytes, text, or a function writing to a binary file) to `path` via a
    `.partial` file in the same folder, fsync and rename: readers see the old file or the new
    one, never half of one. An OSError (disk full, read-only) removes the partial file and
    becomes `WriteFailed` naming the path."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}{PARTIAL}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, file_mode())
        with os.fdopen(fd, "wb") as fh:
            if callable(content):
                content(fh)
            else:
                fh.write(content.encode() if isinstance(content, str) else content)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise WriteFailed(path, exc) from None
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def clean_partial(*folders: Path) -> int:
    """Remove what killed writers left behind (`.partial` files; the `.tmp-*` / `*.tmp.npy`
    names of diffbench <= 0.1); how many."""
    removed = 0
    for folder in folders:
        if not folder.is_dir():
            continue
        for p in folder.iterdir():
            name = p.name
            if name.endswith(PARTIAL) or name.startswith(".tmp-") or name.endswith(".tmp.npy"):
                with contextlib.suppress(OSError):
                    p.unlink()
                    removed += 1
    return removed
