"""The benchmark suites: a plain dict of task specs per suite, keyed by the names papers use.

Each task names its loader, the kind of head it fine-tunes, its task type (the BLURB score
averages per type first), its headline metric and how it is computed from predictions
(`factory.bench.metrics`), the folder-name prefixes it is found under in a suite's data
folder, and its fine-tuning defaults (overridable from the command line or manifest).

Fine-tuning defaults are the usual BERT recipe of each suite's papers scaled to what a CPU
run can afford in epochs; learning rates, batch sizes and lengths follow the papers:
BLURB (Gu et al. 2021, PubMedBERT fine-tuning), LexGLUE (Chalkidis et al. 2022: lr 3e-5,
batch 8, CaseHOLD length 256), FinBERT (Araci 2019: lr 2e-5, length 64), BERTu (Micallef et
al. 2022), CoSQA (Huang et al. 2021: lr 1e-5, batch 32).
"""

from __future__ import annotations

import os

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Literal

from factory.bench import (
    blurb,
    codexglue,
    finance,
    lexglue,
    maltese,
    metrics,
    stackoverflow,
)
from factory.bench.data import TaskData
from factory.bench.finetune import FinetuneOptions

Kind = Literal["tag", "single", "multi", "regression", "choice", "cloze"]
# (gold test examples, predictions, label names) -> {headline metric: value, extra: value}
ScoreFn = Callable[[Any, list, list[str]], dict[str, float]]

# Where the benchmark data of a development checkout lives (../shared next to the repository);
# FACTORY_SHARED points elsewhere. A manifest's `data:` overrides it per suite.
SHARED = Path(os.environ.get("FACTORY_SHARED",
                             Path(__file__).resolve().parents[2].parent / "shared")) / "benchmarks"


@dataclass(frozen=True)
class TaskSpec:
    name: str
    kind: Kind
    group: str
    metric: str
    load: Callable[[Path], TaskData]
    score: ScoreFn
    prefixes: tuple[str, ...]
    defaults: FinetuneOptions = field(default_factory=FinetuneOptions)


@dataclass(frozen=True)
class Suite:
    name: str
    tasks: dict[str, TaskSpec]
    data_dir: Path                # where its task folders live unless --data-dir says else
    score_name: str = "score"
    doc: str = ""
    extra: dict = field(default_factory=dict)


# --- scores -------------------------------------------------------------------------------


def _labels_of(gold) -> list:
    return [e.label for e in gold]


def score_entities(gold, pred, labels) -> dict[str, float]:
    return metrics.entity_f1(gold.tags, pred)


def score_pico(gold, pred, labels) -> dict[str, float]:
    pico = [t for t in ("I-PAR", "I-INT", "I-OUT") if t in labels] or [
        t for t in labels if t != "O"]
    return {"macro_f1": metrics.token_macro_f1(gold.tags, pred, pico)}


def score_words(gold, pred, labels) -> dict[str, float]:
    flat_g = [t for s in gold.tags for t in s]
    flat_p = [t for s in pred for t in s]
    return {"accuracy": metrics.accuracy(flat_g, flat_p)}


def score_relations(gold, pred, labels, negatives=("false", "DDI-false")) -> dict[str, float]:
    g = [labels[e.label] for e in gold]
    p = [labels[k] for k in pred]
    positive = [n for n in labels if n not in negatives]
    return {"micro_f1": metrics.f1(g, p, "micro", positive),
            "macro_f1": metrics.f1(g, p, "macro", positive)}


def score_binary_relation(gold, pred, labels) -> dict[str, float]:
    g = _labels_of(gold)
    return {"micro_f1": metrics.f1(g, pred, "micro"),
            "f1_positive": metrics.f1(g, pred, "binary") if set(g) <= {0, 1} else 0.0}


def score_hoc(gold, pred, labels) -> dict[str, float]:
    groups = [e.group for e in gold]
    g = metrics.union_by_group(groups, _labels_of(gold))
    p = metrics.union_by_group(groups, pred)
    docs = list(g)
    return {"macro_f1": metrics.multilabel_f1([g[d] for d in docs], [p[d] for d in docs],
                                              len(labels), "macro"),
            "micro_f1": metrics.multilabel_f1([g[d] for d in docs], [p[d] for d in docs],
                                              len(labels), "micro")}


def score_pearson(gold, pred, labels) -> dict[str, float]:
    from scipy.stats import spearmanr

    g = _labels_of(gold)
    rho = spearmanr(g, pred)[0] if len(set(pred)) > 1 else 0.0
    return {"pearson": metrics.pearson(g, pred), "spearman": 100.0 * float(rho)}


def score_accuracy(gold, pred, labels) -> dict[str, float]:
    g = _labels_of(gold)
    return {"accuracy": metrics.accuracy(g, pred), "macro_f1": metrics.f1(g, pred, "macro")}


def score_macro_f1(gold, pred, labels) -> dict[str, float]:
    g = _labels_of(gold)
    return {"macro_f1": metrics.f1(g, pred, "macro"), "accuracy": metrics.accuracy(g, pred)}


def score_micro_f1(gold, pred, labels) -> dict[str, float]:
    g = _labels_of(gold)
    return {"micro_f1": metrics.f1(g, pred, "micro"), "macro_f1": metrics.f1(g, pred, "macro")}


def score_multilabel(gold, pred, labels) -> dict[str, float]:
    g = _labels_of(gold)
    f = partial(metrics.multilabel_f1, g, pred, len(labels), none_column=True)
    return {"micro_f1": f(average="micro"), "macro_f1": f(average="macro")}


def score_cloze(gold, pred, labels) -> dict[str, float]:
    return {"accuracy": metrics.accuracy([e.answer for e in gold], pred)}


