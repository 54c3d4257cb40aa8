"""Benchmark decontamination: drop corpus documents that share a long word n-gram with a
benchmark's test text (GPT-3, Brown et al. 2020, appendix C: 13-grams).

Both sides are normalised to lower-case word sequences (Unicode NFKC, `\\w+` runs), so
punctuation spacing does not matter: benchmark files are often tokenised ("APC2 , a") where
the corpus reads "APC2, a". A test text shorter than the n-gram is matched whole when it has at
least `min_words` words (shorter ones would match everywhere).

Test texts come from `TEST_TEXTS`, a dict of readers by format, each `path -> iterable of
test strings`; the benchmark loaders (factory/bench) can add theirs under new format names.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from datatrove.data import DocumentsPipeline
from datatrove.pipeline.base import PipelineStep

from factory.corpus.steps import SOURCE_KEY, count_out, label

_WORD = re.compile(r"\w+")


def words(text: str) -> list[str]:
    """The normalised words of a text: NFKC, lower-case, runs of word characters."""
    return _WORD.findall(unicodedata.normalize("NFKC", text).lower())


def text_lines(path: Path) -> Iterator[str]:
    """A plain text file: one test text per non-empty line."""
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.strip():
                yield line.strip()


def iob_sentences(path: Path) -> Iterator[str]:
    """An IOB file (token<TAB>tag, a blank line between sentences): each sentence's tokens
    joined by spaces."""
    tokens: list[str] = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            line = line.rstrip("\n")
            if not line.strip():
                if tokens:
                    yield " ".join(tokens)
                tokens = []
                continue
            tokens.append(line.split("\t")[0].strip())
    if tokens:
        yield " ".join(tokens)


def ner_test(folder: Path) -> Iterator[str]:
    """The test split of a NER task folder (test.tsv, IOB)."""
    return iob_sentences(Path(folder) / "test.tsv")


def example_texts(example) -> Iterator[str]:
    """The strings of a benchmark example of any loader (factory.bench): tagged sentences,
    texts and pairs, multiple-choice contexts and endings, cloze code."""
    if hasattr(example, "tokens") and hasattr(example, "tags"):      # an IobSplit
        yield from (" ".join(t) for t in example.tokens)
        return
    for value in vars(example).values():
        if isinstance(value, str):
            yield value
        elif isinstance(value, (tuple, list)):
            yield from (v for v in value if isinstance(v, str))


def suite_test(ref: Path) -> Iterator[str]:
    """The test split of a benchmark-suite task; `ref` is `<task folder>/@<suite>/<task>`,
    read with the suite's own loader (factory.bench.suites), whatever its file format."""
    from factory.bench.suites import SUITES

    folder, suite, task = ref.parent.parent, ref.parent.name.lstrip("@"), ref.name
    test = SUITES[suite].tasks[task].load(folder).test
    items = [test] if hasattr(test, "tokens") else test
    for example in items:
        yield from example_texts(example)


# format name -> reader of test strings; "ner" takes a task's data folder, "suite" a reference
# made by suite_ref.
TEST_TEXTS: dict[str, Callable[[Path], Iterable[str]]] = {
    "text": text_lines,
    "iob": iob_sentences,
    "ner": ner_test,
    "suite": suite_test,
}


def suite_ref(folder: Path, suite: str, task: str) -> str:
    return str(Path(folder) / f"@{suite}" / task)


def test_location(kind: str, path: Path) -> Path:
    """The file (or, for a suite task, the folder) a test-text reference reads."""
    if kind == "suite":
        return Path(path).parent.parent
    return Path(path) / "test.tsv" if kind == "ner" else Path(path)


def test_files(kind: str, path: Path) -> list[Path]:
    """The files a test-text reference reads (existence checks, fingerprints); [] if absent."""
    where = test_location(kind, path)
    if where.is_dir():
        return sorted(f for f in where.rglob("*") if f.is_file())
    return [where] if where.is_file() else []


class NgramIndex:
    """The n-grams of every test text, each mapped to the first task it came from."""

    def __init__(self, ngram: int, min_words: int):
        self.n, self.min_words = ngram, min_words
        self.grams: dict[int, dict[tuple, int]] = {}   # length -> {word tuple: task}
        self.skipped_short = 0

    def add(self, text: str, task: int) -> None:
        w = words(text)
        if len(w) >= self.n:
            table = self.grams.setdefault(self.n, {})
            for i in range(len(w) - self.n + 1):
                table.setdefault(tuple(w[i:i + self.n]), task)
        elif len(w) >= self.min_words:
            self.grams.setdefault(len(w), {}).setdefault(tuple(w), task)
        else:
            self.skipped_short += 1

    def match(self, text: str) -> int | None:
        """The task of the first test n-gram found in `text`, or None."""
        w = words(text)
        for n, table in self.grams.items():
            for i in range(len(w) - n + 1):
                t = table.get(tuple(w[i:i + n]))
                if t is not None:
                    return t
        return None


def build_index(tests: list[tuple[str, str, str]], ngram: int, min_words: int) -> NgramIndex:
    """An index over (task name, format, path) test references."""
    index = NgramIndex(ngram, min_words)
    for t, (_, kind, path) in enumerate(tests):
        for text in TEST_TEXTS[kind](Path(path)):
            index.add(text, t)
    return index


class DecontaminateStep(PipelineStep):
    """Drops documents matching a test n-gram; counts `decontaminate:<source>:dropped_<task>`."""

    type = "🧼 - DECONTAMINATE"
    name = "decontaminate"

    def __init__(self, tests: list[tuple[str, str, str]], ngram: int = 13, min_words: int = 8):
        super().__init__()
        self.tests, self.ngram, self.min_words = tests, ngram, min_words
        self._index: NgramIndex | None = None

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        if self._index is None:
            self._index = build_index(self.tests, self.ngram, self.min_words)
        for doc in data:
            src = doc.metadata.get(SOURCE_KEY, "")
            self.stat_update(label(self.name, src, "in"))
            with self.track_time():
                hit = self._index.match(doc.text)
            if hit is not None:
                self.stat_update(label(self.name, src, f"dropped_{self.tests[hit][0]}"))
                continue
            count_out(self, self.name, doc)
            yield doc
