"""Text from JSON Lines shards (.jsonl / .jsonl.gz), streamed: what the vocab and pack stages
read from a corpus/ folder."""

from __future__ import annotations

import gzip
import json
import logging
from pathlib import Path
from typing import Iterable, Iterator

logger = logging.getLogger(__name__)


def shard_files(folder: str | Path, pattern: str = "**/*.jsonl*") -> list[Path]:
    """The JSON Lines shards under `folder`, sorted (a stable reading order)."""
    return sorted(p for p in Path(folder).glob(pattern)
                  if p.is_file() and p.name.endswith((".jsonl", ".jsonl.gz")))


def _open(path: Path):
    if path.name.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def iter_records(files: Iterable[str | Path]) -> Iterator[dict]:
    """Every JSON object of the files, in order; malformed lines are skipped (and logged)."""
    for f in files:
        path = Path(f)
        bad = 0
        with _open(path) as fh:
            for line in fh:
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except ValueError:
                    bad += 1
                    continue
                if isinstance(rec, dict):
                    yield rec
                else:
                    bad += 1
        if bad:
            logger.warning("%s: skipped %d malformed lines", path, bad)


def iter_texts(files: Iterable[str | Path], text_field: str = "text") -> Iterator[str]:
    """The non-empty `text_field` strings of the files, in order."""
    for rec in iter_records(files):
        t = rec.get(text_field)
        if isinstance(t, str) and t:
            yield t
