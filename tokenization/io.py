"""Text from JSON Lines shards (.jsonl / .jsonl.gz), streamed: what the vocab and pack stages
read from a corpus/ folder; and user-given input files (JSON Lines or plain text) of the
`factory vocab` commands."""

from __future__ import annotations

import gzip
import json
import logging
from pathlib import Path
from typing import Iterable, Iterator

from factory.stage import UserError

logger = logging.getLogger(__name__)

# What a transformers tokenizer folder may hold.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.txt", "vocab.json", "merges.txt", "tokenizer.model",
                   "spiece.model", "sentencepiece.bpe.model", "added_tokens.json")


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


def batched(texts: Iterable[str], n: int, stats: dict | None = None) -> Iterator[list[str]]:
    """Lists of up to `n` non-empty texts, in order; `stats["docs"]` counts them if given."""
    batch: list[str] = []
    for t in texts:
        if not t:
            continue
        if stats is not None:
            stats["docs"] += 1
        batch.append(t)
        if len(batch) >= n:
            yield batch
            batch = []
    if batch:
        yield batch


def read_texts(path: str | Path, text_field: str = "text") -> Iterator[str]:
    """The texts of a JSON Lines file (.jsonl[.gz], field `text_field`) or of a plain text
    file (.txt[.gz] or anything else: one text per line). Raises UserError on non-UTF-8."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{p}: no such input file")
    opener = gzip.open if p.name.endswith(".gz") else open
    jsonl = p.name.endswith((".jsonl", ".jsonl.gz", ".json", ".json.gz"))
    n = 0
    try:
        with opener(p, "rt", encoding="utf-8") as fh:
            for n, line in enumerate(fh, 1):
                if jsonl:
                    if not line.strip():
                        continue
                    try:
                        rec = json.loads(line)
                    except ValueError:
                        raise UserError(f"{p}:{n}: not a JSON object (a .jsonl file has one "
                                        "JSON object per line)") from None
                    t = rec.get(text_field) if isinstance(rec, dict) else None
                    if isinstance(t, str) and t:
                        yield t
                else:
                    t = line.rstrip("\n")
                    if t.strip():
                        yield t
    except UnicodeDecodeError as e:
        raise UserError(f"{p}: not UTF-8 text (line {n + 1}, byte {e.start}); convert it "
                        "with iconv or give a UTF-8 file") from None
    except (OSError, EOFError) as e:
        raise UserError(f"{p}: cannot read ({e.__class__.__name__}: {e})") from None
