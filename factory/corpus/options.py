"""Typed settings of the corpus steps, shared by the manifest and the stage configs.

Every filter config's fields are the keyword arguments of the datatrove filter it builds
(`None` turns a rule off, as in datatrove), so a value in the manifest always reaches the
filter: nothing is accepted and ignored. No datatrove import here: the manifest loads this
module at CLI start-up.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Options(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class GopherQuality(_Options):
    """Gopher quality rules (Rae et al. 2021, appendix A): datatrove's GopherQualityFilter."""
    min_doc_words: int | None = 50
    max_doc_words: int | None = 100000
    min_avg_word_length: int | None = 3
    max_avg_word_length: int | None = 10
    max_symbol_word_ratio: float | None = 0.1
    max_bullet_lines_ratio: float | None = 0.9
    max_ellipsis_lines_ratio: float | None = 0.3
    max_non_alpha_words_ratio: float | None = 0.8
    min_stop_words: int | None = 2


class GopherRepetition(_Options):
    """Gopher repetition rules: datatrove's GopherRepetitionFilter."""
    dup_line_frac: float | None = 0.3
    dup_para_frac: float | None = 0.3
    dup_line_char_frac: float | None = 0.2
    dup_para_char_frac: float | None = 0.2
    top_n_grams: tuple[tuple[int, float], ...] = ((2, 0.2), (3, 0.18), (4, 0.16))
    dup_n_grams: tuple[tuple[int, float], ...] = ((5, 0.15), (6, 0.14), (7, 0.13), (8, 0.12),
                                                  (9, 0.11), (10, 0.10))


class C4Quality(_Options):
    """C4's line and page rules (Raffel et al. 2020): datatrove's C4QualityFilter. It also
    drops failing lines from the kept documents, as C4 does."""
    split_paragraph: bool = True
    remove_citations: bool = True
    filter_no_terminal_punct: bool = True
    min_num_sentences: int = 5
    min_words_per_line: int = 3
    max_word_length: int = 1000
    filter_lorem_ipsum: bool = True
    filter_javascript: bool = True
    filter_curly_bracket: bool = True
    filter_policy: bool = True


class FineWebQuality(_Options):
    """FineWeb's line rules (Penedo et al. 2024): datatrove's FineWebQualityFilter."""
    line_punct_thr: float = 0.12
    line_punct_exclude_zero: bool = False
    short_line_thr: float = 0.67
    short_line_length: int = 30
    char_duplicates_ratio: float = 0.01
    new_line_ratio: float = 0.3


class Language(_Options):
    """Offline language identification with py3langid (its model ships in the package)."""
    languages: list[str] = Field(min_length=1, description="ISO 639-1 codes to keep, e.g. [en]")
    min_score: float = Field(0.5, ge=0, le=1, description="Minimum normalised probability")


class Filters(_Options):
    """Quality filters of a source, applied in this order; an absent one does not run."""
    language: Language | None = None
    gopher_quality: GopherQuality | None = None
    gopher_repetition: GopherRepetition | None = None
    c4: C4Quality | None = None
    fineweb: FineWebQuality | None = None

    def active(self) -> list[str]:
        return [n for n in type(self).model_fields if getattr(self, n) is not None]


class NearDedup(_Options):
    """MinHash near-duplicate removal (datatrove's four minhash steps), within and across
    sources. Defaults chosen for copies with ~2% of words edited (BENCHMARKS.md): 20 bands of
    5 hashes over word 5-grams put the 50%-detection point at Jaccard (1/20)^(1/5) = 0.55,
    where datatrove's 14 x 8 puts it at 0.72 and misses many such copies."""
    n_grams: int = Field(5, gt=0)
    buckets: int = Field(20, gt=0)
    hashes_per_bucket: int = Field(5, gt=0)
    seed: int = 1

    @property
    def threshold(self) -> float:
        """The Jaccard similarity detected with probability ~1/2."""
        return (1 / self.buckets) ** (1 / self.hashes_per_bucket)


class Decontaminate(_Options):
    """Drop corpus documents sharing a word n-gram with a benchmark's test text."""
    ngram: int = Field(13, gt=0, description="Words per matched n-gram (GPT-3 used 13)")
    min_words: int = Field(8, gt=0, description="Test texts shorter than `ngram` words are "
                           "matched whole when they have at least this many words")
    tasks: bool = Field(True, description="Use the test split of every evaluation task")
    files: list[str] = Field([], description="Extra plain-text files, one test text per line")


class Executor(_Options):
    """Where datatrove runs the corpus pipelines. The same steps run on both."""
    kind: Literal["local", "slurm"] = "local"
    tasks: int | None = Field(None, gt=0, description="Tasks per pipeline (default: one per "
                              "input file, at most the CPU count locally)")
    workers: int | None = Field(None, gt=0, description="Concurrent local processes")
    partition: str | None = Field(None, description="Slurm partition (slurm only)")
    time: str = Field("24:00:00", description="Slurm time limit per task")
    cpus_per_task: int = Field(1, gt=0)
    mem_per_cpu_gb: int = Field(2, gt=0)
    sbatch_args: dict[str, str] = {}

    @model_validator(mode="after")
    def _slurm_fields(self):
        if self.kind == "slurm" and not self.partition:
            raise ValueError("a slurm executor needs `partition`")
        if self.kind == "local" and self.partition:
            raise ValueError("`partition` is for kind: slurm")
        return self


class Phase(_Options):
    """A stretch of training from `start` (fraction of the planned tokens) to the next phase,
    with its own source weights (sampling probabilities, normalised)."""
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    start: float = Field(ge=0, lt=1)
    weights: dict[str, float]

    @model_validator(mode="after")
    def _positive(self):
        if not self.weights or any(not (w >= 0 and math.isfinite(w)) for w in self.weights.values()):
            raise ValueError("weights: give each source a weight >= 0")
        if sum(self.weights.values()) <= 0:
            raise ValueError("weights: at least one must be > 0")
        return self


def check_phases(phases: list[Phase], sources: list[str]) -> list[str]:
    """Problems of a phase list: starts at 0, increasing starts, known source names."""
    out = []
    if phases and phases[0].start != 0:
        out.append("the first phase must start at 0")
    starts = [p.start for p in phases]
    if starts != sorted(set(starts)) or len(starts) != len(set(starts)):
        out.append("phase starts must increase")
    for p in phases:
        unknown = sorted(set(p.weights) - set(sources))
        if unknown:
            out.append(f"phase {p.name!r}: unknown source(s) {', '.join(unknown)} "
                       f"(sources: {', '.join(sources)})")
    return out
