"""The dictionary tagger: the floor a fine-tuned NER model must clear."""

from __future__ import annotations

from seqeval.metrics.sequence_labeling import get_entities

from factory.bench.dictionary import DictionaryTagger, dictionary_baseline, spans
from factory.bench.ner import IobSplit, NerData
from tests.bench import NCBI_SLICE


def test_spans_agree_with_seqeval():
    tags = ["I-D", "I-D", "O", "B-D", "B-D", "I-D", "I-C", "O", "B-C"]
    assert spans(tags) == [(t, s, e + 1) for t, s, e in get_entities(tags)]
    assert spans(tags) == [("D", 0, 2), ("D", 3, 4), ("D", 4, 6), ("C", 6, 7), ("C", 8, 9)]


def test_tagger_hand_example():
    train = IobSplit(
        [["Breast", "cancer", "and", "cancer", "."],
         ["APC", "deficiency", "is", "rare"],
         ["the", "APC", "gene"],
         ["aspirin", "in", "APC"]],
        [["B-Disease", "I-Disease", "O", "B-Disease", "O"],
         ["B-Disease", "I-Disease", "O", "O"],
         ["O", "O", "O"],
         ["B-Chemical", "O", "B-Disease"]])
    tagger = DictionaryTagger.from_iob(train)
    assert tagger.entries == {("breast", "cancer"): "Disease", ("cancer",): "Disease",
                              ("apc", "deficiency"): "Disease", ("aspirin",): "Chemical",
                              ("apc",): "Disease"}
    words = ["BREAST", "cancer", "cancer", "with", "apc", "deficiency", "and", "APC", "Aspirin"]
    assert tagger.tag(words) == ["B-Disease", "I-Disease", "B-Disease", "O", "B-Disease",
                                 "I-Disease", "O", "B-Disease", "B-Chemical"]
    assert tagger.tag([]) == []
    assert DictionaryTagger({}).tag(["cancer"]) == ["O"]


def test_majority_type_wins():
    train = IobSplit([["x"], ["x"], ["x"], ["y"], ["y"]],
                     [["B-A"], ["B-B"], ["B-B"], ["B-B"], ["B-A"]])
    assert DictionaryTagger.from_iob(train).entries == {("x",): "B", ("y",): "A"}


def test_baseline_on_repo_slice():
    d = NerData.load(NCBI_SLICE)
    on_train = dictionary_baseline(d.train, d.train)
    on_test = dictionary_baseline(d.train, d.test)
    # Every training entity is in the dictionary: on its own data the tagger misses only
    # where a longer entry swallows a shorter entity or a neighbour.
    assert on_train["recall"] > 90
    assert 20 < on_test["f1"] < on_train["f1"]
    assert on_test["precision"] > 0 and on_test["recall"] > 0
