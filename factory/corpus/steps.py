"""The corpus stage's own datatrove steps: text normalisation, a minimum length filter,
the held-out split, and the helpers datatrove's exact dedup and writer call.

Every step counts documents per source under labels `<step>:<source>:<what>` (what = in,
out, dropped_<reason>, words...), so the stage can report each step's effect on each source
from the executor's merged stats. Functions handed to datatrove (dedup content, priority,
writer adapter) live at module level: the executor pickles them into worker processes.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata

from datatrove.data import Document, DocumentsPipeline
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.filters.base_filter import BaseFilter

# Metadata key naming a document's output folder ("train/<source>" or "heldout"); the writer
# substitutes it into the file name and the adapter drops it from the written record.
OUT_KEY = "factory_out"
SOURCE_KEY = "source"
HELDOUT = "heldout"


def label(step: str, source: str, what: str) -> str:
    return f"{step}:{source}:{what}"


def count_out(step: PipelineStep, name: str, doc: Document) -> None:
    """Counts a document, and its words, leaving step `name`."""
    src = doc.metadata.get(SOURCE_KEY, "")
    step.stat_update(label(name, src, "out"))
    step.stat_update(label(name, src, "words_out"), value=len(doc.text.split()))


_HSPACE = re.compile(r"[^\S\n]+")      # whitespace except newline
_MANY_NL = re.compile(r"\n{3,}")


def normalize_text(text: str) -> str:
    """Unicode NFC; CRLF and lone CR -> LF; runs of spaces/tabs -> one space; lines stripped;
    at most one blank line in a row. Paragraph breaks survive: sentence splitting and
    document structure downstream use them."""
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n")
    lines = (_HSPACE.sub(" ", line).strip() for line in text.split("\n"))
    return _MANY_NL.sub("\n\n", "\n".join(lines)).strip()


class NormalizeText(PipelineStep):
    """Normalises `doc.text` (see normalize_text); drops documents left empty."""

    type = "✂️ - FORMAT"
    name = "normalize"

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        for doc in data:
            src = doc.metadata.get(SOURCE_KEY, "")
            self.stat_update(label(self.name, src, "in"))
            with self.track_time():
                doc.text = normalize_text(doc.text)
            if not doc.text:
                self.stat_update(label(self.name, src, "dropped_empty"))
                continue
            count_out(self, self.name, doc)
            yield doc


class MinWordsFilter(BaseFilter):
    """Keeps documents of at least `min_words` whitespace-separated words."""

    name = "min_words"

    def __init__(self, min_words: int):
        super().__init__()
        self.min_words = min_words

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        src = doc.metadata.get(SOURCE_KEY, "")
        self.stat_update(label(self.name, src, "in"))
        n = len(doc.text.split())
        if n < self.min_words:
            self.stat_update(label(self.name, src, "dropped_too_few_words"))
            return False, "too_few_words"
        self.stat_update(label(self.name, src, "out"))
        self.stat_update(label(self.name, src, "words_out"), value=n)
        return True


class SourceCounter(PipelineStep):
    """Counts the documents of each source passing this point (after a step of datatrove's)."""

    type = "📊 - STATS"

    def __init__(self, step: str):
        super().__init__()
        self.step = step
        self.name = f"count after {step}"

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        for doc in data:
            count_out(self, self.step, doc)
            yield doc


def heldout_score(seed: int, doc_id: str) -> float:
    """A deterministic number in [0, 1) per document: sha256(seed + ":" + id)."""
    h = hashlib.sha256(f"{seed}:{doc_id}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2 ** 64


class HeldoutSplit(PipelineStep):
    """Routes each document to `train/<source>` or `heldout` and counts docs and words.

    Documents read from an explicit held-out file arrive already marked; otherwise a
    document is held out when heldout_score(seed, id) < fraction (0 = none). The split runs
    after dedup, so two copies of a text can never land on both sides.
    """

    type = "🔀 - SPLIT"
    name = "heldout_split"

    def __init__(self, fraction: float, seed: int, train_dir: str = "train/{source}"):
        super().__init__()
        self.fraction = fraction
        self.seed = seed
        self.train_dir = train_dir

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        for doc in data:
            src = doc.metadata.get(SOURCE_KEY, "")
            self.stat_update(label(self.name, src, "in"))
            if doc.metadata.get(OUT_KEY) != HELDOUT:
                held = self.fraction > 0 and heldout_score(self.seed, str(doc.id)) < self.fraction
                doc.metadata[OUT_KEY] = HELDOUT if held else self.train_dir.format(source=src)
            side = "heldout" if doc.metadata[OUT_KEY] == HELDOUT else "train"
            self.stat_update(label(self.name, src, f"{side}_docs"))
            self.stat_update(label(self.name, src, f"{side}_words"), value=len(doc.text.split()))
            if side == "train":
                count_out(self, self.name, doc)
            yield doc


# --- functions datatrove calls ---------------------------------------------------------


def dedup_content(doc: Document) -> str:
    """What exact dedup hashes: the normalised text (normalisation ran before)."""
    return doc.text


def dedup_priority(doc: Document) -> int:
    """Held-out documents win a duplicate group: a training copy of held-out text is dropped."""
    return 2 if doc.metadata.get(OUT_KEY) == HELDOUT else 1


# Routing key, and the group size ExactDedupFilter notes on every kept document.
_INTERNAL = {OUT_KEY, "duplicate_count"}


def write_adapter(self, doc: Document) -> dict:
    """The written record: id, text, then every original field and `source`."""
    out = {"id": doc.id, "text": doc.text}
    for k, v in doc.metadata.items():
        if k not in _INTERNAL and k not in out:
            out[k] = v
    return out
