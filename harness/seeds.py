"""How seeds are derived: image i of a cell gets its own seed, whatever the batching."""

from __future__ import annotations

import hashlib


def image_seed(base_seed: int, index: int) -> int:
    """Seed of image `index` of a cell: a hash of (base seed, prompt index), 31 bits."""
    digest = hashlib.sha256(f"diffbench:{base_seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF
