"""Cell results on disk: one JSON file and one images file per cell, written atomically, checked
when read (a damaged cell is recomputed, never trusted); a lock per output folder."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import re
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from harness.errors import DiffbenchError
from harness.files import PARTIAL, atomic_write, clean_partial, file_mode
from harness.run.config import Cell

SCHEMA = 1
KEY = re.compile(r"[0-9a-f]{12}")  # Cell.key: 12 hex digits of a sha256
STATUSES = ("ok", "error")


def check_key(key: Any) -> str:
    """A cell key, the only name a cell's files may have; anything else is refused."""
    if not isinstance(key, str) or not KEY.fullmatch(key):
        raise DiffbenchError(f"{key!r} is not a cell key (12 hex digits)")
    return key


def images_digest(images: Any) -> str:
    """sha256 of the uint8 images' bytes (16 hex digits): equal digests, identical images."""
    import numpy as np

    return hashlib.sha256(np.ascontiguousarray(images).tobytes()).hexdigest()[:16]


def record_problem(record: Any, key: str) -> str | None:
    """Why `record` is not a cell record for `key`, or None: its shape, its key, and its cell
    identity, which must hash to that key (so a file's contents cannot name another cell)."""
    if not isinstance(record, dict):
        return "not a JSON object"
    missing = [k for k in ("key", "status", "cell", "metrics") if k not in record]
    if missing:
        return f"no {', '.join(missing)} field"
    if record["key"] != key:
        return f"its key {record['key']!r} is not its file name"
    if record["status"] not in STATUSES:
        return f"status {record['status']!r} is not ok or error"
    if not isinstance(record["cell"], dict) or not isinstance(record["metrics"], dict):
        return "its cell or metrics field is not an object"
    try:
        identity = Cell(**record["cell"]).key
    except (TypeError, ValueError):
        return "its cell identity has unknown or missing fields"
    if identity != key:
        return "its cell identity does not hash to its key"
    return None


