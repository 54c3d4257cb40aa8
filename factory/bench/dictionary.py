"""The floor a NER model must clear: tag the test set by looking up the training entities.

Every entity of the training set becomes a dictionary entry (its lower-cased word sequence
-> its type); a test sentence is tagged left to right by greedy longest match. A model that
does not beat this has learnt nothing beyond memorising the training names.
"""

from __future__ import annotations

from collections import Counter, defaultdict

from factory.bench.ner import IobSplit, entity_scores


def spans(tags: list[str]) -> list[tuple[str, int, int]]:
    """(type, start, end exclusive) of each entity; an I- after O or another type opens one."""
    out: list[tuple[str, int, int]] = []
    start, kind = None, None
    for i, t in enumerate(tags + ["O"]):
        prefix, _, typ = t.partition("-")
        if start is not None and (prefix != "I" or typ != kind):
            out.append((kind, start, i))
            start, kind = None, None
        if prefix == "B" or (prefix == "I" and start is None):
            start, kind = i, typ
    return out


class DictionaryTagger:
    """Greedy longest-match tagging with a dictionary of lower-cased word sequences."""

    def __init__(self, entries: dict[tuple[str, ...], str]):
        self.entries = dict(entries)
        self.longest = max((len(k) for k in self.entries), default=0)

    @classmethod
    def from_iob(cls, split: IobSplit) -> DictionaryTagger:
        """Entries from the entities of `split`; a string seen with several types keeps the
        most frequent one (ties: the type first in sorted order)."""
        seen: dict[tuple[str, ...], Counter] = defaultdict(Counter)
        for words, tags in zip(split.tokens, split.tags):
            for typ, s, e in spans(tags):
                seen[tuple(w.lower() for w in words[s:e])][typ] += 1
        return cls({k: min(c, key=lambda t: (-c[t], t)) for k, c in seen.items()})

    def tag(self, words: list[str]) -> list[str]:
        low = [w.lower() for w in words]
        out = ["O"] * len(words)
        i = 0
        while i < len(words):
            for n in range(min(self.longest, len(words) - i), 0, -1):
                typ = self.entries.get(tuple(low[i:i + n]))
                if typ is not None:
                    out[i] = f"B-{typ}"
                    out[i + 1:i + n] = [f"I-{typ}"] * (n - 1)
                    i += n
                    break
            else:
                i += 1
        return out


def dictionary_baseline(train: IobSplit, test: IobSplit) -> dict[str, float]:
    """Entity F1/precision/recall (percent) of the training-set dictionary on `test`."""
    tagger = DictionaryTagger.from_iob(train)
    return entity_scores(test.tags, [tagger.tag(w) for w in test.tokens])
