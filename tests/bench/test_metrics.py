"""Each benchmark metric against its reference implementation on planted predictions."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import pearsonr
from seqeval.metrics import f1_score as seqeval_f1
from sklearn.metrics import accuracy_score, f1_score
from sklearn.preprocessing import MultiLabelBinarizer

from factory.bench import metrics
from factory.bench.classify import TextExample
from factory.bench.ner import IobSplit
from factory.bench.suites import (
    score_binary_relation,
    score_hoc,
    score_multilabel,
    score_pico,
    score_relations,
)


def test_entity_f1_edge_cases_match_seqeval():
    gold = [["B-D", "I-D", "O", "B-D"],          # entity at the sentence end
            ["O", "B-C", "I-C", "I-C"],
            ["B-D", "O"]]
    pred = [["B-D", "I-D", "O", "I-D"],          # I- without B- at the end opens an entity
            ["O", "I-C", "I-C", "O"],            # I- without B-, boundary short: a miss
            ["B-C", "O"]]                        # wrong type
    got = metrics.entity_f1(gold, pred)
    assert got["entity_f1"] == pytest.approx(100 * seqeval_f1(gold, pred))
    # By hand: 4 predicted, 4 gold, 2 exact (both D entities of sentence 1).
    assert got["precision"] == pytest.approx(50.0) and got["recall"] == pytest.approx(50.0)


def test_accuracy_and_f1_match_sklearn():
    rng = np.random.default_rng(0)
    gold = rng.integers(0, 3, 200).tolist()
    pred = [g if rng.random() < 0.6 else int(rng.integers(0, 3)) for g in gold]
    assert metrics.accuracy(gold, pred) == pytest.approx(100 * accuracy_score(gold, pred))
    for avg in ("micro", "macro"):
        assert metrics.f1(gold, pred, avg) == pytest.approx(100 * f1_score(gold, pred,
                                                                           average=avg))
    with pytest.raises(ValueError):
        metrics.accuracy([1, 2], [1])


def test_relation_micro_f1_leaves_out_the_negative_class():
    labels = ["CPR:3", "CPR:4", "false"]
    gold = [TextExample("s", i) for i in (0, 1, 2, 2, 1, 0)]
    pred = [0, 2, 2, 2, 1, 1]
    got = score_relations(gold, pred, labels)
    g = [labels[e.label] for e in gold]
    p = [labels[k] for k in pred]
    ref = f1_score(g, p, average="micro", labels=["CPR:3", "CPR:4"])
    assert got["micro_f1"] == pytest.approx(100 * ref)
    # Counting `false` as a class would give 4 of 6 right; the positives give P 2/3, R 2/4.
    assert 100 * f1_score(g, p, average="micro") == pytest.approx(200 / 3)
    assert got["micro_f1"] == pytest.approx(100 * 4 / 7)
    ddi = score_relations([TextExample("s", 0), TextExample("s", 1)], [1, 1],
                          ["DDI-effect", "DDI-false"])
    assert ddi["micro_f1"] == pytest.approx(0.0)


def test_gad_micro_f1_and_positive_f1():
    gold = [TextExample("s", g) for g in (1, 1, 0, 0, 1)]
    pred = [1, 0, 0, 1, 1]
    got = score_binary_relation(gold, pred, ["0", "1"])
    assert got["micro_f1"] == pytest.approx(60.0)
    assert got["f1_positive"] == pytest.approx(100 * f1_score([1, 1, 0, 0, 1], pred))


def test_pico_macro_f1_over_pico_labels_only():
    gold = [["I-PAR", "I-PAR", "O", "I-INT"], ["I-OUT", "O"]]
    pred = [["I-PAR", "O", "O", "I-INT"], ["I-INT", "O"]]
    got = score_pico(IobSplit([["w"] * 4, ["w"] * 2], gold), pred,
                     ["O", "B-INT", "I-INT", "B-OUT", "I-OUT", "B-PAR", "I-PAR"])
    flat_g = [t for s in gold for t in s]
    flat_p = [t for s in pred for t in s]
    ref = f1_score(flat_g, flat_p, average="macro", labels=["I-PAR", "I-INT", "I-OUT"])
    assert got["macro_f1"] == pytest.approx(100 * ref)


def test_pearson_matches_scipy_and_constant_is_zero():
    gold = [0.0, 1.2, 3.4, 2.2, 4.0]
    pred = [0.5, 1.0, 2.9, 2.5, 3.1]
    assert metrics.pearson(gold, pred) == pytest.approx(100 * pearsonr(gold, pred)[0])
    assert metrics.pearson(gold, [1.0] * 5) == 0.0


def test_hoc_unions_sentences_per_document_then_macro_f1():
    # Document a: sentences with {0} and {2}; b: {} and {1}. Predictions per sentence.
    gold = [TextExample("s", (0,), group="a"), TextExample("s", (2,), group="a"),
            TextExample("s", (), group="b"), TextExample("s", (1,), group="b")]
    pred = [(0,), (), (1, 2), ()]
    got = score_hoc(gold, pred, [f"h{k}" for k in range(3)])
    mlb = MultiLabelBinarizer(classes=[0, 1, 2])
    g = mlb.fit_transform([{0, 2}, {1}])
    p = mlb.fit_transform([{0}, {1, 2}])
    assert got["macro_f1"] == pytest.approx(100 * f1_score(g, p, average="macro"))
    assert got["micro_f1"] == pytest.approx(100 * f1_score(g, p, average="micro"))
    # Per sentence it would differ: the sentence-level label of b's second row is missed.
    assert got["macro_f1"] != pytest.approx(100 * f1_score(
        mlb.fit_transform([{0}, {2}, set(), {1}]), mlb.fit_transform([{0}, set(), {1, 2}, set()]),
        average="macro"))


def test_multilabel_none_column_as_lexglue():
    gold = [TextExample("t", ()), TextExample("t", (1,)), TextExample("t", (0, 1))]
    pred = [(), (1,), (0,)]
    got = score_multilabel(gold, pred, ["a", "b"])
    g = np.array([[0, 0, 1], [0, 1, 0], [1, 1, 0]])
    p = np.array([[0, 0, 1], [0, 1, 0], [1, 0, 0]])
    assert got["micro_f1"] == pytest.approx(100 * f1_score(g, p, average="micro"))
    assert got["macro_f1"] == pytest.approx(100 * f1_score(g, p, average="macro"))
    plain = metrics.multilabel_f1([(), (1,), (0, 1)], pred, 2, "micro")
    assert plain == pytest.approx(100 * f1_score(g[:, :2], p[:, :2], average="micro"))
    with pytest.raises(ValueError, match="outside"):
        metrics.multilabel_f1([(5,)], [()], 2)


def test_mean_std_is_sample_std():
    assert metrics.mean_std([70.0]) == (70.0, 0.0)
    mean, std = metrics.mean_std([1.0, 2.0, 4.0])
    assert mean == pytest.approx(7 / 3) and std == pytest.approx(np.std([1, 2, 4], ddof=1))
