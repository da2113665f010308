"""Where diffbench keeps what it computes once (prepared weights, reference statistics)."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "DIFFBENCH_CACHE"


def cache_root() -> Path:
    """`$DIFFBENCH_CACHE`, else `~/.cache/diffbench`; each user of it takes a subfolder."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "diffbench")
