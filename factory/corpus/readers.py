"""The corpus readers: JSON Lines (.gz/.zst), Parquet, plain text, Hugging Face datasets.

Each reads one source, names it in the `source` field and counts `read:<source>:in/out/
dropped_<why>`. Bad records (invalid UTF-8, invalid JSON, no text field) are skipped, counted
and, up to CORRUPT_LIMIT per task, noted with file and line in `<corrupt_dir>/<source>.<rank>
.jsonl` for the report. A damaged compressed file keeps the records read before the damage.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

from datatrove.data import DocumentsPipeline
from datatrove.pipeline.readers import (
    HuggingFaceDatasetReader,
    JsonlReader,
    ParquetReader,
)
from datatrove.pipeline.readers.base import BaseDiskReader
from datatrove.utils.logging import logger

from factory.corpus.steps import HELDOUT, OUT_KEY, SOURCE_KEY, count_out, label

CORRUPT_LIMIT = 1000
TEXT_SUFFIXES = (".txt", ".text", ".md")
PARQUET_SUFFIXES = (".parquet", ".pq")


def file_format(path: str | Path) -> str:
    """jsonl, parquet or text, from a file name (compression suffixes skipped)."""
    name = str(path).lower()
    for comp in (".gz", ".zst", ".bz2", ".xz"):
        name = name.removesuffix(comp)
    if name.endswith(PARQUET_SUFFIXES):
        return "parquet"
    if name.endswith(TEXT_SUFFIXES):
        return "text"
    return "jsonl"


def _claim_source(doc, source: str) -> None:
    """Add the `source` field, keeping an original field of that name as `orig_source`."""
    old = doc.metadata.get(SOURCE_KEY)
    if old is not None and old != source:
        doc.metadata["orig_source"] = old
    doc.metadata[SOURCE_KEY] = source


def _lines(f):
    """Line iteration over any opened file: zstandard's reader cannot iterate itself."""
    return f if hasattr(f, "readline") and not type(f).__name__.startswith("Zstd") \
        else io.BufferedReader(f)


class _CountingReader:
    """Mixin for readers: counts read/kept records and notes the bad ones."""

    step = "read"

    def _setup(self, source: str, heldout: bool, corrupt_dir: str | None) -> None:
        self.source = source
        self.heldout = heldout
        self.corrupt_dir = corrupt_dir
        self._corrupt = None
        self._noted = 0

    def _bad(self, why: str, filepath: str, line: int | None, rank: int = 0) -> None:
        self.stat_update(label(self.step, self.source, "in"))
        self.stat_update(label(self.step, self.source, f"dropped_{why}"))
        if self.corrupt_dir is None or self._noted >= CORRUPT_LIMIT:
            return
        if self._corrupt is None:
            os.makedirs(self.corrupt_dir, exist_ok=True)
            # open for the task's lifetime; line-buffered so a crash keeps what was noted
            self._corrupt = open(os.path.join(self.corrupt_dir,  # noqa: SIM115
                                              f"{self.source}.{os.getpid()}.jsonl"),
                                 "a", encoding="utf-8", buffering=1)
        where = getattr(self.data_folder, "path", "") if hasattr(self, "data_folder") else ""
        rec = {"source": self.source, "file": os.path.join(where, filepath),
               "line": line, "reason": why}
        self._corrupt.write(json.dumps(rec) + "\n")
        self._corrupt.flush()
        self._noted += 1

    def get_document_from_dict(self, data, source_file, id_in_file):
        text = data.get(self.text_key) if isinstance(data, dict) else None
        if not isinstance(text, str) or not text:
            line = id_in_file + 1 if isinstance(id_in_file, int) else None
            self._bad("missing_text", source_file, line)
            return None
        self.stat_update(label(self.step, self.source, "in"))
        doc = super().get_document_from_dict(data, source_file, id_in_file)
        if doc is None:
            self.stat_update(label(self.step, self.source, "dropped_missing_text"))
            return None
        doc.metadata.pop("file_path", None)
        _claim_source(doc, self.source)
        if self.heldout:
            doc.metadata[OUT_KEY] = HELDOUT
        count_out(self, self.step, doc)
        return doc

    def _damaged(self, filepath: str, e: Exception) -> None:
        self.stat_update(label(self.step, self.source, "truncated_files"))
        logger.warning(f"source {self.source!r}: {filepath} is damaged after the records "
                       f"read so far ({e.__class__.__name__}: {e}); the rest is skipped")


