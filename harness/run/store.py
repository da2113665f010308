"""Cell results on disk: one JSON file per cell, written atomically; a lock per output folder."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from harness.errors import DiffbenchError

SCHEMA = 1


class CellStore:
    """`<out>/cells/<key>.json` per cell; finished cells are skipped when a run resumes."""

    def __init__(self, out_dir: str | Path):
        self.out_dir = Path(out_dir)
        self.cells_dir = self.out_dir / "cells"

    def check_writable(self) -> None:
        """Fail before any work when the output folder cannot be written."""
        try:
            self.cells_dir.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=self.cells_dir):
                pass
        except OSError as exc:
            raise DiffbenchError(f"output folder {self.out_dir} is not writable: "
                                 f"{exc.strerror or exc}") from None

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Refuse a second run writing into the same folder at the same time."""
        self.check_writable()
        with open(self.out_dir / ".lock", "w") as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise DiffbenchError(f"another diffbench run is writing to {self.out_dir}; "
                                     "wait for it or use another --out") from None
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def path(self, key: str) -> Path:
        return self.cells_dir / f"{key}.json"

    def write(self, record: dict[str, Any]) -> Path:
        """Atomic write (temp file + fsync + rename): a killed run never leaves half a file."""
        self.cells_dir.mkdir(parents=True, exist_ok=True)
        target = self.path(record["key"])
        fd, tmp = tempfile.mkstemp(dir=self.cells_dir, prefix=".tmp-", suffix=".json")
        try:
            with os.fdopen(fd, "w") as fh:
                json.dump({"schema": SCHEMA, **record}, fh, indent=2, sort_keys=True)
                fh.write("\n")
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        return target

    def images_path(self, key: str) -> Path:
        return self.out_dir / "images" / f"{key}.npy"

    def save_images(self, key: str, images: Any) -> Path:
        """Cache a cell's uint8 images so metrics can be recomputed without generating again."""
        import numpy as np

        path = self.images_path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npy")
        np.save(tmp, np.asarray(images))
        os.replace(tmp, path)
        return path

    def load_images(self, key: str) -> Any:
        """A cell's cached images (uint8 N x H x W x 3)."""
        import numpy as np

        path = self.images_path(key)
        if not path.exists():
            raise DiffbenchError(f"no cached images for cell {key} at {path}")
        return np.load(path)

    def read(self, key: str) -> dict[str, Any] | None:
        """The cell's record, or None if absent or unreadable (then it is recomputed)."""
        try:
            return json.loads(self.path(key).read_text())
        except (OSError, ValueError):
            return None

    def finished(self, key: str) -> bool:
        record = self.read(key)
        return record is not None and record.get("status") == "ok"

    def corrupt_keys(self) -> list[str]:
        """Keys of cell files that exist but cannot be read as JSON."""
        out = []
        for path in self.cells_dir.glob("*.json"):
            try:
                json.loads(path.read_text())
            except (OSError, ValueError):
                out.append(path.stem)
        return out

    def records(self) -> list[dict[str, Any]]:
        """Every readable cell record in the folder (corrupt files are reported, not used)."""
        out = []
        for path in sorted(self.cells_dir.glob("*.json")):
            try:
                out.append(json.loads(path.read_text()))
            except ValueError:
                print(f"diffbench: skipping corrupt cell file {path} (it is recomputed on run)",
                      file=sys.stderr)
        return out
