"""Fertility: how many tokens a tokenizer spends per word of a text.

Words are whitespace-separated strings of the original text. Each token is attributed to a
word by its character offsets: its first non-space character lies in that word; a token made
only of a word-start marker (`▁`, `Ġ`) belongs to the word that follows it. Encoding adds no
special tokens, so none is counted. The per-word piece counts are the base for every number
of the report (tokenization/report.py compares tokenizers with them); coverage is the share
of a text's most frequent words (`top_words`) that a tokenizer keeps in one piece.
"""

from __future__ import annotations

import bisect
import re
from collections import Counter
from pathlib import Path
from typing import Iterable, Iterator

from tokenizers import Tokenizer

from tokenization.io import batched

_WORD = re.compile(r"\S+")
_EDGE_PUNCT = re.compile(r"^[\W_]+|[\W_]+$")
BATCH = 256
TOP_WORDS = 1000


def as_tokenizer(tokenizer) -> Tokenizer:
    """A private Rust tokenizer with truncation and padding off, from a `tokenizers.Tokenizer`,
    a transformers fast tokenizer, a tokenizer.json path or a tokenizer folder."""
    if isinstance(tokenizer, (str, Path)):
        from tokenization.train import load_backend

        tok = load_backend(tokenizer)[0]
    elif isinstance(tokenizer, Tokenizer):
        tok = Tokenizer.from_str(tokenizer.to_str())  # a copy: the caller's settings stay
    elif hasattr(tokenizer, "backend_tokenizer"):
        tok = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    else:
        raise TypeError(f"not a tokenizer: {type(tokenizer).__name__}")
    tok.no_truncation()
    tok.no_padding()
    return tok


def _pieces_per_word(text: str, offsets: list[tuple[int, int]]) -> tuple[list[str], list[int]]:
    spans = [(m.start(), m.end()) for m in _WORD.finditer(text)]
    words = [text[s:e] for s, e in spans]
    counts = [0] * len(spans)
    if not spans:
        return words, counts
    starts = [s for s, _ in spans]
    last = len(spans) - 1
    for s, e in offsets:
        # first non-space character of the token; a token of spaces or a zero-width one (the
        # prepended `▁` of Metaspace) goes to the word that follows it
        p = s
        while p < e and text[p].isspace():
            p += 1
        i = bisect.bisect_right(starts, p) - 1
        if i < 0 or p >= spans[i][1]:
            i = min(i + 1, last)
        counts[i] += 1
    return words, counts


def word_pieces(tokenizer, texts: Iterable[str]) -> Iterator[tuple[str, int]]:
    """(word, number of tokens of that word) for every whitespace word of `texts`."""
    tok = as_tokenizer(tokenizer)
    for batch in batched(texts, BATCH):
        for text, enc in zip(batch, tok.encode_batch(batch, add_special_tokens=False)):
            words, counts = _pieces_per_word(text, enc.offsets)
            yield from zip(words, counts)


def top_words(texts: Iterable[str], n: int = TOP_WORDS) -> list[str]:
    """The `n` most frequent words of `texts`: whitespace words stripped of surrounding
    punctuation, holding at least one letter (ties: first seen first)."""
    freq: Counter = Counter()
    for t in texts:
        for w in t.split():
            w = _EDGE_PUNCT.sub("", w)
            if w and any(ch.isalpha() for ch in w):
                freq[w] += 1
    return [w for w, _ in freq.most_common(n)]


def coverage(tokenizer, words: list[str]) -> float:
    """Share (0..1) of `words` that the tokenizer keeps whole: one token for the word as it
    stands inside a sentence (after a space, so `Ġ`/`▁` word-start forms count)."""
    if not words:
        return 0.0
    whole = sum(n == 1 for _, n in word_pieces(tokenizer, (" " + w for w in words)))
    return whole / len(words)


def fertility_report(tokenizer, texts: Iterable[str],
                     top: list[str] | None = None) -> dict[str, float]:
    """{"fertility": tokens per whitespace word, "split_share": share of words cut into more
    than one piece (0..1), "pieces_per_split_word", "words", "tokens", "unsplit_share"}, plus
    "coverage_top1000" (see `coverage`) when `top` (e.g. `top_words(...)`) is given."""
    words = tokens = split = split_tokens = 0
    freq: Counter = Counter()
    for _, n in word_pieces(tokenizer, texts):
        words += 1
        tokens += n
        if n > 1:
            split += 1
            split_tokens += n
        freq[n] += 1
    out = {
        "fertility": tokens / words if words else 0.0,
        "split_share": split / words if words else 0.0,
        "pieces_per_split_word": split_tokens / split if split else 0.0,
        "unsplit_share": freq[1] / words if words else 0.0,
        "words": words,
        "tokens": tokens,
    }
    if top is not None:
        out["coverage_top1000"] = coverage(tokenizer, top)
    return out