class SourceJsonlReader(_CountingReader, JsonlReader):
    """JSON Lines (.jsonl, .jsonl.gz, .jsonl.zst) of one source."""

    name = "🐿 Jsonl (counting)"

    def __init__(self, data_folder: str, paths_file: str, source: str, text_key: str = "text",
                 heldout: bool = False, corrupt_dir: str | None = None):
        super().__init__(data_folder, paths_file=paths_file, text_key=text_key, id_key="id",
                         add_file_path=False)
        self._setup(source, heldout, corrupt_dir)

    def read_file(self, filepath: str) -> DocumentsPipeline:
        import orjson

        try:
            with self.data_folder.open(filepath, "rb", compression=self.compression) as f:
                for li, raw in enumerate(_lines(f)):
                    if not raw.strip():
                        continue
                    with self.track_time():
                        try:
                            raw.decode("utf-8")
                        except UnicodeDecodeError:
                            self._bad("invalid_utf8", filepath, li + 1)
                            continue
                        try:
                            data = orjson.loads(raw)
                        except orjson.JSONDecodeError:
                            data = None
                        if not isinstance(data, dict):
                            self._bad("corrupt_json", filepath, li + 1)
                            continue
                        doc = self.get_document_from_dict(data, filepath, li)
                    if doc is not None:
                        yield doc
        except (EOFError, OSError) as e:
            self._damaged(filepath, e)


class SourceParquetReader(_CountingReader, ParquetReader):
    """Parquet files of one source (every column kept as a field)."""

    name = "📒 Parquet (counting)"

    def __init__(self, data_folder: str, paths_file: str, source: str, text_key: str = "text",
                 heldout: bool = False, corrupt_dir: str | None = None):
        super().__init__(data_folder, paths_file=paths_file, text_key=text_key, id_key="id")
        self._setup(source, heldout, corrupt_dir)


class SourceTextReader(_CountingReader, BaseDiskReader):
    """Plain text: a document per file (id = the file's path) or per non-empty line
    (id = path:line)."""

    name = "📄 Text (counting)"

    def __init__(self, data_folder: str, paths_file: str, source: str, unit: str = "file",
                 heldout: bool = False, corrupt_dir: str | None = None):
        super().__init__(data_folder, paths_file=paths_file, text_key="text", id_key="id")
        self.unit = unit
        self._setup(source, heldout, corrupt_dir)

    def read_file(self, filepath: str) -> DocumentsPipeline:
        try:
            with self.data_folder.open(filepath, "rb", compression="infer") as f:
                if self.unit == "file":
                    raw = f.read()
                    try:
                        text = raw.decode("utf-8")
                    except UnicodeDecodeError:
                        self._bad("invalid_utf8", filepath, None)
                        return
                    doc = self.get_document_from_dict({"text": text, "id": filepath}, filepath, 0)
                    if doc is not None:
                        yield doc
                    return
                for li, raw in enumerate(_lines(f)):
                    if not raw.strip():
                        continue
                    try:
                        text = raw.decode("utf-8").rstrip("\r\n")
                    except UnicodeDecodeError:
                        self._bad("invalid_utf8", filepath, li + 1)
                        continue
                    doc = self.get_document_from_dict({"text": text, "id": f"{filepath}:{li + 1}"},
                                                      filepath, li)
                    if doc is not None:
                        yield doc
        except (EOFError, OSError) as e:
            self._damaged(filepath, e)


class SourceHFReader(_CountingReader, HuggingFaceDatasetReader):
    """A Hugging Face dataset (hub id or local folder), streamed, as one source."""

    name = "🤗 HuggingFace (counting)"

    def __init__(self, dataset: str, split: str, config: str | None, source: str,
                 text_key: str = "text", heldout: bool = False, corrupt_dir: str | None = None):
        options = {"split": split} | ({"name": config} if config else {})
        super().__init__(dataset, dataset_options=options, streaming=True, text_key=text_key,
                         id_key="id")
        self._setup(source, heldout, corrupt_dir)

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1):
        # One task streams the whole dataset: the generated ids (`<dataset>/<rank>/<row>` when
        # rows have no `id`) and with them the held-out split must not depend on the task count.
        if data:
            yield from data
        if rank == 0:
            yield from super().run(None, 0, 1)


READERS = {"jsonl": SourceJsonlReader, "parquet": SourceParquetReader, "text": SourceTextReader}


def read_corrupt_notes(corrupt_dir: Path, limit: int = CORRUPT_LIMIT) -> list[dict]:
    """The noted bad records, sorted by file and line, at most `limit`."""
    notes = []
    for p in sorted(Path(corrupt_dir).glob("*.jsonl")) if Path(corrupt_dir).is_dir() else []:
        for line in p.read_text(encoding="utf-8").splitlines():
            if line.strip():
                notes.append(json.loads(line))
    notes.sort(key=lambda r: (r["source"], r["file"], r["line"] or 0))
    return notes[:limit]