# --- registry -----------------------------------------------------------------------------


def _opts(**kw) -> FinetuneOptions:
    return FinetuneOptions(**kw)


NER = _opts(epochs=3, lr=5e-5, batch_size=32, max_seq_length=256)
SENT = _opts(epochs=3, lr=2e-5, batch_size=32, max_seq_length=128)


def _ner(name: str, *prefixes: str) -> TaskSpec:
    return TaskSpec(name, "tag", "NER", "entity_f1", blurb.load_iob, score_entities,
                    prefixes or (name,), NER)


BLURB = Suite("blurb", {t.name: t for t in [
    _ner("BC5CDR-chem"), _ner("BC5CDR-disease"), _ner("NCBI-disease"), _ner("BC2GM"),
    _ner("JNLPBA"),
    TaskSpec("EBM-NLP", "tag", "PICO", "macro_f1", blurb.load_pico, score_pico,
             ("EBM-NLP", "EBMNLP", "EBM-PICO"), NER),
    TaskSpec("ChemProt", "single", "Relation extraction", "micro_f1", blurb.load_relation,
             score_relations, ("ChemProt",), SENT),
    TaskSpec("DDI", "single", "Relation extraction", "micro_f1", blurb.load_relation,
             score_relations, ("DDI",), SENT),
    TaskSpec("GAD", "single", "Relation extraction", "micro_f1", blurb.load_relation,
             score_binary_relation, ("GAD",), SENT),
    TaskSpec("BIOSSES", "regression", "Sentence similarity", "pearson", blurb.load_biosses,
             score_pearson, ("BIOSSES",), _opts(epochs=20, lr=3e-5, batch_size=16,
                                                 max_seq_length=128)),
    TaskSpec("HoC", "multi", "Document classification", "macro_f1", blurb.load_hoc,
             score_hoc, ("HoC",), SENT),
    TaskSpec("PubMedQA", "single", "Question answering", "accuracy", blurb.load_yesno_qa,
             score_accuracy, ("PubMedQA",), _opts(epochs=10, lr=2e-5, batch_size=16,
                                                  max_seq_length=512)),
    TaskSpec("BioASQ", "single", "Question answering", "accuracy", blurb.load_yesno_qa,
             score_accuracy, ("BioASQ",), _opts(epochs=10, lr=2e-5, batch_size=16,
                                                max_seq_length=512)),
]}, SHARED / "blurb", "blurb_score",
    doc="BLURB score: the macro average of the six task-type averages (Gu et al. 2021)")

LEXGLUE = Suite("lexglue", {t.name: t for t in [
    TaskSpec("CaseHOLD", "choice", "CaseHOLD", "micro_f1", lexglue.load_casehold,
             score_micro_f1, ("casehold", "case_hold"),
             _opts(epochs=3, lr=3e-5, batch_size=8, max_seq_length=256)),
    TaskSpec("UNFAIR-ToS", "multi", "UNFAIR-ToS", "micro_f1", lexglue.load_unfair_tos,
             score_multilabel, ("unfair_tos", "unfair-tos"),
             _opts(epochs=5, lr=3e-5, batch_size=8, max_seq_length=128)),
]}, SHARED / "legal", doc="mean of the task scores (micro F1)")

MALTESE = Suite("maltese", {t.name: t for t in [
    TaskSpec("UPOS", "tag", "UPOS", "accuracy", maltese.load_upos, score_words,
             ("UD_Maltese", "MUDT"), _opts(epochs=3, lr=5e-5, batch_size=16,
                                            max_seq_length=256)),
    TaskSpec("Sentiment", "single", "Sentiment", "macro_f1", maltese.load_sentiment,
             score_macro_f1, ("sentiment",), _opts(epochs=5, lr=2e-5, batch_size=16,
                                                   max_seq_length=128)),
]}, SHARED / "maltese", doc="mean of the task scores")

FINANCE = Suite("finance", {t.name: t for t in [
    TaskSpec("FPB", "single", "FPB", "accuracy", finance.load_phrasebank, score_accuracy,
             ("financial_phrasebank", "FPB"),
             _opts(epochs=4, lr=2e-5, batch_size=32, max_seq_length=64)),
]}, SHARED / "finance", doc="Financial PhraseBank accuracy")

CODE = Suite("code", {t.name: t for t in [
    TaskSpec("cloze-python", "cloze", "Cloze", "accuracy",
             partial(codexglue.load_cloze, lang="python"), score_cloze, ("cloze",),
             _opts(max_seq_length=256)),
    TaskSpec("cloze-java", "cloze", "Cloze", "accuracy",
             partial(codexglue.load_cloze, lang="java"), score_cloze, ("cloze",),
             _opts(max_seq_length=256)),
    TaskSpec("CoSQA", "single", "CoSQA", "accuracy", codexglue.load_cosqa, score_accuracy,
             ("cosqa",), _opts(epochs=3, lr=1e-5, batch_size=32, max_seq_length=256)),
]}, SHARED / "code", doc="mean of the cloze and CoSQA averages")

STACKOVERFLOW = Suite("stackoverflow", {t.name: t for t in [
    TaskSpec("quality", "single", "Question quality", "accuracy", stackoverflow.load_quality,
             score_accuracy, ("quality",), SENT),
    TaskSpec("closed", "single", "Closed questions", "macro_f1", stackoverflow.load_closed,
             score_macro_f1, ("closed",), SENT),
]}, SHARED / "stackoverflow", doc="mean of the task scores (no published data here)")

SUITES: dict[str, Suite] = {s.name: s for s in
                            (BLURB, LEXGLUE, MALTESE, FINANCE, CODE, STACKOVERFLOW)}
