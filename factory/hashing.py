"""Content fingerprints for cache keys: one changed byte in an input changes its stage's key."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path


def file_digest(files: Iterable[Path]) -> str:
    """sha256 over each file's name and bytes, in the order given (streamed, any size)."""
    h = hashlib.sha256()
    for f in files:
        h.update(Path(f).name.encode() + b"\0")
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()