class CellStore:
    """`<out>/cells/<key>.json` and `<out>/images/<key>.npy` per cell; finished cells (a valid
    ok record whose images match its digest) are skipped when a run resumes."""

    def __init__(self, out_dir: str | Path):
        self.out_dir = Path(out_dir)
        self.cells_dir = self.out_dir / "cells"
        self.images_dir = self.out_dir / "images"
        self.broken_dir = self.out_dir / "broken"

    def check_writable(self) -> None:
        """Fail before any work when the output folder cannot be written."""
        probe = self.cells_dir / f".probe{PARTIAL}"
        try:
            self.cells_dir.mkdir(parents=True, exist_ok=True)
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise DiffbenchError(f"output folder {self.out_dir} is not writable: "
                                 f"{exc.strerror or exc}") from None

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Refuse a second run writing into the same folder at the same time; once held, remove
        what a killed run left half-written."""
        self.check_writable()
        with open(self.out_dir / ".lock", "w") as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise DiffbenchError(f"another diffbench run is writing to {self.out_dir}; "
                                     "wait for it or use another --out") from None
            try:
                removed = clean_partial(self.out_dir, self.cells_dir, self.images_dir)
                if removed:
                    print(f"diffbench: removed {removed} half-written file(s) of an interrupted "
                          "run", file=sys.stderr)
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def path(self, key: str) -> Path:
        return self.cells_dir / f"{check_key(key)}.json"

    def images_path(self, key: str) -> Path:
        return self.images_dir / f"{check_key(key)}.npy"

    def write(self, record: dict[str, Any]) -> Path:
        """Atomic write of a checked record: a killed run never leaves half a file."""
        problem = record_problem(record, check_key(record.get("key")))
        if problem:
            raise DiffbenchError(f"refusing to write cell {record.get('key')}: {problem}")
        text = json.dumps({"schema": SCHEMA, **record}, indent=2, sort_keys=True) + "\n"
        return atomic_write(self.path(record["key"]), text)

    def save_images(self, key: str, images: Any) -> Path:
        """Cache a cell's uint8 images so metrics can be recomputed without generating again."""
        import numpy as np

        array = np.asarray(images)
        return atomic_write(self.images_path(key), lambda fh: np.save(fh, array))

    def images_problem(self, key: str, n_images: int | None = None,
                       digest: str | None = None) -> str | None:
        """Why the cell's images file is unusable (absent, unreadable, not N x H x W x 3 uint8,
        another count than `n_images`, another digest than `digest`), or None."""
        import numpy as np

        path = self.images_path(key)
        if not path.is_file():
            return f"no images file {path}"
        try:
            images = np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError, EOFError) as exc:
            return f"images file {path} is unreadable ({str(exc).splitlines()[0][:80]})"
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            return (f"images file {path} holds {images.dtype} {images.shape}, not uint8 "
                    "N x H x W x 3")
        if n_images is not None and len(images) != n_images:
            return f"images file {path} holds {len(images)} images, not {n_images}"
        if digest and images_digest(images) != digest:
            return f"images file {path} does not match the digest in its cell record"
        return None

    def load_images(self, key: str) -> Any:
        """A cell's cached images (uint8 N x H x W x 3), checked against its record's digest."""
        import numpy as np

        record = self.read(key) or {"cell": {}}
        problem = self.images_problem(key, record["cell"].get("n_images"),
                                      record.get("images_sha"))
        if problem:
            raise DiffbenchError(f"cell {key}: {problem}")
        return np.load(self.images_path(key), allow_pickle=False)

    def _load(self, path: Path) -> tuple[dict[str, Any] | None, str | None]:
        """(record, None) for a valid cell file, else (None, why not)."""
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:  # UnicodeDecodeError is a ValueError
            return None, f"unreadable ({type(exc).__name__})"
        problem = record_problem(record, path.stem)
        return (None, problem) if problem else (record, None)

    def read(self, key: str) -> dict[str, Any] | None:
        """The cell's record, or None if absent or damaged (then it is recomputed)."""
        path = self.path(key)
        return self._load(path)[0] if path.exists() else None

    def problem(self, key: str) -> str | None:
        """Why cell `key` must be (re)computed: no file, a damaged file, an error row, damaged
        images; None when it is finished."""
        path = self.path(key)
        if not path.exists():
            return "not run yet"
        record, problem = self._load(path)
        if record is None:
            return f"cell file {path} is damaged: {problem}"
        if record["status"] != "ok":
            return "failed before"
        return self.images_problem(key, record["cell"].get("n_images"),
                                   record.get("images_sha"))

    def finished(self, key: str) -> bool:
        return self.problem(key) is None

    def cell_files(self) -> list[Path]:
        """Files under cells/ named like a cell (`<key>.json`): what readers look at."""
        if not self.cells_dir.is_dir():
            return []
        return sorted(p for p in self.cells_dir.glob("*.json") if KEY.fullmatch(p.stem))

    def damaged(self) -> dict[Path, str]:
        """Cell files that are not valid records, with the reason."""
        found = {p: self._load(p)[1] for p in self.cell_files()}
        return {p: why for p, why in found.items() if why is not None}

    def quarantine(self, path: Path, reason: str) -> Path:
        """Move a damaged file out of the readers' way into `<out>/broken/` (kept, not deleted)."""
        self.broken_dir.mkdir(exist_ok=True)
        target = self.broken_dir / path.name
        shutil.move(str(path), target)
        with contextlib.suppress(OSError):
            target.chmod(file_mode())
        print(f"diffbench: moved damaged {path} to {target} ({reason})", file=sys.stderr)
        return target

    def records(self) -> list[dict[str, Any]]:
        """Every valid cell record in the folder, by key; damaged files are named, not used."""
        out = []
        for path in self.cell_files():
            record, problem = self._load(path)
            if record is None:
                print(f"diffbench: skipping damaged cell file {path}: {problem} (a run of its "
                      "grid recomputes it)", file=sys.stderr)
            else:
                out.append(record)
        return out
