"""Benchmark metrics, each as its benchmark's own evaluation code computes it, in percent.

Definitions follow the official scorers (checked against their source):
- entity F1: seqeval/conlleval, exact type and boundaries (`factory.bench.ner.entity_scores`).
- BLURB (Gu et al. 2021, evaluation code of the BLURB leaderboard): PICO = scikit-learn macro
  F1 over the word-level labels I-PAR, I-INT, I-OUT (O excluded); ChemProt and DDI = micro F1
  over the positive relation classes only (`false` / `DDI-false` excluded); GAD = micro F1
  over both classes; HoC = labels unioned over the sentences of each document, then macro F1
  over the 10 hallmarks; BIOSSES = Pearson r; PubMedQA and BioASQ = accuracy.
- LexGLUE (Chalkidis et al. 2022): micro and macro F1; for multi-label sets (UNFAIR-ToS) an
  extra "no label" column is appended to both sides, so that a correctly empty prediction
  counts as a hit, as LexGLUE's experiment code does.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Sequence

import numpy as np

from factory.bench.ner import entity_scores


def _same_length(gold: Sequence, pred: Sequence) -> None:
    if len(gold) != len(pred):
        raise ValueError(f"{len(gold)} gold labels but {len(pred)} predictions")
    if not gold:
        raise ValueError("no examples to score")


def entity_f1(gold: list[list[str]], pred: list[list[str]]) -> dict[str, float]:
    """{"entity_f1", "precision", "recall"} (seqeval micro average)."""
    s = entity_scores(gold, pred)
    return {"entity_f1": s["f1"], "precision": s["precision"], "recall": s["recall"]}


def accuracy(gold: Sequence[Hashable], pred: Sequence[Hashable]) -> float:
    _same_length(gold, pred)
    return 100.0 * sum(g == p for g, p in zip(gold, pred)) / len(gold)


def f1(gold: Sequence[Hashable], pred: Sequence[Hashable], average: str = "micro",
       labels: Iterable[Hashable] | None = None) -> float:
    """scikit-learn F1 over single-label predictions; `labels` restricts the classes that
    count (BLURB's relation tasks leave out the negative class this way)."""
    from sklearn.metrics import f1_score

    _same_length(gold, pred)
    return 100.0 * float(f1_score(list(gold), list(pred), average=average,
                                  labels=None if labels is None else list(labels),
                                  zero_division=0))


def token_macro_f1(gold: list[list[str]], pred: list[list[str]],
                   labels: Iterable[str]) -> float:
    """Word-level macro F1 over `labels`, every word of every sentence one decision (PICO)."""
    if len(gold) != len(pred) or any(len(g) != len(p) for g, p in zip(gold, pred)):
        raise ValueError("gold and predicted tags differ in shape")
    return f1([t for s in gold for t in s], [t for s in pred for t in s], "macro", labels)


def pearson(gold: Sequence[float], pred: Sequence[float]) -> float:
    """Pearson r x 100; 0 when the predictions are constant (r is undefined there)."""
    from scipy.stats import pearsonr

    _same_length(gold, pred)
    if len(set(pred)) < 2 or len(set(gold)) < 2:
        return 0.0
    return 100.0 * float(pearsonr(np.asarray(gold, float), np.asarray(pred, float))[0])


def multilabel_f1(gold: Sequence[Iterable[int]], pred: Sequence[Iterable[int]],
                  num_labels: int, average: str = "micro", none_column: bool = False) -> float:
    """F1 over label sets (ids < num_labels). none_column: LexGLUE's extra label that is on
    exactly when an example has no label."""
    from sklearn.metrics import f1_score

    _same_length(gold, pred)
    y_true = _binarise(gold, num_labels)
    y_pred = _binarise(pred, num_labels)
    if none_column:
        y_true = np.hstack([y_true, (y_true.sum(1) == 0)[:, None].astype(int)])
        y_pred = np.hstack([y_pred, (y_pred.sum(1) == 0)[:, None].astype(int)])
    return 100.0 * float(f1_score(y_true, y_pred, average=average, zero_division=0))


def _binarise(sets: Sequence[Iterable[int]], num_labels: int) -> np.ndarray:
    out = np.zeros((len(sets), num_labels), dtype=int)
    for r, s in enumerate(sets):
        for k in s:
            if not 0 <= k < num_labels:
                raise ValueError(f"label id {k} outside 0..{num_labels - 1}")
            out[r, k] = 1
    return out


def union_by_group(groups: Sequence[str], sets: Sequence[Iterable[int]]) -> dict[str, set[int]]:
    """The union of the label sets of each group, in first-seen order (HoC: sentences ->
    their abstract)."""
    out: dict[str, set[int]] = {}
    for g, s in zip(groups, sets):
        out.setdefault(g, set()).update(s)
    return out


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof 1; 0 for a single value)."""
    arr = np.asarray(values, dtype=float)
    return float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else 0.0
