"""Quality filters per source: datatrove's Gopher, C4 and FineWeb filters and an offline
language filter, each counted per source.

One step (`SourceFilters`) holds every source's filter chain, so sources with different
thresholds share one pipeline; a document meets only its own source's filters. Counters are
`filter_<name>:<source>:in/out/dropped_<reason>` (reason: datatrove's, e.g. gopher_short_doc).
"""

from __future__ import annotations

from datatrove.data import Document, DocumentsPipeline
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.filters.base_filter import BaseFilter

from factory.corpus.options import Filters
from factory.corpus.steps import SOURCE_KEY, count_out, label


class LanguageFilter(BaseFilter):
    """Keeps documents whose py3langid language is listed, with a normalised probability of at
    least `min_score`. py3langid ships its model (97 languages, Maltese included), so nothing
    is downloaded at run time, unlike datatrove's fastText LanguageFilter."""

    name = "🌍 Language (py3langid)"

    def __init__(self, languages: list[str], min_score: float = 0.5):
        super().__init__()
        self.languages = list(languages)
        self.min_score = min_score
        self._identifier = None

    def _ident(self):
        if self._identifier is None:
            from py3langid import langid

            self._identifier = langid.LanguageIdentifier.from_model_file(langid.MODEL_FILE,
                                                                         norm_probs=True)
        return self._identifier

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        lang, score = self._ident().classify(doc.text)
        doc.metadata["language"] = lang
        doc.metadata["language_score"] = round(float(score), 4)
        if lang not in self.languages:
            return False, "wrong_language"
        if score < self.min_score:
            return False, "low_language_score"
        return True


def build_filter(name: str, options) -> BaseFilter:
    """The datatrove filter of one entry of `Filters` (its fields are the filter's kwargs)."""
    kwargs = options.model_dump()
    if name == "language":
        return LanguageFilter(**kwargs)
    if name == "gopher_quality":
        from datatrove.pipeline.filters import GopherQualityFilter

        return GopherQualityFilter(**kwargs)
    if name == "gopher_repetition":
        from datatrove.pipeline.filters import GopherRepetitionFilter

        return GopherRepetitionFilter(**kwargs)
    if name == "c4":
        from datatrove.pipeline.filters import C4QualityFilter

        return C4QualityFilter(**kwargs)
    if name == "fineweb":
        from datatrove.pipeline.filters import FineWebQualityFilter

        return FineWebQualityFilter(**kwargs)
    raise ValueError(f"unknown filter {name!r}")


def filter_steps(filters: Filters) -> list[str]:
    """The step labels of a filter set, in the order they run."""
    return [f"filter_{n}" for n in filters.active()]


class SourceFilters(PipelineStep):
    """Applies each source's filter chain; the first failing filter drops the document."""

    type = "🔻 - FILTER"
    name = "quality filters"

    def __init__(self, per_source: dict[str, Filters]):
        super().__init__()
        self.per_source = per_source
        self._chains: dict[str, list[tuple[str, BaseFilter]]] | None = None

    def _chain(self, source: str) -> list[tuple[str, BaseFilter]]:
        if self._chains is None:
            # built in the worker: spacy tokenizers and the language model load there
            self._chains = {s: [(f"filter_{n}", build_filter(n, getattr(f, n)))
                                for n in f.active()]
                            for s, f in self.per_source.items()}
        return self._chains.get(source, [])

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        for doc in data:
            src = doc.metadata.get(SOURCE_KEY, "")
            kept = True
            for step, flt in self._chain(src):
                self.stat_update(label(step, src, "in"))
                with self.track_time():
                    verdict = flt.filter(doc)
                ok, why = (verdict, "filtered") if isinstance(verdict, bool) else verdict
                if not ok:
                    self.stat_update(label(step, src, f"dropped_{why or 'filtered'}"))
                    kept = False
                    break
                count_out(self, step, doc)
            if kept:
                yield doc

